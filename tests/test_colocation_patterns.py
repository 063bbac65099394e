"""Many distinct models: the solver searches the fullest ways to share a GPU instead of giving up on CP-SAT."""

from __future__ import annotations

import pytest

import policies.colocation.problem as problem_module
from policies.colocation import ServedModel, first_fit_decreasing, plan_colocation
from policies.colocation.problem import build_problem
from tests.test_colocation import FAST, h100s, spec


def _models() -> list[ServedModel]:
    # 3B models (5,722 MiB + 1,024): up to four of them share an H100 (max_replicas_per_gpu), one each 0.1 GPU.
    return [ServedModel(spec(f"m{i}", billions=3), 1) for i in range(8)]


def test_all_patterns_are_searched_when_they_are_few() -> None:
    problem = build_problem(_models(), h100s(2), FAST, [])
    assert problem.patterns_complete
    assert len(problem.patterns[0]) == 8 + 28 + 56 + 70  # every set of one to four of the eight models


def test_beyond_the_budget_the_fullest_are_kept_and_every_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(problem_module, "SOLVER_TERMS_PER_TYPE", 8 + 64 * 5)
    problem = build_problem(_models(), h100s(2), FAST, [])
    assert not problem.patterns_complete
    patterns = problem.patterns[0]
    assert sorted(p for p in patterns if len(p) == 1) == [(m,) for m in range(8)]
    assert [len(p) for p in patterns if len(p) > 1] == [4] * 5  # the fullest: four models each


def test_a_plan_from_some_patterns_claims_no_optimality(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(problem_module, "SOLVER_TERMS_PER_TYPE", 8 + 64 * 5)
    models = _models()
    fleet = h100s(2)
    greedy, _ = first_fit_decreasing(build_problem(models, fleet, FAST, []))
    plan = plan_colocation(models, fleet, FAST)
    assert plan.method == "cp-sat feasible"
    assert any("of the ways to share a GPU searched" in note for note in plan.notes)
    assert plan.gpus_used == 2 <= greedy.gpus_used()  # eight 0.1-GPU replicas, four to a GPU
    assert plan.lower_bound_per_hour == pytest.approx(8 * 0.1 / 0.9)  # the compute bound, not the solver's
    for served in models:
        assert sum(r.requests_per_second for r in plan.replicas_of(served.name)) >= 1 - 1e-6
