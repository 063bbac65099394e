"""The replica-count menu: stage 1 of the planner already gives every replica of a model the same load."""

from __future__ import annotations

import numpy as np

from policies.colocation import FleetGpu, PlannerOptions, ServedModel, plan_colocation
from policies.colocation.aggregate import Aggregate
from policies.colocation.greedy import first_fit_decreasing
from policies.colocation.menu import follows_menu, replica_menu
from policies.colocation.problem import build_problem
from tests.test_colocation import FAST, H100, H100_MIB, h100s, spec


def test_the_menu_lists_counts_and_the_load_each_replica_then_takes() -> None:
    # 13.5 req/s at 10 req/s per H100 is 1,350 thousandths: one replica cannot carry it within 900, two take 675
    # each, three 450, four 338 (rounded up). Four GPUs hold at most four replicas.
    problem = build_problem([ServedModel(spec("a"), 13.5)], h100s(2), FAST, [])
    menu = replica_menu(problem, 0)
    assert (menu.low, menu.high) == (2, 4)
    assert menu.load[(0,)] == [901, 901, 675, 450, 338]  # 901: more than the margin allows


def test_min_replicas_raise_the_fewest_counts() -> None:
    problem = build_problem([ServedModel(spec("a"), 1, min_replicas=3)], h100s(4), FAST, [])
    menu = replica_menu(problem, 0)
    assert menu.low == 3
    assert menu.load[(0,)][3] == 34  # 100 thousandths over three replicas, rounded up


def test_equal_loads_are_chosen_by_the_cost_stage() -> None:
    # a needs 1,260 thousandths, b and c 540 each: 2,340 in all, so three GPUs at 900 (15B models: two share an
    # H100, three do not). a on one replica cannot fit (1,260 > 900); on two, each takes 630, and b or c (540)
    # cannot join one whole, so the cheapest equal-load plans split them (270 beside a's 630, or beside each
    # other) or leave one alone: three GPUs, a's replicas at 630 each. Three replicas of a (420 each) would need
    # a fourth GPU for the partners.
    models = [ServedModel(spec("a"), 12.6), ServedModel(spec("b"), 5.4), ServedModel(spec("c"), 5.4)]
    plan = plan_colocation(models, h100s(2), FAST)
    assert plan.gpus_used == 3
    assert sorted(r.load_milli for r in plan.replicas_of("a")) == [630, 630]
    for name in "abc":
        loads = {r.load_milli for r in plan.replicas_of(name)}
        assert max(loads) - min(loads) <= 1
    assert not any("uneven" in note for note in plan.notes)


def test_every_replica_carries_load_and_a_model_s_replicas_carry_the_same() -> None:
    rng = np.random.default_rng(7)
    models = [
        ServedModel(spec(f"m{i}", billions=float(rng.choice([3, 8, 15, 30]))), float(rng.uniform(0.5, 12)))
        for i in range(10)
    ]
    plan = plan_colocation(models, h100s(8, 4), FAST)
    assert not any("uneven" in note for note in plan.notes)
    for served in models:
        replicas = plan.replicas_of(served.name)
        rates = [r.requests_per_second for r in replicas]
        assert min(rates) > 0
        assert max(rates) - min(rates) <= 0.011 * len(replicas)  # thousandths rounding only
        assert sum(rates) >= served.requests_per_second - 1e-3


def test_a_plan_follows_the_menu_when_its_counts_give_loads_that_fit() -> None:
    # a: 1,350 thousandths, c: 500. Two replicas of a take 675 each; c does not fit beside one whole (1,175) nor
    # in two replicas of 250 (925 > 900); in three of 167 it does (842).
    models = [ServedModel(spec("a"), 13.5), ServedModel(spec("c"), 5)]
    problem = build_problem(models, h100s(4), FAST, [])
    greedy, unplaced = first_fit_decreasing(problem)
    assert not unplaced and follows_menu(problem, greedy)
    assert not follows_menu(problem, Aggregate(shared={(0, (0, 1)): 2}))  # 675 + 250
    assert follows_menu(problem, Aggregate(shared={(0, (0, 1)): 2, (0, (1,)): 1}))  # 675 + 167, and 167
    assert not follows_menu(problem, Aggregate(shared={(0, (0,)): 1, (0, (1,)): 1}))  # a once: 1,350


def test_a_fleet_of_two_gpu_types_gets_equal_requests_per_replica() -> None:
    # 8 req/s: an H100 serves 10, an A100 5 (same price). One H100 replica (800) is cheapest.
    a100 = "NVIDIA-A100-SXM4-80GB"
    fleet = [FleetGpu("h", 0, H100, H100_MIB, 1.0), FleetGpu("a", 0, a100, 81920, 1.0)]
    plan = plan_colocation([ServedModel(spec("a", a100=5), 8)], fleet, PlannerOptions(time_limit_s=5))
    assert plan.gpus_used == 1
    assert [(r.gpu_model, r.load_milli) for r in plan.replicas] == [(H100, 800)]
