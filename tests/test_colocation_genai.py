"""The genai-serving co-location benchmark's pieces, on numbers small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from e2e.bench_genai_colocation import GPU_MIB, Placement, Tally, fleet, memory_only, pod_spec, tenants
from policies.colocation import PlannedReplica, PlannerOptions, ServedModel, plan_colocation


def test_a_pod_needs_exactly_its_declared_memory_and_one_gpu_per_unit_of_demand() -> None:
    spec = pod_spec("pod", 40_960)
    assert spec.memory_mib == 40_960
    assert spec.requests_per_second("NVIDIA-H100-80GB-HBM3") == 1.0


def test_two_calm_pods_share_a_gpu_and_a_busy_one_is_split() -> None:
    # 0.3 + 0.4 + 1.2 = 1.9 GPUs of demand: at least three GPUs within 0.9 each. The busy pod needs two replicas
    # or more (1.2 > 0.9), and no GPU holds three 40,000 MiB pods: three GPUs, the busy pod's replicas equal.
    models = [ServedModel(pod_spec(n, 40_000), d) for n, d in (("calm", 0.3), ("calmer", 0.4), ("busy", 1.2))]
    plan = plan_colocation(models, fleet(4), PlannerOptions(time_limit_s=5))
    busy = plan.replicas_of("busy")
    assert plan.gpus_used == 3
    assert len(busy) >= 2 and len({r.load_milli for r in busy}) == 1


def test_replicas_share_their_pod_s_work_and_gpus_are_grouped() -> None:
    def replica(model: str, gpu: int) -> PlannedReplica:
        return PlannedReplica(model, "n", gpu, "H100", 1, 0.5, 100, 0.1)

    replicas = [replica("a", 0), replica("b", 0), replica("b", 1)]
    assert tenants(replicas, [7, 9], {"a": 0, "b": 1}) == [[(7, 1.0), (9, 0.5)], [(9, 0.5)]]


def test_the_replay_sums_tenants_and_counts_steps_above_90_percent() -> None:
    # Pod 0: 0.5, 0.95, gone. Pod 1: 0.3, 0.3, 0.2. Together: 0.8 (calm), 1.25 (hot), then pod 1 alone at 0.2.
    busy = np.array([[0.5, 0.3], [0.95, 0.3], [np.nan, 0.2]])
    shared = Tally()
    shared.add(Placement("shared", [[(0, 1.0), (1, 1.0)]]), busy)
    assert (shared.planned, shared.gpu_steps, shared.hot) == (1, 3, 1)
    assert shared.busy == pytest.approx(0.8 + 1.0 + 0.2)  # a step's busy fraction is capped at the whole GPU
    alone = Tally()
    alone.add(Placement("alone", [[(0, 1.0)], [(1, 1.0)]]), busy)
    assert (alone.planned, alone.gpu_steps, alone.hot) == (2, 5, 1)  # pod 0's GPU is free once it is gone


def test_memory_alone_pairs_pods_that_fit_together() -> None:
    models = [ServedModel(pod_spec(f"p{i}", mib), 0.9) for i, mib in enumerate((50_000, 30_000, 40_000, 40_000))]
    assert GPU_MIB < 50_000 + 40_000  # the 50,000 MiB pod pairs only with the 30,000 one
    assert memory_only(models, PlannerOptions(time_limit_s=5), [1, 1, 1, 1]) == 2  # 50+30 and 40+40
    assert memory_only(models, PlannerOptions(time_limit_s=5), [1, 2, 1, 1]) == 3
