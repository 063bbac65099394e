"""Filter's shortlist: only the best-scored feasible nodes pass, best first, and the best one's placement is held
until bind. With a shortlist of one, kube-scheduler binds the only node it is given without asking prioritize, so
that node must be the one prioritize would have scored 10, and the placement the same."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from policies.config import PlacementPolicy
from policies.engine import top_positions
from scheduler.service import PlacementService
from tests.test_service_cache import POLICIES, ask_gpus, best_of, bind, pod, prioritize, services


def service(policy: dict, shortlist: int) -> PlacementService:
    """A service over its own model of the test fleet, with `policy` and this shortlist."""
    document = {**policy, "extenderScoring": {**policy.get("extenderScoring", {}), "shortlist": shortlist}}
    cached, _ = services(PlacementPolicy.model_validate(document))
    return cached


@pytest.mark.parametrize("name", POLICIES)
def test_a_shortlist_of_one_is_prioritizes_best_with_the_same_placement(name: str) -> None:
    short, full = service(POLICIES[name], 1), service(POLICIES[name], 0)
    rng = random.Random(17)
    names = list(full.model.snapshot().names)
    shortlisted = 0
    for i in range(150):
        p = pod(f"p{i}", rng)
        uid = p["metadata"]["uid"]
        candidates = rng.sample(names, 30)
        expected = full.filter(p, candidates)
        outcome = short.filter(p, candidates)
        short.after_filter(p, outcome)  # as the extender does once the answer is sent
        assert outcome.reasons == expected.reasons
        if expected.passed:  # kube-scheduler binds what passed: the rejected nodes are counted, not listed
            assert not outcome.failed and not outcome.unresolvable
        else:
            assert (outcome.failed, outcome.unresolvable) == (expected.failed, expected.unresolvable)
        if len(expected.passed) <= 1:
            assert outcome.passed == expected.passed
            if outcome.passed:  # kube-scheduler binds a lone node without prioritize; filter held its placement
                assert bind(short, p, outcome.passed[0]) == bind(full, p, outcome.passed[0])
            continue
        shortlisted += 1
        best = best_of(prioritize(full, p, expected.passed))
        assert outcome.passed == [best]
        held = short.model.assignment_of(uid)
        assert held is not None and held == full.model.assignment_of(uid)
        assert bind(short, p, best) == bind(full, p, best) == held
    assert shortlisted > 50
    assert short.model.assignments() == full.model.assignments()


def test_a_longer_shortlist_keeps_the_best_in_order_and_prioritize_agrees() -> None:
    short = service({}, 3)
    names = list(short.model.snapshot().names)
    p = pod("p", random.Random(4))
    ask_gpus(p, 1)
    raw = {e["node"]: e["raw"] for e in short.explain(p, names) if e["fits"]}
    expected = sorted((name for name in names if name in raw), key=lambda name: -raw[name])[:3]
    outcome = short.filter(p, names)
    assert outcome.passed == expected and len(raw) > 3
    assert short.model.assignment_of("p") is None, "prioritize, which is called next, holds the best"
    short.after_filter(p, outcome)
    hits = short.score_cache.hits
    assert best_of(prioritize(short, p, outcome.passed)) == expected[0]
    assert short.score_cache.hits == hits + 1, "prioritize over the shortlist was scored ahead"
    assert short.model.assignment_of("p").node == expected[0]  # type: ignore[union-attr]


def test_a_pod_that_fits_nowhere_still_gets_every_nodes_reason() -> None:
    short = service({}, 1)
    names = list(short.model.snapshot().names)
    p = pod("huge", random.Random(1))
    ask_gpus(p, 16)
    outcome = short.filter(p, names)
    assert outcome.passed == []
    assert set(outcome.failed) | set(outcome.unresolvable) == set(names)
    assert short.model.assignment_of("huge") is None


def test_a_shortlist_answers_only_the_nodes_it_passes() -> None:
    short, full = service({}, 1), service({}, 0)
    names = list(full.model.snapshot().names)
    p = pod("p", random.Random(4))
    ask_gpus(p, 1)
    outcome, expected = short.filter(p, names), full.filter(p, names)
    assert expected.failed or expected.unresolvable, "the fleet has nodes this pod cannot use"
    assert len(expected.passed) > 1 and len(outcome.passed) == 1 and outcome.passed[0] in expected.passed
    assert (outcome.failed, outcome.unresolvable) == ({}, {})
    assert outcome.reasons == expected.reasons  # still counted for the metrics and the log


def test_without_assume_best_a_shortlist_holds_nothing() -> None:
    short = service({"extenderScoring": {"assumeBest": False}}, 1)
    p = pod("p", random.Random(4))
    ask_gpus(p, 1)
    outcome = short.filter(p, list(short.model.snapshot().names))
    short.after_filter(p, outcome)
    (best,) = outcome.passed
    assert short.model.assignment_of("p") is None
    assert bind(short, p, best).node == best


def test_top_positions_orders_by_score_then_by_the_tie_order() -> None:
    scores = np.array([1.0, 3.0, 2.0, 3.0, -np.inf])
    assert top_positions(scores, 1).tolist() == [1]
    assert top_positions(scores, 3).tolist() == [1, 3, 2]
    assert top_positions(scores, 9).tolist() == [1, 3, 2, 0, 4]
    rows = np.array([7, 9, 4, 2, 0])  # ties by this order instead: position 3 (row 2) before position 1 (row 9)
    assert top_positions(scores, 1, rows).tolist() == [3]
    assert top_positions(scores, 3, rows).tolist() == [3, 1, 2]
    assert top_positions(np.array([]), 1).tolist() == []


def test_filter_asked_again_for_the_same_pod_holds_one_placement() -> None:
    short = service({}, 1)
    names = list(short.model.snapshot().names)
    p = pod("p", random.Random(4))
    ask_gpus(p, 2)
    outcome = short.filter(p, names)
    assert short.model.assignment_of("p") is not None, "the placement is held before the answer is sent"
    short.after_filter(p, outcome)
    first = outcome.passed
    free = int(short.model.snapshot().gpu_free.sum())
    outcome = short.filter(p, names)  # the scheduler retried the pod before binding it
    short.after_filter(p, outcome)
    again = outcome.passed
    assert again == first
    assert int(short.model.snapshot().gpu_free.sum()) == free, "the pod's earlier hold was given back first"
    assert short.model.assignment_of("p").node == first[0]  # type: ignore[union-attr]


def test_ties_go_to_the_same_node_whatever_order_the_names_come_in() -> None:
    """On an idle fleet the ten A100 nodes tie for a one-GPU pod that asks for an A100. kube-scheduler lists the
    nodes its parallel filters passed in no fixed order; the choice is the first of them in the cluster's node
    order all the same, in filter's shortlist, prioritize's 10 and explain's first verdict."""
    rng = random.Random(5)
    a100 = [f"a100-{i:02d}" for i in range(10)]
    for k in range(6):
        short, full = service({}, 1), service({}, 0)  # afresh each time: nothing held from the last pod
        p = pod(f"p{k}", rng)
        ask_gpus(p, 1)
        p["metadata"]["annotations"] = {"gpu-extender.io/gpu-types": "A100"}
        names = rng.sample(a100, len(a100))
        assert short.filter(p, names).passed == ["a100-00"], names
        assert best_of(prioritize(full, p, names)) == "a100-00"
        assert full.explain(p, names)[0]["node"] == "a100-00"


def test_a_policy_reloaded_during_filter_does_not_break_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy file may change between any two reads: filter decides under the one view it read."""
    short = service({}, 1)
    without = PlacementPolicy.model_validate({"extenderScoring": {"shortlist": 0}})
    reads = iter([replace(short.model.view(), policy=without)])  # the reload lands right after filter's first read
    monkeypatch.setattr(type(short.model), "view", lambda model: next(reads, model._view))
    p = pod("p", random.Random(5))
    ask_gpus(p, 1)
    names = list(short.model.snapshot().names)
    outcome = short.filter(p, names)
    assert len(outcome.passed) > 1 and not outcome.shortlisted, "decided under the policy read first"
    assert outcome.decision is not None and outcome.decision.view.policy is without
