"""Herd control: with `coldLoads.maxPerNode`, a serving replica does not go to a node where that many replicas are
still loading; a replica that turns Ready frees its node's turn; other pods are not limited."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from policies.config import PlacementPolicy
from policies.engine import place_on_node
from policies.feasibility import REASON_TEXT, Reason
from policies.state import ConflictError
from scheduler.binder import MemoryBinder
from scheduler.model import ClusterModel
from scheduler.service import PlacementService
from scheduler.watch import project_pod
from tests.test_plan_following import SMALL, h100_node, schedule, serving_pod

LOADING = REASON_TEXT[Reason.COLD_LOADS]


def herd_service(max_per_node: int) -> PlacementService:
    model = ClusterModel(PlacementPolicy.model_validate({"coldLoads": {"maxPerNode": max_per_node}}))
    model.replace_nodes([h100_node("h-0"), h100_node("h-1")])
    model.mark_ready()
    return PlacementService(model, MemoryBinder(), confirm_on_bind=True)


def test_one_load_per_node_at_a_time_until_one_is_ready() -> None:
    service = herd_service(1)
    first = schedule(service, serving_pod("a", SMALL))
    second = schedule(service, serving_pod("b", SMALL))
    assert {first.node, second.node} == {"h-0", "h-1"} and first.starting and second.starting
    third = serving_pod("c", SMALL)
    outcome = service.filter(third, ["h-0", "h-1"])
    assert (
        outcome.passed == [] and outcome.failed == {} and outcome.unresolvable == dict.fromkeys(["h-0", "h-1"], LOADING)
    )
    # The first replica turns Ready (the watch reports it): its node takes the next load.
    service.model.pod_bound("a", replace(first, starting=False), service.demand(serving_pod("a", SMALL)))
    assert service.model.snapshot().serving_starting.tolist()[:2] == ([0, 1] if first.node == "h-0" else [1, 0])
    assert schedule(service, third).node == first.node


def test_pods_without_a_model_and_an_unlimited_policy_are_not_held_back() -> None:
    limited, unlimited = herd_service(1), herd_service(0)
    for i in range(4):
        schedule(unlimited, serving_pod(f"s-{i}", SMALL))
        schedule(limited, serving_pod(f"plain-{i}", None))
    assert int(unlimited.model.snapshot().serving_starting.sum()) == 4
    assert int(limited.model.snapshot().serving_starting.sum()) == 0


def _bound_pod(ready: bool, model: str | None = SMALL) -> dict[str, Any]:
    pod = serving_pod("p", model)
    pod["spec"]["nodeName"] = "h-0"
    pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return pod


@pytest.mark.parametrize("ready", [False, True])
def test_the_watch_reads_a_serving_pods_readiness(ready: bool) -> None:
    record = project_pod(_bound_pod(ready))
    assert record is not None and record.starting is not ready and record.assignment.starting is not ready
    assert record.assignment.model == SMALL
    other = project_pod(_bound_pod(not ready))
    assert other is not None and other != record  # a readiness change is an update the model applies


def test_a_pod_without_a_model_never_counts_as_loading() -> None:
    record = project_pod(_bound_pod(False, model=None))
    assert record is not None and not record.starting and record.assignment.model is None


def test_a_hold_decided_before_another_pods_hold_is_refused_when_it_would_exceed_the_limit() -> None:
    """Two placements decided from the same snapshot (a bind's own decision racing another pod's filter): the
    model takes the first load on the node and refuses the second, at assume and at reserve alike."""
    service = herd_service(1)
    view = service.model.view()
    demand = service.demand(serving_pod("a", SMALL))
    placed, _ = place_on_node(view.snapshot, demand, "h-0", view.policy, view.shapes)
    assert placed is not None and placed.starting
    assert service.model.assume("a", placed)
    assert not service.model.assume("b", placed)
    with pytest.raises(ConflictError, match="already loading"):
        service.model.reserve("c", placed)
    assert int(service.model.snapshot().serving_starting.sum()) == 1


def test_one_models_loads_are_limited_across_the_fleet_even_from_reused_evaluations() -> None:
    model = ClusterModel(PlacementPolicy.model_validate({"coldLoads": {"maxPerModel": 1}}))
    model.replace_nodes([h100_node("h-0"), h100_node("h-1"), h100_node("h-2")])
    model.mark_ready()
    service = PlacementService(model, MemoryBinder(), confirm_on_bind=True)
    names = ["h-0", "h-1", "h-2"]
    assert len(service.filter(serving_pod("warm-up", SMALL), names).passed) == 3  # per-node results now cached
    first = schedule(service, serving_pod("a", SMALL))
    refused = service.filter(serving_pod("b", SMALL), names)
    assert refused.passed == [] and set(refused.unresolvable.values()) == {REASON_TEXT[Reason.MODEL_LOADS]}
    assert schedule(service, serving_pod("q", "Qwen/Qwen2.5-7B-Instruct")).starting  # another model loads freely
    service.model.pod_bound("a", replace(first, starting=False), service.demand(serving_pod("a", SMALL)))
    assert schedule(service, serving_pod("b", SMALL)).starting
