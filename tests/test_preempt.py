"""The preempt verb narrows kube-scheduler's proposal with what only the extender knows, which GPU each pod holds:
a node where the proposed victims would not free the GPU room the pod needs is refused, victims whose GPUs the pod
would not use are spared, and a node is never answered without a victim (kube-scheduler fails the whole preemption
on one). kube-scheduler counts GPUs only as a number, and not GPU shares at all, so its proposal can be wrong both
ways."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from extender.app import create_app
from extender.metrics import ExtenderMetrics
from policies.config import PlacementPolicy
from policies.demand import Demand
from policies.inventory import Assignment, MigPlacement
from scheduler.binder import MemoryBinder
from scheduler.model import ClusterModel
from scheduler.service import Evictions, NotReadyError, PlacementService
from tests.helpers import mig_node, node


def gpu_pod(uid: str, resources: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": uid, "namespace": "default", "uid": uid},
        "spec": {"containers": [{"name": "c", "resources": {"requests": resources, "limits": resources}}]},
    }


def whole(n: str, *gpus: int) -> tuple[Assignment, Demand]:
    return Assignment(n, 1000, 1024, gpus, 1000), Demand(
        cpu_milli=1000, memory_mib=1024, gpu_count=len(gpus), gpu_milli=1000
    )


def share(n: str, gpu: int, milli: int) -> tuple[Assignment, Demand]:
    demand = Demand(cpu_milli=1000, memory_mib=1024, gpu_count=1, gpu_milli=milli, shareable=True)
    return Assignment(n, 1000, 1024, (gpu,), milli), demand


def mig(n: str, gpu: int, profile: str, start: int) -> tuple[Assignment, Demand]:
    return Assignment(n, 1000, 1024, mig=MigPlacement(gpu, profile, start)), Demand(1000, 1024, mig_profile=profile)


def service(nodes: list[Any], bound: dict[str, tuple[Assignment, Demand]]) -> PlacementService:
    model = ClusterModel(PlacementPolicy())
    model.replace_nodes(nodes)
    assert not model.replace_pods(bound)
    model.mark_ready()
    return PlacementService(model, MemoryBinder(), confirm_on_bind=True)


@pytest.fixture
def fleet() -> PlacementService:
    """n4: four whole-GPU pods of one GPU each. n2x2: one pod of two GPUs and two of one.
    shared: a 500-milli share on GPU 0 and whole pods on GPUs 1-3. shares: GPU 0 with 500+500, GPU 1 with 300."""
    return service(
        [node("n4", gpus=4), node("n2x2", gpus=4), node("shared", gpus=4), node("shares", gpus=2)],
        {
            "a0": whole("n4", 0),
            "a1": whole("n4", 1),
            "a2": whole("n4", 2),
            "a3": whole("n4", 3),
            "big": whole("n2x2", 0, 1),
            "b2": whole("n2x2", 2),
            "b3": whole("n2x2", 3),
            "s0": share("shared", 0, 500),
            "c1": whole("shared", 1),
            "c2": whole("shared", 2),
            "c3": whole("shared", 3),
            "h1": share("shares", 0, 500),
            "h2": share("shares", 0, 500),
            "h3": share("shares", 1, 300),
        },
    )


TWO_GPUS = gpu_pod("high", {"nvidia.com/gpu": "2"})


def test_victims_that_free_enough_are_kept_as_proposed(fleet: PlacementService) -> None:
    assert fleet.preempt(TWO_GPUS, {"n4": ["a0", "a1"], "n2x2": ["big"]}) == {"n4": ["a0", "a1"], "n2x2": ["big"]}


def test_a_node_where_the_victims_do_not_free_the_room_is_refused(fleet: PlacementService) -> None:
    # kube-scheduler counts one GPU free on `shared` (the share is invisible to it): one victim would do, by its
    # count. The extender knows GPU 0 is half taken: evicting c1 leaves one whole GPU, not two.
    assert fleet.preempt(TWO_GPUS, {"shared": ["c1"], "n4": ["a0"], "n2x2": ["big"]}) == {"n2x2": ["big"]}


def test_victims_whose_gpus_the_pod_would_not_use_are_spared(fleet: PlacementService) -> None:
    # kube-scheduler's order is most important first; the extender spares in that order.
    assert fleet.preempt(TWO_GPUS, {"n4": ["a3", "a2", "a1", "a0"]}) == {"n4": ["a1", "a0"]}
    assert fleet.preempt(TWO_GPUS, {"n2x2": ["b2", "b3", "big"]}) == {"n2x2": ["big"]}
    # Evicting the share as well frees the two GPUs; sparing it does not.
    assert fleet.preempt(TWO_GPUS, {"shared": ["s0", "c1"]}) == {"shared": ["s0", "c1"]}


def test_share_preemption_takes_the_fewest_shares(fleet: PlacementService) -> None:
    pod = gpu_pod("high-share", {"gpu-extender.io/gpu-milli": "800"})
    # GPU 1 has 700 free: evicting h3 is enough, the two on GPU 0 are spared.
    assert fleet.preempt(pod, {"shares": ["h1", "h2", "h3"]}) == {"shares": ["h3"]}
    # Only GPU 0's pods proposed: both must go (500 free after one, 800 asked).
    assert fleet.preempt(pod, {"shares": ["h1", "h2"]}) == {"shares": ["h1", "h2"]}


def test_a_node_is_never_answered_without_victims(fleet: PlacementService) -> None:
    # A 600-milli share fits GPU 1 of `shares` as it is: every victim there is spared, so that node is dropped
    # rather than answered with none (kube-scheduler fails the whole preemption on an empty list).
    pod = gpu_pod("small-share", {"gpu-extender.io/gpu-milli": "600"})
    assert fleet.preempt(pod, {"shares": ["h1", "h2"], "n4": ["a0"]}) == {"n4": ["a0"]}


def test_unknown_victims_are_kept_and_unknown_nodes_dropped(fleet: PlacementService) -> None:
    # A victim the extender does not track was chosen for CPU or memory; a node it does not know is no candidate.
    answer = fleet.preempt(TWO_GPUS, {"n2x2": ["cpu-hog", "b2", "big"], "elsewhere": ["x"]})
    assert answer == {"n2x2": ["cpu-hog", "big"]}


def test_what_the_pod_holds_itself_is_no_obstacle(fleet: PlacementService) -> None:
    # An assumption of the preemptor on the node (left from an earlier attempt) must not count against it.
    fleet.model.pod_gone("a3")
    assert fleet.model.assume("high", whole("n4", 3)[0])
    assert fleet.preempt(TWO_GPUS, {"n4": ["a2", "a1"]}) == {"n4": ["a1"]}


def test_mig_victims_must_free_a_valid_slot() -> None:
    # A 3g.40gb instance needs four slices at start 0 or 4. Evicting the 1g at slot 5 leaves slot 4 blocked by the
    # one at slot 4; evicting both frees 4-7.
    placement = service(
        [mig_node("h100", gpus=1)],
        {
            "m0": mig("h100", 0, "3g.40gb", 0),
            "m4": mig("h100", 0, "1g.10gb", 4),
            "m5": mig("h100", 0, "1g.10gb", 5),
        },
    )
    pod = gpu_pod("high-mig", {"nvidia.com/mig-3g.40gb": "1"})
    assert placement.preempt(pod, {"h100": ["m5"]}) == {}
    assert placement.preempt(pod, {"h100": ["m4", "m5"]}) == {"h100": ["m4", "m5"]}
    assert placement.preempt(pod, {"h100": ["m0", "m4", "m5"]}) == {"h100": ["m4", "m5"]}


def test_preempt_waits_for_a_complete_view() -> None:
    model = ClusterModel(PlacementPolicy())
    with pytest.raises(NotReadyError):
        PlacementService(model, MemoryBinder()).preempt(TWO_GPUS, {"n4": ["a0"]})


def test_the_verb_answers_the_narrowed_victims_with_their_pdb_counts(fleet: PlacementService) -> None:
    client = TestClient(create_app(fleet, ExtenderMetrics(fleet.model)))
    body = {
        "Pod": TWO_GPUS,
        "NodeNameToVictims": None,
        "NodeNameToMetaVictims": {
            "n4": {"Pods": [{"UID": u} for u in ("a3", "a2", "a1", "a0")], "NumPDBViolations": 1},
            "shared": {"Pods": [{"UID": "c1"}], "NumPDBViolations": 0},
        },
    }
    reply = client.post("/preempt", json=body)
    assert reply.status_code == 200
    assert reply.json() == {
        "NodeNameToMetaVictims": {"n4": {"Pods": [{"UID": "a1"}, {"UID": "a0"}], "NumPDBViolations": 1}}
    }


def test_a_nominated_pod_whose_victims_are_going_gets_no_new_victims(fleet: PlacementService) -> None:
    """kube-scheduler nominates the pod and deletes its victims, then tries it again at once; until our watch shows
    the deletion, filter finds the node full and kube-scheduler asks to preempt again, on another node. Seen through
    the real kube-scheduler: a second, needless round of evictions."""
    now = [0.0]
    fleet.evictions = Evictions(ttl_s=30.0, clock=lambda: now[0])
    assert fleet.preempt(TWO_GPUS, {"n2x2": ["big"], "n4": ["a0", "a1"]}) == {"n2x2": ["big"], "n4": ["a0", "a1"]}
    nominated = {**TWO_GPUS, "status": {"nominatedNodeName": "n2x2"}}
    assert fleet.preempt(nominated, {"n4": ["a0", "a1"]}) == {}  # `big` still held here: the watch lags
    fleet.model.pod_gone("big")
    assert fleet.preempt(nominated, {"n4": ["a0", "a1"]}) == {}
    # Someone else took the freed GPUs: the pod needs victims again.
    fleet.model.pod_bound("other", *whole("n2x2", 0, 1))
    assert fleet.preempt(nominated, {"n4": ["a0", "a1"]}) == {"n4": ["a0", "a1"]}
    fleet.model.pod_gone("other")
    # The memory of a grant is short: a nomination that old is not trusted to be under way.
    now[0] = 31.0
    other = {**TWO_GPUS, "metadata": {**TWO_GPUS["metadata"], "uid": "later"}, "status": {"nominatedNodeName": "n4"}}
    assert fleet.preempt(other, {"n4": ["a0", "a1"]}) == {"n4": ["a0", "a1"]}
    now[0] = 62.0
    assert fleet.preempt(other, {"n4": ["a0", "a1"]}) == {"n4": ["a0", "a1"]}


def test_a_nominated_preemptor_passes_its_node_before_the_watch_sees_the_victims_go() -> None:
    """kube-scheduler retries the preemptor as soon as it sees the victims deleted; our watch may not have yet.
    Filter passes the nominated node then (bind decides on the view of its moment), rather than leave the pod
    waiting for an event that may not come for minutes."""
    from scheduler.model import ClusterModel
    from scheduler.service import PlacementService
    from tests.helpers import node as make_node

    model = ClusterModel(PlacementPolicy())
    model.replace_nodes([make_node("n0", gpus=2)])
    model.mark_ready()
    service = PlacementService(model, MemoryBinder(), confirm_on_bind=True)

    def gpu_pod(uid: str, gpus: int) -> dict[str, Any]:
        limits = {"nvidia.com/gpu": str(gpus)}
        return {
            "metadata": {"name": uid, "namespace": "default", "uid": uid},
            "spec": {"containers": [{"name": "c", "resources": {"limits": limits, "requests": limits}}]},
        }

    assert service.filter(gpu_pod("low", 2), ["n0"]).passed == ["n0"]
    service.bind("default", "low", "low", "n0")
    high = gpu_pod("high", 2)
    assert service.filter(high, ["n0"]).passed == []
    assert service.preempt(high, {"n0": ["low"]}) == {"n0": ["low"]}
    high["status"] = {"nominatedNodeName": "n0"}  # the victim is being deleted; the watch has not seen it yet
    assert service.filter(high, ["n0"]).passed == ["n0"]
    assert service.filter(gpu_pod("other", 2), ["n0"]).passed == []  # only the nominated preemptor
