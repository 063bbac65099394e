"""The utilization evaluation on a hand-made trace: calm replicas share GPUs, bursty ones keep theirs."""

from __future__ import annotations

import numpy as np
import pytest

from policies.config import Overcommit, PlacementPolicy
from policies.demand import Demand
from policies.fragmentation import typical_shapes
from scheduler.simulator.duty_cycle import (
    DutyTrace,
    arrival_steps,
    declared_busy,
    first_fit_gpus,
    foresight,
    memory_bound,
    replay,
)

SHAPES = typical_shapes([Demand(gpu_count=1, gpu_milli=1000, shareable=True)])
SHARING = PlacementPolicy(overcommit=Overcommit(enabled=True, safetyMargin=0.1))


def trace(busy: np.ndarray, memory_gib: int = 30) -> DutyTrace:
    steps, pods = busy.shape
    return DutyTrace(
        step_s=60.0,
        busy=busy,
        memory_mib=np.full(pods, memory_gib * 1024),
        first=np.zeros(pods, dtype=np.int64),
        last=np.full(pods, steps - 1),
        pods=tuple(f"p{i}" for i in range(pods)),
    )


def run(t: DutyTrace, policy: PlacementPolicy, start: int = 10):
    return replay(t, policy, "arm", start=start, gpu="h100", window=10, smoothing="p99", shapes=SHAPES, grace=1)


def test_calm_replicas_share_gpus_only_under_the_utilization_aware_policy() -> None:
    calm = trace(np.full((60, 4), 0.1))
    alone, shared = run(calm, PlacementPolicy()), run(calm, SHARING)
    assert alone.placed == shared.placed == 4 and alone.failed == shared.failed == 0
    assert alone.gpus_peak == 4 and abs(alone.busy_mean - 0.1) < 1e-9
    assert shared.gpus_peak == 2  # two per GPU: the policy caps borrowing at one extra whole share
    assert shared.busy_mean > 1.9 * alone.busy_mean and shared.hot_share == 0  # alone only while rolling out


def test_a_bursty_replica_neither_borrows_nor_lends() -> None:
    busy = np.full((60, 3), 0.1)
    busy[::5, 0] = 0.95  # pod 0 bursts above 90 % every fifth sample, history included
    result = run(trace(busy), SHARING)
    assert declared_busy(trace(busy), 10)[0] == np.float64(0.95)
    assert result.gpus_peak == 2  # the calm pair shares; the bursty pod stays alone
    assert result.shared_hot_share == 0 and result.hot_share > 0
    assert result.colocated_hot_share == 0  # its bursts slow nobody down


def test_time_above_90_percent_on_a_shared_gpu_counts_as_co_located() -> None:
    busy = np.full((60, 2), 0.1)
    busy[40:45] = 0.5  # calm in their history, then both at half the GPU at once: 100 % together
    result = run(trace(busy), SHARING)
    assert result.gpus_peak == 1
    assert result.colocated_hot_share == result.shared_hot_share == result.hot_share > 0


def test_the_extender_sees_the_samples_taken_since_the_rollout_began() -> None:
    # Two replicas at 60 % each: the second, bound a step after the first, must see the first one's sample
    # whatever slot of the window it was written to (start 13 with a window of 10 writes slot 3 first).
    result = run(trace(np.full((60, 2), 0.6)), SHARING, start=13)
    assert result.gpus_peak == 2 and result.hot_share == 0


def test_declarations_keep_a_replica_that_burst_in_its_history_from_lending_while_calm() -> None:
    busy = np.full((60, 2), 0.1)
    busy[:10:2, 0] = 0.95  # pod 0 burst in its history, is calm when pod 1 arrives, then runs at 85 %
    busy[40:45, 0] = 0.85
    declared = PlacementPolicy(overcommit=Overcommit(enabled=True, safetyMargin=0.1, declaredBusy=1.0))
    measured_only, judged_by_both = run(trace(busy), SHARING), run(trace(busy), declared)
    assert measured_only.gpus_peak == 1 and measured_only.shared_hot_share > 0  # 0.85 + 0.1 together
    assert judged_by_both.gpus_peak == 2 and judged_by_both.hot_share == 0


def test_foresight_shares_only_where_sharing_never_crosses_90_percent() -> None:
    busy = np.full((60, 4), 0.1)
    busy[40:45, 2:] = 0.5  # pods 2 and 3 together would reach 100 % for five samples
    result = foresight(trace(busy), start=0, capacity_mib=80 * 1024)  # two 30 GiB replicas per GPU
    assert result.placed == 4 and result.gpus_peak == 2  # {2, 0} and {3, 1}: neither pair ever crosses 90 %
    assert result.hot_share == result.shared_hot_share == 0
    assert result.busy_mean == pytest.approx((55 * 0.2 + 5 * 0.6) / 60)
    assert foresight(trace(busy), start=0, capacity_mib=50 * 1024).gpus_peak == 4  # memory first


def test_memory_is_never_lent() -> None:
    result = run(trace(np.full((60, 4), 0.1), memory_gib=45), SHARING)  # two would need 92 GiB of an 80 GB GPU
    assert result.gpus_peak == 4


def test_rollout_order() -> None:
    t = trace(np.full((30, 3), 0.1))
    t = DutyTrace(t.step_s, t.busy, t.memory_mib, np.array([0, 0, 20]), np.array([29, 5, 29]), t.pods)
    assert arrival_steps(t, start=10).tolist() == [10, -1, 20]


def test_first_fit_decreasing_by_memory() -> None:
    gib = 1024
    # 60 + 20 and 30 + 30 + 20 fill two 80 GiB GPUs; a third 30 needs another.
    assert first_fit_gpus(np.array([30, 20, 60, 30, 20]) * gib, 80 * gib) == 2
    assert first_fit_gpus(np.array([30, 20, 60, 30, 20, 30]) * gib, 80 * gib) == 3
    assert first_fit_gpus(np.array([], dtype=np.int64), 80 * gib) == 0


def test_memory_bound_counts_the_pods_alive_at_each_step() -> None:
    t = trace(np.full((20, 4), 0.1), memory_gib=30)  # four 30 GiB pods: two per 80 GiB GPU
    assert memory_bound(t, start=10, capacity_mib=80 * 1024) == 2.0
    late = DutyTrace(t.step_s, t.busy, t.memory_mib, np.array([0, 0, 0, 15]), t.last, t.pods)
    # Steps 10-14: three pods on two GPUs; steps 15-19: four on two.
    assert memory_bound(late, start=10, capacity_mib=80 * 1024) == (5 * 3 + 5 * 4) / 20
