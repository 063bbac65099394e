"""Serving pods follow the co-location plan: the cluster state counts each model's replicas per GPU, a pod scores its
model's open planned slots highest, the planner loop publishes plans (keeping the last one when a round fails), and
a re-plan of a fleet that already follows the plan moves nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from policies.catalog import default_catalog
from policies.colocation import PlannerOptions
from policies.config import PlacementPolicy
from policies.inventory import Assignment, GpuDevice, NodeInventory
from policies.model_load import ModelLoad
from policies.plan_targets import PlannedSlot, PlanTargets
from policies.state import ClusterState
from scheduler.binder import MemoryBinder
from scheduler.model import ClusterModel
from scheduler.planner.demand_file import read_demand_file, wants_as_loads
from scheduler.planner.loop import PlannerLoop, PlannerMetrics
from scheduler.service import PlacementService

H100 = "NVIDIA-H100-80GB-HBM3"
SMALL = "meta-llama/Llama-3.2-1B-Instruct"  # 7,486 MiB, 54 requests/s on an H100 in the shipped catalog
QWEN = "Qwen/Qwen2.5-7B-Instruct"  # 26,291 MiB, 13 requests/s


def h100_node(name: str, gpus: int = 2) -> NodeInventory:
    return NodeInventory(name, 64_000, 524_288, tuple(GpuDevice(i, H100, 81_559) for i in range(gpus)))


def serving_pod(uid: str, model: str | None, milli: int = 300, memory: str = "8Gi") -> dict[str, Any]:
    annotations = {"gpu-extender.io/gpu-memory": memory}
    if model is not None:
        annotations["gpu-extender.io/model"] = model
    limits = {"gpu-extender.io/gpu-milli": str(milli)}
    return {
        "metadata": {"name": uid, "namespace": "default", "uid": uid, "annotations": annotations},
        "spec": {"containers": [{"name": "vllm", "resources": {"limits": limits, "requests": limits}}]},
    }


def make_service(nodes: int = 3) -> PlacementService:
    model = ClusterModel(PlacementPolicy())
    model.replace_nodes([h100_node(f"h-{i}") for i in range(nodes)])
    model.mark_ready()
    return PlacementService(model, MemoryBinder(), confirm_on_bind=True)


def schedule(service: PlacementService, pod: dict[str, Any]) -> Assignment:
    """What kube-scheduler does: filter, prioritize the nodes that passed (the extender's scores alone decide
    here), then bind the best."""
    names = list(service.model.snapshot().names)
    outcome = service.filter(pod, names)
    service.after_filter(pod, outcome)
    passed = outcome.passed
    if len(passed) > 1:
        scores = service.prioritize(pod, passed)
        passed = [max(scores, key=lambda ns: ns[1])[0]]
    meta = pod["metadata"]
    return service.bind("default", meta["name"], meta["uid"], passed[0])


# -- the state counts serving replicas ---------------------------------------------------------------------------


def test_state_counts_replicas_per_model_and_gpu_and_snapshots_keep_theirs() -> None:
    state = ClusterState([h100_node("h-0"), h100_node("h-1")])
    share = Assignment("h-1", gpus=(1,), milli=300, model=SMALL)
    state.apply("a", share)
    before = state.snapshot()
    assert dict(before.model_replicas) == {(SMALL, 1, 1): 1}
    state.apply("b", Assignment("h-1", gpus=(1,), milli=300, model=SMALL))
    state.apply("c", Assignment("h-0", gpus=(0,), milli=300))  # no model: not counted
    assert dict(state.snapshot().model_replicas) == {(SMALL, 1, 1): 2}
    assert dict(before.model_replicas) == {(SMALL, 1, 1): 1}, "a published snapshot's counts changed"
    state.release("a")
    state.release("b")
    assert dict(state.snapshot().model_replicas) == {}
    # The model is a label, not a resource: the same resources with and without it are one assignment.
    assert share == Assignment("h-1", gpus=(1,), milli=300)


def test_open_slots_are_planned_less_running_and_ignore_nodes_gone() -> None:
    state = ClusterState([h100_node("h-0"), h100_node("h-1")])
    plan = PlanTargets.of([PlannedSlot(SMALL, "h-1", 1), PlannedSlot(SMALL, "h-1", 1), PlannedSlot(SMALL, "gone", 0)])
    rows = np.array([0, 1])
    assert plan.open_slots(state.snapshot(), rows, SMALL)[1].tolist()[:2] == [0, 2]
    state.apply("a", Assignment("h-1", gpus=(1,), milli=300, model=SMALL))
    assert plan.open_slots(state.snapshot(), rows, SMALL)[1].tolist()[:2] == [0, 1]
    for key in "bc":  # more running than planned: none open, never negative
        state.apply(key, Assignment("h-1", gpus=(1,), milli=300, model=SMALL))
    assert int(plan.open_slots(state.snapshot(), rows, SMALL).min()) == 0
    assert not plan.open_slots(state.snapshot(), rows, QWEN).any()
    assert plan.planned(SMALL) == 3


# -- serving pods follow the plan --------------------------------------------------------------------------------


def test_serving_pods_fill_their_models_planned_slots_then_place_as_usual() -> None:
    service = make_service()
    unplanned = schedule(make_service(), serving_pod("probe", SMALL))
    # Plan the model onto a GPU the extender would not pick by itself.
    target = ("h-2", 1) if (unplanned.node, unplanned.gpus[0]) != ("h-2", 1) else ("h-1", 0)
    service.model.set_plan(PlanTargets.of([PlannedSlot(SMALL, *target)] * 2))
    placed = [schedule(service, serving_pod(f"s-{i}", SMALL)) for i in range(2)]
    assert [(a.node, a.gpus[0]) for a in placed] == [target, target]
    snapshot = service.model.snapshot()
    assert snapshot.model_replicas[(SMALL, snapshot.index[target[0]], target[1])] == 2
    # The plan's two slots are full: for a third replica the plan weighs nothing anywhere.
    assert all(e["components"]["plan"] == 0 for e in service.explain(serving_pod("s-2", SMALL)) if e["fits"])


def test_pods_of_other_models_and_without_one_ignore_the_plan() -> None:
    alone, planned = make_service(), make_service()
    planned.model.set_plan(PlanTargets.of([PlannedSlot(SMALL, "h-2", 1)]))
    for uid, model in (("q", QWEN), ("none", None)):
        a = schedule(alone, serving_pod(uid, model))
        b = schedule(planned, serving_pod(uid, model))
        assert (a.node, a.gpus) == (b.node, b.gpus)


def test_a_new_plan_is_not_answered_from_scores_computed_under_the_old_one() -> None:
    service = make_service()
    pod = serving_pod("p", SMALL)
    names = list(service.model.snapshot().names)
    service.model.set_plan(PlanTargets.of([PlannedSlot(SMALL, "h-0", 0)]))
    first = dict(service.prioritize(pod, names))
    service.model.set_plan(PlanTargets.of([PlannedSlot(SMALL, "h-2", 1)]))
    second = dict(service.prioritize(pod, names))
    assert first["h-0"] == 10 and second["h-2"] == 10


def test_explain_shows_the_plan_component() -> None:
    service = make_service()
    service.model.set_plan(PlanTargets.of([PlannedSlot(SMALL, "h-1", 0)]))
    best = service.explain(serving_pod("p", SMALL))[0]
    assert best["node"] == "h-1" and best["components"]["plan"] == 1.0
    assert best["placement"]["gpus"] == [0]


def test_whole_gpu_replicas_take_their_planned_gpu_on_the_node() -> None:
    service = make_service(nodes=1)
    service.model.set_plan(PlanTargets.of([PlannedSlot(QWEN, "h-0", 1)]))
    pod = serving_pod("w", QWEN)
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    assert schedule(service, pod).gpus == (1,)


# -- the planner loop --------------------------------------------------------------------------------------------


def demand_of(rates: dict[str, float]) -> Any:
    return lambda: ({name: ModelLoad(name, rps) for name, rps in rates.items()}, {})


def test_the_loop_publishes_a_plan_that_pods_then_follow_and_a_replan_moves_nothing() -> None:
    service = make_service()
    registry = CollectorRegistry()
    published: list[dict[str, Any]] = []
    loop = PlannerLoop(
        service.model,
        default_catalog(),
        demand_of({SMALL: 100.0, QWEN: 10.0, "not/in-catalog": 1.0}),
        options=PlannerOptions(time_limit_s=5, workers=1),
        publish=published.append,
        metrics=PlannerMetrics(registry),
    )
    plan = loop.plan_once()
    assert plan is not None and service.model.view().plan is not None
    assert published[-1]["version"] == 1 and published[-1]["not_in_catalog"] == ["not/in-catalog"]
    assert registry.get_sample_value("gpu_extender_plan_gpus", {"kind": "planned"}) == plan.gpus_used
    assert registry.get_sample_value("gpu_extender_plan_rounds_total", {"outcome": "planned"}) == 1
    # Replicas scheduled one by one land on the planned GPUs.
    for i, replica in enumerate(plan.replicas):
        milli = max(10, -(-replica.load_milli // 10) * 10)
        a = schedule(service, serving_pod(f"r-{i}", replica.model, milli=milli, memory=f"{replica.memory_mib}Mi"))
        assert a.model == replica.model
    planned = sorted((r.model, r.node, r.gpu) for r in plan.replicas)
    running = sorted((a.model, a.node, a.gpus[0]) for a in service.model.assignments().values())
    assert running == planned
    again = loop.plan_once()
    assert again is not None and published[-1]["moves"] == 0
    assert sorted((r.model, r.node, r.gpu) for r in again.replicas) == planned
    assert registry.get_sample_value("gpu_extender_plan_gpus", {"kind": "used"}) == plan.gpus_used


def test_a_failed_round_keeps_the_last_plan_and_says_why() -> None:
    service = make_service()
    rates = {SMALL: 50.0}

    def demand() -> Any:
        if not rates:
            raise ConnectionError("prometheus unreachable")
        return {name: ModelLoad(name, rps) for name, rps in rates.items()}, {}

    registry = CollectorRegistry()
    loop = PlannerLoop(
        service.model,
        default_catalog(),
        demand,
        options=PlannerOptions(time_limit_s=2),
        metrics=PlannerMetrics(registry),
    )
    assert loop.plan_once() is not None
    kept = service.model.view().plan
    rates.clear()
    assert loop.plan_once() is None
    assert service.model.view().plan is kept
    assert loop.last_error is not None and "prometheus unreachable" in loop.last_error
    assert registry.get_sample_value("gpu_extender_plan_rounds_total", {"outcome": "failed"}) == 1
    rates["meta-llama/Llama-3.1-405B"] = 1.0  # only a model the catalog does not know: nothing to plan
    assert loop.plan_once() is None and "no demand" in (loop.last_error or "")


def test_a_larger_demand_plans_more_replicas() -> None:
    service = make_service()
    rates = {SMALL: 20.0}
    loop = PlannerLoop(
        service.model,
        default_catalog(),
        lambda: ({n: ModelLoad(n, r) for n, r in rates.items()}, {}),
        options=PlannerOptions(time_limit_s=2),
    )
    small = loop.plan_once()
    rates[SMALL] = 200.0
    large = loop.plan_once()
    assert small is not None and large is not None
    assert sum(r.load_milli for r in large.replicas) > sum(r.load_milli for r in small.replicas)
    assert len(large.replicas) > len(small.replicas)


@pytest.mark.parametrize(
    ("text", "suffix"),
    [
        ("model,requests_per_second,min_replicas\nm,1.5,2\nm,0.5,\n", ".csv"),
        ("m: {requests_per_second: 2, min_replicas: 2}\n", ".yaml"),
    ],
)
def test_demand_files_give_loads_and_floors(tmp_path: Path, text: str, suffix: str) -> None:
    path = tmp_path / f"demand{suffix}"
    path.write_text(text)
    loads, floors = wants_as_loads(read_demand_file(path))
    assert loads["m"].requests_per_second == 2.0 and floors == {"m": 2}


def test_a_broken_demand_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "demand.csv"
    path.write_text("m,1\nm,-3\n")
    with pytest.raises(ValueError, match="line 2"):
        read_demand_file(path)
