"""Prioritize finds its answer scored ahead (right after filter) when nothing changed in between, and it is the answer
a fresh computation gives; any change of state, policy, pod or names makes it compute again. Prioritize holds the
placement on the node it scores 10 until bind asks for it. Filter's verdicts, grouped by reason, are what reading the
evaluation node by node gives."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from policies.config import PlacementPolicy
from policies.engine import place_on_node
from policies.feasibility import REASON_TEXT, Reason, is_resolvable
from scheduler.binder import MemoryBinder
from scheduler.model import ClusterModel
from scheduler.service import UNKNOWN_NODE, BindError, PlacementService, RowLookup, ScoreCache
from tests.helpers import mig_node, node

MIG_PROFILES = ("1g.10gb", "2g.20gb", "3g.40gb")


def fleet() -> list:
    rng = random.Random(3)
    nodes = [node(f"t4-{i:02d}", gpus=rng.choice([1, 2, 4, 8]), cpu=rng.choice([16_000, 64_000])) for i in range(30)]
    nodes += [node(f"a100-{i:02d}", gpus=8, model="A100") for i in range(10)]
    nodes += [mig_node(f"mig-{i:02d}", gpus=2) for i in range(8)]
    nodes += [node(f"cpu-{i:02d}") for i in range(4)]
    return nodes


def pod(uid: str, rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["whole", "share", "mig", "cpu"])
    resources = {"cpu": f"{rng.choice([500, 2000, 8000])}m", "memory": "2Gi"}
    if kind == "whole":
        resources["nvidia.com/gpu"] = str(rng.choice([1, 2, 4]))
    elif kind == "share":
        resources["gpu-extender.io/gpu-milli"] = str(rng.choice([100, 250, 500, 700]))
    elif kind == "mig":
        resources[f"nvidia.com/mig-{rng.choice(MIG_PROFILES)}"] = "1"
    annotations = {"gpu-extender.io/gpu-types": "A100"} if rng.random() < 0.2 else {}
    if kind == "share" and rng.random() < 0.5:
        annotations["gpu-extender.io/gpu-memory"] = "2Gi"  # may run on borrowed idle capacity where allowed
    return {
        "metadata": {"name": uid, "namespace": "default", "uid": uid, "annotations": annotations},
        "spec": {"containers": [{"name": "c", "resources": {"requests": resources, "limits": resources}}]},
    }


def ask_gpus(p: dict[str, Any], count: int) -> None:
    """Make the pod ask for `count` whole GPUs and nothing else."""
    p["spec"]["containers"][0]["resources"] = {"requests": {"nvidia.com/gpu": str(count)}, "limits": {}}


def services(policy: PlacementPolicy | None = None) -> tuple[PlacementService, PlacementService]:
    """Two services over one model: one remembers prioritize answers, the other computes every answer afresh."""
    model = ClusterModel(policy or PlacementPolicy())
    model.replace_nodes(fleet())
    shape = model.snapshot().gpu_util.shape
    model.set_utilization(np.random.default_rng(2).uniform(0, 1, shape).astype(np.float32))
    model.mark_ready()
    cached = PlacementService(model, MemoryBinder(), confirm_on_bind=True)
    fresh = PlacementService(model, MemoryBinder(), confirm_on_bind=True)
    fresh.score_cache = ScoreCache(size=0)
    return cached, fresh


def filter_ahead(service: PlacementService, p: dict[str, Any], names: list[str]) -> list[str]:
    """What the HTTP layer does on filter: answer, then the work after the answer (`after_filter`)."""
    outcome = service.filter(p, names)
    service.after_filter(p, outcome)
    return outcome.passed


def prioritize(service: PlacementService, p: dict[str, Any], names: list[str]) -> list[tuple[str, int]]:
    """What the HTTP layer does on prioritize (which holds the best placement before it answers)."""
    scores = service.prioritize(p, names)
    return scores


def best_of(scores: list[tuple[str, int]]) -> str:
    return max(scores, key=lambda hs: hs[1])[0]


def bind(service: PlacementService, p: dict[str, Any], node: str):  # type: ignore[no-untyped-def]
    return service.bind("default", p["metadata"]["name"], p["metadata"]["uid"], node)


def prioritize_afresh(
    cached: PlacementService, fresh: PlacementService, p: dict[str, Any], names: list[str]
) -> list[tuple[str, int]]:
    """Prioritize on `cached`, which must compute the answer rather than find it, and check that it is the answer
    a service without a cache gives (each prioritize gives back what the pod held before deciding)."""
    misses = cached.score_cache.misses
    answer = prioritize(cached, p, names)
    assert cached.score_cache.misses == misses + 1
    assert answer == prioritize(fresh, p, names)
    return answer


POLICIES = {
    "default": {},
    "linear": {"extenderScoring": {"mode": "linear"}},
    "exact-fragmentation": {"fragmentationScoring": {"mode": "exact"}},
    "overcommit-borrow": {"overcommit": {"enabled": True, "prefer": "borrow"}},
    "overcommit-allocation": {"overcommit": {"enabled": True, "prefer": "allocation"}},
}


@pytest.mark.parametrize("name", POLICIES)
def test_prioritize_scored_ahead_equals_a_fresh_one(name: str) -> None:
    try:
        policy = PlacementPolicy.model_validate(POLICIES[name])
    except ValidationError:
        pytest.skip(f"this policy schema has no {name}")
    cached, fresh = services(policy)
    model = cached.model
    rng = random.Random(11)
    names = list(model.snapshot().names)
    hits = planned = 0
    for i in range(150):
        p = pod(f"p{i}", rng)
        candidates = rng.sample(names, 30) + (["ghost"] if i % 7 == 0 else [])
        passed = filter_ahead(cached, p, candidates)
        assert fresh.filter(p, candidates).passed == passed
        before = cached.score_cache.hits
        scores = prioritize(cached, p, passed)
        hits += cached.score_cache.hits - before
        # Each prioritize gives back what the pod held and holds its best again: the answers stay comparable.
        assert scores == prioritize(fresh, p, passed)
        assert prioritize(cached, p, candidates) == prioritize(fresh, p, candidates)
        if passed:
            best = best_of(scores)
            model.release_assumed(p["metadata"]["uid"])
            expected, _ = place_on_node(model.snapshot(), cached.demand(p), best, model.policy, model.shapes())
            prioritize(cached, p, passed)
            before = cached.score_cache.planned_hits
            assert bind(cached, p, best) == expected
            planned += cached.score_cache.planned_hits - before
    assert hits > 50 and fresh.score_cache.hits == 0
    assert planned > 50, "binds should mostly take the placement held since prioritize"


def test_a_bind_in_between_invalidates() -> None:
    cached, fresh = services()
    rng = random.Random(5)
    names = list(cached.model.snapshot().names)
    first, second = pod("first", rng), pod("second", rng)
    ask_gpus(first, 1)
    ask_gpus(second, 8)
    passed = filter_ahead(cached, second, names)
    assert len(passed) > 1
    entry = cached.score_cache.get("second")
    assert entry is not None
    top = best_of(list(entry.answer))
    # Another pod takes a GPU on the node `second` would prefer: its answer must change, not come from the cache.
    cached.filter(first, [top])
    bind(cached, first, top)
    after = prioritize_afresh(cached, fresh, second, passed)
    assert dict(after)[top] != 10


def test_a_stale_plan_is_decided_again_at_bind() -> None:
    cached, _ = services(PlacementPolicy.model_validate({"extenderScoring": {"assumeBest": False}}))
    names = list(cached.model.snapshot().names)
    first, second = pod("first", random.Random(5)), pod("second", random.Random(5))
    ask_gpus(first, 1)
    ask_gpus(second, 8)
    passed = filter_ahead(cached, second, names)
    top = best_of(prioritize(cached, second, passed))
    assert cached.model.assignment_of("second") is None, "nothing is held without assumeBest"
    cached.filter(first, [top])
    bind(cached, first, top)
    planned = cached.score_cache.planned_hits
    with pytest.raises(BindError, match="no longer fits"):  # the plan made before is stale: decided again
        bind(cached, second, top)
    assert cached.score_cache.planned_hits == planned


def test_prioritize_holds_the_best_placement_until_bind_takes_it() -> None:
    cached, _ = services()
    model = cached.model
    names = list(model.snapshot().names)
    p, other = pod("p", random.Random(2)), pod("other", random.Random(3))
    ask_gpus(p, 8)
    ask_gpus(other, 8)
    best = best_of(prioritize(cached, p, filter_ahead(cached, p, names)))
    held = model.assignment_of("p")
    assert held is not None and held.node == best and len(held.gpus) == 8
    assert best not in cached.filter(other, names).passed, "the held GPUs are not offered to the next pod"
    generation = model.snapshot().generation
    assert bind(cached, p, best) == held
    assert model.snapshot().generation == generation, "taking the held placement changes nothing"


def test_a_bind_elsewhere_gives_the_held_placement_back() -> None:
    cached, _ = services()
    model = cached.model
    names = list(model.snapshot().names)
    p = pod("p", random.Random(2))
    ask_gpus(p, 8)
    scores = prioritize(cached, p, filter_ahead(cached, p, names))
    best = best_of(scores)
    elsewhere = next(name for name, score in scores if name != best)
    assert bind(cached, p, elsewhere).node == elsewhere
    free = model.snapshot().gpu_free[model.snapshot().index[best]]
    assert (free[: len(model.snapshot().inventories[model.snapshot().index[best]].gpus)] == 1000).all()


def test_a_retried_pod_is_not_charged_for_what_it_held() -> None:
    cached, _ = services()
    names = list(cached.model.snapshot().names)
    p = pod("p", random.Random(2))
    ask_gpus(p, 8)
    first = cached.filter(p, names)
    prioritize(cached, p, first.passed)
    assert cached.model.assignment_of("p") is not None
    again = cached.filter(p, names)  # the scheduler did not bind it and tries again
    assert cached.model.assignment_of("p") is None
    assert (again.passed, again.failed) == (first.passed, first.failed)


def test_a_held_placement_the_scheduler_never_binds_expires() -> None:
    now = [0.0]
    policy = PlacementPolicy.model_validate({"reservations": {"assumedTtlSeconds": 5}})
    model = ClusterModel(policy, clock=lambda: now[0])
    model.replace_nodes(fleet())
    model.mark_ready()
    service = PlacementService(model, MemoryBinder(), confirm_on_bind=True)
    p = pod("p", random.Random(2))
    ask_gpus(p, 1)
    prioritize(service, p, filter_ahead(service, p, list(model.snapshot().names)))
    now[0] = 4.0
    assert model.expire_reservations() == []
    now[0] = 5.5
    assert model.expire_reservations() == ["p"] and model.assignment_of("p") is None


def test_policy_or_pod_change_invalidates() -> None:
    cached, _ = services()
    names = list(cached.model.snapshot().names)
    p = pod("p", random.Random(7))
    ask_gpus(p, 1)
    passed = filter_ahead(cached, p, names)
    cached.model.set_policy(PlacementPolicy.model_validate({"extenderScoring": {"mode": "linear"}}))
    misses = cached.score_cache.misses
    prioritize(cached, p, passed)
    assert cached.score_cache.misses == misses + 1
    ask_gpus(p, 2)  # same UID
    prioritize(cached, p, passed)
    assert cached.score_cache.misses == misses + 2
    passed = filter_ahead(cached, p, names)  # the next attempt for the pod: scored ahead again
    prioritize(cached, p, passed)
    assert cached.score_cache.misses == misses + 2


def test_other_names_are_computed_afresh() -> None:
    cached, fresh = services()
    names = list(cached.model.snapshot().names)
    p = pod("p", random.Random(9))
    ask_gpus(p, 1)
    passed = filter_ahead(cached, p, names)
    prioritize_afresh(cached, fresh, p, passed[::2])


def test_a_single_passed_node_is_not_scored_ahead() -> None:
    cached, _ = services()
    filter_ahead(cached, pod("p", random.Random(1)), ["t4-00"])  # kube-scheduler will not ask prioritize
    assert cached.score_cache.misses == 0 and len(cached.score_cache) == 0


def test_the_cache_is_bounded() -> None:
    cached, _ = services()
    cached.score_cache = cache = ScoreCache(size=4)
    rng = random.Random(1)
    names = list(cached.model.snapshot().names)[:10]
    for i in range(20):
        p = pod(f"p{i}", rng)
        ask_gpus(p, 1)
        filter_ahead(cached, p, names)
    assert len(cache) == 4
    assert cache.get("p19") is not None and cache.get("p0") is None


def test_changes_to_other_nodes_keep_the_answer_and_it_stays_exact() -> None:
    cached, fresh = services()
    rng = random.Random(11)
    names = list(cached.model.snapshot().names)
    p = pod("p", rng)
    ask_gpus(p, 1)
    passed = filter_ahead(cached, p, names[:20])
    elsewhere = pod("elsewhere", rng)
    ask_gpus(elsewhere, 1)
    outside = next(n for n in names[20:] if cached.filter(elsewhere, [n]).passed)
    bind(cached, elsewhere, outside)  # a change, but not to a scored node
    hits = cached.score_cache.hits
    assert prioritize(cached, p, passed) == prioritize(fresh, p, passed)
    assert cached.score_cache.hits == hits + 1
    cached.model.release_assumed("p")
    cached.model.set_utilization(cached.model.snapshot().gpu_util * 0.5)  # telemetry touches every node
    prioritize_afresh(cached, fresh, p, passed)


def test_filter_verdicts_are_the_per_node_reading_of_the_evaluation() -> None:
    cached, _ = services()
    rng = random.Random(4)
    names = list(cached.model.snapshot().names)
    for i in range(40):
        p = pod(f"v{i}", rng)
        asked = [*rng.sample(names, 25), "ghost", names[0], names[0]]
        outcome = cached.filter(p, asked)
        decision = cached._evaluate(p, asked, score=False, reuse=False)
        passed, failed, unresolvable, reasons = [], {}, {}, Counter()
        for name, code in zip(decision.known, decision.evaluation.reasons.tolist(), strict=True):
            if code == Reason.FITS:
                passed.append(name)
                continue
            text = REASON_TEXT[Reason(code)]
            (failed if is_resolvable(Reason(code)) else unresolvable)[name] = text
            reasons[text] += 1
        for name in decision.unknown:
            unresolvable[name] = UNKNOWN_NODE
            reasons[UNKNOWN_NODE] += 1
        assert (outcome.passed, outcome.failed, outcome.unresolvable, outcome.reasons) == (
            passed,
            failed,
            unresolvable,
            reasons,
        )


def test_row_lookup_reuses_an_equal_list_until_the_node_set_changes() -> None:
    model = ClusterModel(PlacementPolicy())
    model.replace_nodes(fleet()[:5])
    lookup = RowLookup()
    names = ["t4-01", "ghost", "t4-00"]
    rows, unknown = lookup.lookup(model.snapshot(), list(names))
    assert rows.tolist() == [1, 0] and unknown == ["ghost"]
    assert lookup.lookup(model.snapshot(), list(names))[0] is rows, "an equal list, parsed afresh, is not looked up"
    model.replace_nodes([node("ghost", gpus=1), *fleet()[:5]])
    rows, unknown = lookup.lookup(model.snapshot(), list(names))
    assert rows.tolist() == [2, 0, 1] and unknown == []
