"""Evaluations read through the per-row cache equal evaluating every requested row afresh, whatever changed in
between, for every demand kind, scored or feasibility only; rows are evaluated again only when they changed."""

from __future__ import annotations

import random

import numpy as np

from policies.config import PlacementPolicy
from policies.demand import Demand
from policies.engine import evaluate, place_on_node
from policies.fragmentation import typical_shapes
from policies.reuse import EvaluationCache
from policies.state import ClusterState
from tests.helpers import mig_node, node

DEMANDS = [
    Demand(cpu_milli=1000, memory_mib=1024, gpu_count=1, gpu_milli=1000),
    Demand(cpu_milli=4000, memory_mib=1024, gpu_count=2, gpu_milli=1000),
    Demand(cpu_milli=500, memory_mib=512, gpu_count=1, gpu_milli=300),
    Demand(cpu_milli=500, memory_mib=512, gpu_count=1, gpu_milli=700),
    Demand(cpu_milli=500, memory_mib=512, mig_profile="1g.10gb"),
    Demand(cpu_milli=500, memory_mib=512, mig_profile="3g.40gb"),
    Demand(cpu_milli=2000, memory_mib=2048),
]


def evaluator(view, demand: Demand, policy: PlacementPolicy, shapes, asked: list | None = None):  # type: ignore[no-untyped-def]
    """What the cache calls for rows it must evaluate again; records them in `asked`."""

    def run(redo: np.ndarray, score: bool):  # type: ignore[no-untyped-def]
        if asked is not None:
            asked.append(redo)
        return evaluate(view, demand, redo, policy, shapes, score=score)

    return run


def test_reused_rows_equal_a_full_evaluation_through_binds_and_releases() -> None:
    rng = random.Random(4)
    nodes = [node(f"n{i:02d}", gpus=rng.choice([1, 2, 4, 8]), cpu=rng.choice([8000, 32000])) for i in range(40)]
    nodes += [mig_node(f"m{i}", gpus=2) for i in range(6)]
    state = ClusterState(nodes)
    policy = PlacementPolicy()
    shapes = typical_shapes(DEMANDS, coverage=1.0)
    cache = EvaluationCache(size=4)  # fewer entries than demands: evictions too
    cache.reset(len(nodes))
    placed: list[str] = []
    for step in range(400):
        view = state.view()
        demand = rng.choice(DEMANDS)
        rows = np.array(rng.choices(range(len(nodes)), k=rng.randint(1, 60)), dtype=np.int64)  # repeats allowed
        score = rng.random() < 0.6  # filter asks feasibility only, prioritize scores
        reused = cache.evaluate(
            demand, rows, state.row_version, state.generation, evaluator(view, demand, policy, shapes), score
        )
        full = evaluate(view, demand, rows, policy, shapes, score=score)
        for name in ("rows", "reasons", "scores", "choice", "mig_start"):
            assert np.array_equal(getattr(reused, name), getattr(full, name)), (step, name)
        if placed and rng.random() < 0.3:
            state.release(placed.pop(rng.randrange(len(placed))))
        elif score and (best := full.best()) is not None:
            assignment, _ = place_on_node(view, demand, nodes[int(rows[best])].name, policy, shapes)
            assert assignment is not None
            state.apply(f"p{step}", assignment)
            placed.append(f"p{step}")
    assert cache.rows_reused > 1000, "rows unchanged since should be reused"


def test_only_changed_rows_are_evaluated_again_and_never_from_a_newer_state() -> None:
    nodes = [node(f"n{i}", gpus=4) for i in range(10)]
    state = ClusterState(nodes)
    policy, demand = PlacementPolicy(), DEMANDS[0]
    shapes = typical_shapes(DEMANDS, coverage=1.0)
    cache = EvaluationCache()
    cache.reset(len(nodes))
    asked: list[np.ndarray] = []

    def compute(view):  # type: ignore[no-untyped-def]
        return evaluator(view, demand, policy, shapes, asked)

    rows = np.arange(10)
    old = state.snapshot()
    cache.evaluate(demand, rows, old.row_version, old.generation, compute(old))
    assignment, _ = place_on_node(old, demand, "n3", policy, shapes)
    assert assignment is not None
    state.apply("p", assignment)
    new = state.snapshot()
    cache.evaluate(demand, rows, new.row_version, new.generation, compute(new))
    assert asked[-1].tolist() == [3]
    # A request still holding the older snapshot must not read row 3 as evaluated on the newer one.
    again = cache.evaluate(demand, rows, old.row_version, old.generation, compute(old))
    assert asked[-1].tolist() == [3]
    assert np.array_equal(again.scores, evaluate(old, demand, rows, policy, shapes).scores)
