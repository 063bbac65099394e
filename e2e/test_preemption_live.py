"""Preemption through the real kube-scheduler, with PriorityClasses: a high-priority GPU pod evicts only what it
needs, on the node where that is least.

kube-scheduler proposes victims by counting `nvidia.com/gpu` and knows nothing of GPU shares; the extender's
preempt verb narrows the proposal with which GPU each pod holds. Three full nodes of four GPUs:

- `many`: four 1-GPU pods (priority 10). Two must go.
- `least`: one 2-GPU pod (priority 10) and two 1-GPU pods (priority 100). One must go, the 2-GPU pod.
- `trap`: a half-GPU share (priority 100) and three 1-GPU pods (priority 1). By kube-scheduler's count one victim
  frees the two GPUs asked (it does not see the share), and the lowest priority makes it its choice; but the share
  holds part of the fourth GPU, so evicting one pod frees one whole GPU. The extender refuses the node.

The pod of priority 1000 asking for two GPUs must evict the 2-GPU pod on `least` and nothing else, and be bound to
the GPUs it freed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest

from e2e import fleet, helpers
from e2e.controlplane import ControlPlane
from e2e.helpers import PodWatch, Stack, gpu_pod
from scheduler.kubeapi import ApiError, read_json
from scheduler.service import UNKNOWN_NODE

pytestmark = pytest.mark.e2e

NS = "preemption"
POOL = "preempt"
A100 = "NVIDIA-A100-SXM4-80GB"
PRIORITIES = {"pe-low": 1, "pe-mid": 10, "pe-keep": 100, "pe-high": 1000}
PRIORITY_CLASSES = "/apis/scheduling.k8s.io/v1/priorityclasses"
HOSTNAME = "kubernetes.io/hostname"


@pytest.fixture(scope="module")
def system(control_plane: ControlPlane, api_client: kubernetes.client.ApiClient) -> Iterator[Stack]:
    helpers.create_namespace(api_client, NS)
    for name, value in PRIORITIES.items():
        body = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}}
        try:
            read_json(api_client, "POST", PRIORITY_CLASSES, body={**body, "value": value})
        except ApiError as exc:
            if exc.status != 409:
                raise
    running = Stack.start(control_plane, api_client)
    yield running
    running.stop()
    helpers.delete_pods(api_client, NS)
    for name in PRIORITIES:
        read_json(api_client, "DELETE", f"{PRIORITY_CLASSES}/{name}")


def pinned(name: str, node: str, resources: dict[str, str], priority: str) -> dict[str, Any]:
    """A pod of the pool on one node, with a priority class."""
    pod = gpu_pod(name, NS, POOL, resources)
    pod["spec"]["nodeSelector"][HOSTNAME] = node
    pod["spec"]["priorityClassName"] = priority
    return pod


def place(system: Stack, watch: PodWatch, pods: list[dict[str, Any]]) -> None:
    """Create the pods one at a time, each bound before the next (so the share takes its GPU first)."""
    for pod in pods:
        helpers.create_pod(system.api, pod)
        watch.bound([pod["metadata"]["name"]], timeout_s=30)


def test_a_high_priority_pod_evicts_only_what_it_needs_where_that_is_least(system: Stack) -> None:
    nodes = [fleet.gpu_node(f"pe-{role}", 4, A100) for role in ("many", "least", "trap")]
    names = fleet.create_nodes(system.api, helpers.pool_nodes(nodes, POOL))
    probe = gpu_pod("probe", NS, POOL, {"nvidia.com/gpu": "1"})

    def known() -> bool:
        body = {"Pod": probe, "NodeNames": names}
        verdicts = helpers.http_post_json(f"{system.extender.url}/explain", body)["nodes"]
        return all(v["reason"] != UNKNOWN_NODE for v in verdicts)

    try:
        with PodWatch(system.api, NS) as watch:
            helpers.wait_for(known, "the extender to see the nodes", 30)
            one = {"nvidia.com/gpu": "1"}
            place(system, watch, [pinned(f"pe-m{i}", "pe-many", one, "pe-mid") for i in range(4)])
            place(system, watch, [pinned("pe-big", "pe-least", {"nvidia.com/gpu": "2"}, "pe-mid")])
            place(system, watch, [pinned(f"pe-k{i}", "pe-least", one, "pe-keep") for i in range(2)])
            place(system, watch, [pinned("pe-share", "pe-trap", {"gpu-extender.io/gpu-milli": "500"}, "pe-keep")])
            place(system, watch, [pinned(f"pe-t{i}", "pe-trap", one, "pe-low") for i in range(3)])
            before = watch.snapshot()
            held = {name: helpers.assignment_of(pod) for name, pod in before.items()}
            assert all(held.values()), "every pod carries its assignment"
            metrics = system.extender.metrics()

            # The extender's own verdict on kube-scheduler's proposal for `trap` and `least`.
            uid = {name: pod["metadata"]["uid"] for name, pod in before.items()}
            high = gpu_pod("pe-high", NS, POOL, {"nvidia.com/gpu": "2"})
            high["spec"]["priorityClassName"] = "pe-high"
            proposal = {"pe-trap": ["pe-t2"], "pe-least": ["pe-big"], "pe-many": ["pe-m3", "pe-m2"]}
            body = {
                "Pod": high,
                "NodeNameToMetaVictims": {
                    node: {"Pods": [{"UID": uid[v]} for v in victims], "NumPDBViolations": 0}
                    for node, victims in proposal.items()
                },
            }
            answer = helpers.http_post_json(f"{system.extender.url}/preempt", body)["NodeNameToMetaVictims"]
            assert sorted(answer) == ["pe-least", "pe-many"], f"the trap node must be refused: {answer}"

            helpers.create_pod(system.api, high)
            bound = watch.bound(["pe-high"], timeout_s=60)
            assert bound["pe-high"] == "pe-least"
            evicted = {name for name in before if name not in watch.snapshot()}
            assert evicted == {"pe-big"}, f"evicted {sorted(evicted)}"
            after = watch.snapshot()
            for name, pod in after.items():
                if name != "pe-high":
                    assert helpers.assignment_of(pod) == held[name], f"{name} moved"
            placed = helpers.assignment_of(after["pe-high"])
            big = held["pe-big"]
            assert placed is not None and big is not None
            assert sorted(placed["gpus"]) == sorted(big["gpus"]), "the pod takes the GPUs its victim freed"
            grew = functools.partial(helpers.grown, metrics, system.extender.metrics())
            assert (
                grew('gpu_extender_decisions_total{outcome="ok",verb="preempt"}') >= 2
            )  # ours above, and the scheduler's
            ledger = helpers.book(list(after.values()))
            assert not ledger.problems, ledger.problems
    finally:
        helpers.delete_pods(system.api, NS, f"{helpers.POOL_LABEL}={POOL}")
        helpers.delete_nodes(system.api, names)
