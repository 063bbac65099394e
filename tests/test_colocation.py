"""The co-location planner on problems small enough to solve by hand."""

from __future__ import annotations

import numpy as np
import pytest

from policies.catalog import ModelSpec
from policies.colocation import (
    CurrentReplica,
    FleetGpu,
    PlanError,
    PlannerOptions,
    ServedModel,
    first_fit_decreasing,
    one_replica_per_gpu,
    plan_colocation,
)
from policies.colocation.concretize import memory_fractions
from policies.colocation.problem import build_problem, maximal_layouts

H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-80GB"
H100_MIB = 81559
FAST = PlannerOptions(time_limit_s=5)


def spec(
    name: str,
    *,
    billions: float = 15,
    h100: float = 10,
    a100: float | None = None,
    gpu: str = "H100-80GB",
    **extra: object,
) -> ModelSpec:
    """A model of `billions` parameters in bf16 with a negligible KV reserve: 15B is 28,611 MiB of weights plus
    1,024 of overhead, so two share an H100 and three do not."""
    throughput = [{"gpu": gpu, "requestsPerSecond": h100, "source": "test"}]
    if a100 is not None:
        throughput.append({"gpu": "A100-80GB", "requestsPerSecond": a100, "source": "test"})
    throughput += extra.pop("throughput", [])  # type: ignore[arg-type]
    return ModelSpec.model_validate(
        {
            "name": name,
            "parametersBillion": billions,
            "layers": 1,
            "kvHeads": 1,
            "headDim": 1,
            "contextTokens": 1,
            "concurrency": 1,
            "promptTokens": 100,
            "outputTokens": 100,
            "throughput": throughput,
            "source": "test",
            **extra,
        }
    )


def h100s(nodes: int, per_node: int = 2, price: float = 1.0, **extra: object) -> list[FleetGpu]:
    return [
        FleetGpu(f"n{n}", i, H100, H100_MIB, price, **extra)  # type: ignore[arg-type]
        for n in range(nodes)
        for i in range(per_node)
    ]


def test_a_replica_needs_weights_and_overhead() -> None:
    assert spec("a").memory_mib == 28_611 + 1 + 1024  # 30e9 bytes = 28,610.2 MiB, rounded up; one-token KV; overhead


def test_two_light_models_share_one_gpu() -> None:
    # 4 req/s at 10 req/s per GPU: 400 thousandths each, 800 together, within 1 - 0.1; memory 2 × 29,635 MiB.
    models = [ServedModel(spec("a"), 4), ServedModel(spec("b"), 4)]
    plan = plan_colocation(models, h100s(2), FAST)
    assert plan.gpus_used == 1
    assert {(r.node, r.gpu) for r in plan.replicas} == {("n0", 0)}
    assert sorted(r.load_milli for r in plan.replicas) == [400, 400]
    assert plan.min_headroom == pytest.approx(0.2)
    assert plan.cost_per_hour == 1.0
    assert plan.lower_bound_per_hour == 1.0 and plan.gap == 0
    assert plan.method == "cp-sat optimal"
    assert one_replica_per_gpu(build_problem(models, h100s(2), FAST, []))[0] == 2


def test_the_compute_margin_splits_a_busy_model_into_equally_loaded_replicas() -> None:
    # a: 13.5 req/s = 1,350 thousandths: two replicas of 675 each (a Service spreads requests evenly). b: 200
    # thousandths fits beside one of them: 875 there, headroom 0.125.
    models = [ServedModel(spec("a"), 13.5), ServedModel(spec("b"), 2)]
    plan = plan_colocation(models, h100s(2), FAST)
    assert plan.gpus_used == 2
    assert [r.load_milli for r in plan.replicas_of("a")] == [675, 675]
    assert plan.min_headroom == pytest.approx(0.125)
    assert sum(r.requests_per_second for r in plan.replicas_of("a")) >= 13.5 - 1e-6


def test_three_do_not_fit_in_memory_together() -> None:
    models = [ServedModel(spec(n), 1) for n in "abc"]
    assert plan_colocation(models, h100s(2), FAST).gpus_used == 2


def test_interactive_and_batch_never_share() -> None:
    models = [ServedModel(spec("a"), 1), ServedModel(spec("b", latencyClass="batch"), 1)]
    plan = plan_colocation(models, h100s(2), FAST)
    assert plan.gpus_used == 2
    assert len({(r.node, r.gpu) for r in plan.replicas}) == 2


def test_models_that_peak_together_are_kept_apart() -> None:
    models = [ServedModel(spec("a"), 1), ServedModel(spec("b"), 1)]
    day = np.sin(np.linspace(0, 2 * np.pi, 48)) + 1
    together = plan_colocation(models, h100s(2), FAST, histories=[day, day * 2])
    opposite = plan_colocation(models, h100s(2), FAST, histories=[day, 2 - day])
    assert together.gpus_used == 2
    assert opposite.gpus_used == 1


def test_the_cheaper_gpu_per_request_wins() -> None:
    # 3 req/s: one A100 at $1 (750 thousandths of 4 req/s) or one H100 at $3.
    fleet = [FleetGpu("h", 0, H100, H100_MIB, 3.0), FleetGpu("a", 0, A100, 81920, 1.0)]
    plan = plan_colocation([ServedModel(spec("a", a100=4), 3)], fleet, FAST)
    assert [(r.node, r.gpu_model) for r in plan.replicas] == [("a", A100)]
    assert plan.cost_per_hour == 1.0


def test_min_replicas_spread_over_nodes() -> None:
    plan = plan_colocation([ServedModel(spec("a"), 1, min_replicas=2)], h100s(2), FAST)
    assert len(plan.replicas) == 2
    assert {r.node for r in plan.replicas} == {"n0", "n1"}
    assert not plan.notes


def test_running_replicas_stay_where_they_are() -> None:
    models = [ServedModel(spec("a"), 4), ServedModel(spec("b"), 4)]
    current = [CurrentReplica("a", "n1", 1), CurrentReplica("b", "n1", 1)]
    plan = plan_colocation(models, h100s(2), FAST, current=current)
    assert plan.moves == 0
    assert {(r.node, r.gpu) for r in plan.replicas} == {("n1", 1)}
    moved = plan_colocation(
        models, h100s(2), FAST, current=[CurrentReplica("a", "n1", 1), CurrentReplica("b", "n0", 0)]
    )
    assert moved.gpus_used == 1 and moved.moves == 1  # one of the two must join the other


def test_mig_slices_hold_replicas_on_valid_starts() -> None:
    # 6 req/s at 4 req/s per 3g.40gb slice and no more on a 7g.80gb (measured so): two slices, one GPU, starts
    # 0 and 4 (a 4g.40gb at 0 serves 10 × min(4/7, 4/8) = 5 req/s by the catalog's scaling, and would do too).
    measured = [("3g.40gb", 4), ("7g.80gb", 4)]
    model = spec(
        "a",
        throughput=[{"gpu": "H100-80GB", "migProfile": p, "requestsPerSecond": r, "source": "t"} for p, r in measured],
    )
    plan = plan_colocation([ServedModel(model, 6)], h100s(1, mig_table="H100-80GB"), FAST)
    assert plan.gpus_used == 1
    slices = sorted((r.mig_profile, r.mig_start) for r in plan.replicas)
    assert len(slices) == 2
    assert {p for p, _ in slices} <= {"3g.40gb", "4g.40gb"}
    assert {s for _, s in slices} == {0, 4}
    assert sum(r.requests_per_second for r in plan.replicas) >= 6 - 1e-6


def test_a_fixed_mig_layout_is_used_as_it_is() -> None:
    layout = (("2g.20gb", 0), ("2g.20gb", 2), ("3g.40gb", 4))
    model = spec("a", throughput=[{"gpu": "H100-80GB", "migProfile": "3g.40gb", "requestsPerSecond": 4, "source": "t"}])
    plan = plan_colocation([ServedModel(model, 6)], h100s(1, mig_table="H100-80GB", mig_layout=layout) * 1, FAST)
    # One GPU has one 3g.40gb: two are needed, and the second GPU of the node has the same layout.
    assert plan.gpus_used == 2
    assert {(r.gpu, r.mig_profile, r.mig_start) for r in plan.replicas} == {(0, "3g.40gb", 4), (1, "3g.40gb", 4)}


def test_every_h100_layout_is_maximal_and_distinct() -> None:
    layouts = maximal_layouts("H100-80GB")
    mixes = {tuple(sorted(layout.profile_counts.items())) for layout in layouts}
    assert len(mixes) == len(layouts)
    assert (("1g.10gb", 7),) in mixes and (("7g.80gb", 1),) in mixes
    assert (("3g.40gb", 2),) in mixes  # 3g at 0 and 4: nothing else fits


def test_a_model_larger_than_any_gpu_is_named() -> None:
    # 60B in bf16 needs 115,466 MiB: listed for H200 only, and the fleet has H100s.
    huge = spec("huge", billions=60, gpu="H200")
    with pytest.raises(PlanError, match=r"can serve: huge \(115466 MiB\)"):
        plan_colocation([ServedModel(spec("a"), 1), ServedModel(huge, 1)], h100s(2), FAST)


def test_demand_beyond_the_fleet_is_an_error() -> None:
    with pytest.raises(PlanError, match="cannot carry the demand"):
        plan_colocation([ServedModel(spec("a"), 30)], h100s(1), FAST)


def test_greedy_is_never_cheaper_than_the_solver() -> None:
    rng = np.random.default_rng(3)
    models = [
        ServedModel(spec(f"m{i}", billions=float(rng.choice([3, 8, 15, 30]))), float(rng.uniform(0.5, 8)))
        for i in range(8)
    ]
    fleet = h100s(8, 4)
    plan = plan_colocation(models, fleet, FAST)
    greedy, unplaced = first_fit_decreasing(build_problem(models, fleet, FAST, []))
    assert not unplaced
    assert plan.cost_per_hour <= greedy.gpus_used()
    assert plan.lower_bound_per_hour <= plan.cost_per_hour
    for served in models:
        assert sum(r.requests_per_second for r in plan.replicas_of(served.name)) >= served.requests_per_second - 1e-3
    per_gpu: dict[tuple[str, int], int] = {}
    for r in plan.replicas:
        per_gpu[(r.node, r.gpu)] = per_gpu.get((r.node, r.gpu), 0) + r.memory_mib
    assert max(per_gpu.values()) <= H100_MIB


def test_memory_fractions_share_vllms_default_in_proportion() -> None:
    assert memory_fractions([10_000, 30_000], 80_000) == [0.225, 0.675]
    assert memory_fractions([40_000, 40_000], 80_000) == [0.5, 0.5]  # full: each exactly its need
