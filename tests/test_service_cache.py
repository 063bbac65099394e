"""Prioritize finds its answer scored ahead (right after filter) when nothing changed in between, and it is the answer
a fresh computation gives; any change of state, policy, pod or names makes it compute again. Filter's verdicts,
grouped by reason, are what reading the evaluation node by node gives."""

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
from scheduler.service import UNKNOWN_NODE, BindError, PlacementService, ScoreCache
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


def schedule(service: PlacementService, p: dict[str, Any], names: list[str]) -> list[str]:
    """What kube-scheduler and the HTTP layer do: filter, score ahead, prioritize, bind to the best."""
    passed = service.filter(p, names).passed
    service.prepare_prioritize(p, passed)
    if passed:
        best = max(service.prioritize(p, passed), key=lambda hs: hs[1])[0]
        service.bind("default", p["metadata"]["name"], p["metadata"]["uid"], best)
    return passed


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
    rng = random.Random(11)
    names = list(cached.model.snapshot().names)
    hits = planned = 0
    for i in range(150):
        p = pod(f"p{i}", rng)
        candidates = rng.sample(names, 30) + (["ghost"] if i % 7 == 0 else [])
        passed = cached.filter(p, candidates).passed
        assert passed == fresh.filter(p, candidates).passed
        cached.prepare_prioritize(p, passed)
        before = cached.score_cache.hits
        scores = cached.prioritize(p, passed)
        hits += cached.score_cache.hits - before
        assert scores == fresh.prioritize(p, passed)
        assert cached.prioritize(p, candidates) == fresh.prioritize(p, candidates)
        if passed:
            best = max(scores, key=lambda hs: hs[1])[0]
            model = cached.model
            expected, _ = place_on_node(model.snapshot(), cached.demand(p), best, model.policy, model.shapes())
            before = cached.score_cache.planned_hits
            assert cached.bind("default", p["metadata"]["name"], p["metadata"]["uid"], best) == expected
            planned += cached.score_cache.planned_hits - before
    assert hits > 50 and fresh.score_cache.hits == 0
    assert planned > 50, "binds should mostly take the placement planned when scoring"


def test_a_bind_in_between_invalidates() -> None:
    cached, fresh = services()
    rng = random.Random(5)
    names = list(cached.model.snapshot().names)
    first, second = pod("first", rng), pod("second", rng)
    ask_gpus(first, 1)
    ask_gpus(second, 8)
    passed = cached.filter(second, names).passed
    cached.prepare_prioritize(second, passed)
    assert len(passed) > 1
    before = dict(cached.prioritize(second, passed))
    top = max(before, key=before.__getitem__)
    # Another pod takes a GPU on the node `second` preferred: its answer must change, not come from the cache.
    misses = cached.score_cache.misses
    cached.filter(first, [top])
    cached.bind("default", "first", "first", top)
    planned = cached.score_cache.planned_hits
    with pytest.raises(BindError, match="no longer fits"):  # the plan made before is stale: decided again
        cached.bind("default", "second", "second", top)
    assert cached.score_cache.planned_hits == planned
    after = cached.prioritize(second, passed)
    assert cached.score_cache.misses == misses + 1
    assert after == fresh.prioritize(second, passed)
    assert dict(after)[top] != 10


def test_policy_or_pod_change_invalidates() -> None:
    cached, _ = services()
    names = list(cached.model.snapshot().names)
    p = pod("p", random.Random(7))
    ask_gpus(p, 1)
    passed = cached.filter(p, names).passed
    cached.prepare_prioritize(p, passed)
    cached.model.set_policy(PlacementPolicy.model_validate({"extenderScoring": {"mode": "linear"}}))
    misses = cached.score_cache.misses
    cached.prioritize(p, passed)
    assert cached.score_cache.misses == misses + 1
    ask_gpus(p, 2)  # same UID
    cached.prioritize(p, passed)
    assert cached.score_cache.misses == misses + 2
    cached.prioritize(p, passed)
    assert cached.score_cache.misses == misses + 2


def test_other_names_are_computed_afresh() -> None:
    cached, fresh = services()
    names = list(cached.model.snapshot().names)
    p = pod("p", random.Random(9))
    ask_gpus(p, 1)
    passed = cached.filter(p, names).passed
    cached.prepare_prioritize(p, passed)
    subset = passed[::2]
    misses = cached.score_cache.misses
    assert cached.prioritize(p, subset) == fresh.prioritize(p, subset)
    assert cached.score_cache.misses == misses + 1


def test_a_single_passed_node_is_not_scored_ahead() -> None:
    cached, _ = services()
    cached.prepare_prioritize(pod("p", random.Random(1)), ["t4-00"])  # kube-scheduler will not ask prioritize
    assert cached.score_cache.misses == 0 and len(cached.score_cache) == 0


def test_the_cache_is_bounded() -> None:
    cached, _ = services()
    cached.score_cache = cache = ScoreCache(size=4)
    rng = random.Random(1)
    names = list(cached.model.snapshot().names)[:10]
    for i in range(20):
        cached.prepare_prioritize(pod(f"p{i}", rng), names)
    assert len(cache) == 4
    assert cache.get("p19") is not None and cache.get("p0") is None


def test_changes_to_other_nodes_keep_the_answer_and_it_stays_exact() -> None:
    cached, fresh = services()
    rng = random.Random(11)
    names = list(cached.model.snapshot().names)
    p = pod("p", rng)
    ask_gpus(p, 1)
    passed = [n for n in cached.filter(p, names[:20]).passed]
    cached.prepare_prioritize(p, passed)
    elsewhere = pod("elsewhere", rng)
    ask_gpus(elsewhere, 1)
    outside = next(n for n in names[20:] if cached.filter(elsewhere, [n]).passed)
    cached.bind("default", "elsewhere", "elsewhere", outside)  # a change, but not to a scored node
    hits = cached.score_cache.hits
    assert cached.prioritize(p, passed) == fresh.prioritize(p, passed)
    assert cached.score_cache.hits == hits + 1
    cached.model.set_utilization(cached.model.snapshot().gpu_util * 0.5)  # telemetry touches every node
    misses = cached.score_cache.misses
    assert cached.prioritize(p, passed) == fresh.prioritize(p, passed)
    assert cached.score_cache.misses == misses + 1


def test_filter_verdicts_are_the_per_node_reading_of_the_evaluation() -> None:
    cached, _ = services()
    rng = random.Random(4)
    names = list(cached.model.snapshot().names)
    for i in range(40):
        p = pod(f"v{i}", rng)
        asked = [*rng.sample(names, 25), "ghost", names[0], names[0]]
        outcome = cached.filter(p, asked)
        decision = cached._evaluate(p, asked, score=False)
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
