"""Borrowing measured idle capacity: who may borrow, which GPUs lend, and how the ledger keeps it honest."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from extender.metrics import FleetCollector
from policies.config import Overcommit, PlacementPolicy
from policies.demand import Demand, LatencyClass
from policies.engine import assign, evaluate
from policies.feasibility import Reason
from policies.fragmentation import typical_shapes
from policies.inventory import Assignment, GpuDevice, NodeInventory
from policies.state import ClusterState, ConflictError
from scheduler.annotations import assignment_annotations, assignment_from_annotations
from scheduler.model import ClusterModel
from scheduler.podspec import PodSpecError, demand_from_pod

GIB = 1024
ON = PlacementPolicy(overcommit=Overcommit(enabled=True, safetyMargin=0.15))
SHAPES = typical_shapes([Demand(cpu_milli=1000, gpu_count=1, gpu_milli=1000)])
# An inference replica asking for a whole GPU as a share, 30 GiB of its memory, expected 30 % busy.
REPLICA = Demand(
    cpu_milli=1000, gpu_count=1, gpu_milli=1000, shareable=True, gpu_memory_mib=30 * GIB, expected_busy=0.3
)


def h100_node(name: str, gpus: int = 2) -> NodeInventory:
    return NodeInventory(
        name, 64_000, 262_144, tuple(GpuDevice(i, "NVIDIA-H100-80GB-HBM3", 80 * GIB) for i in range(gpus))
    )


def full_cluster(util: float | None, tenant: Demand = REPLICA) -> ClusterState:
    """One node, both GPUs fully allocated to one tenant each; measured load `util` (None = no telemetry)."""
    state = ClusterState([h100_node("n1")])
    for gpu in (0, 1):
        state.apply(f"t{gpu}", _held(tenant, gpu))
    measured = np.full(state.gpu_util.shape, np.nan if util is None else util, dtype=np.float32)
    state.set_utilization(measured)
    return state


def _held(demand: Demand, gpu: int) -> Assignment:
    return Assignment(
        "n1",
        demand.cpu_milli,
        0,
        (gpu,),
        demand.gpu_milli,
        demand.gpu_memory_mib,
        guarded=demand.guards_gpu,
        expected_busy=demand.busy_estimate,
    )


def decide(state: ClusterState, demand: Demand, policy: PlacementPolicy = ON):
    snapshot = state.view()
    evaluation = evaluate(snapshot, demand, np.arange(snapshot.size), policy, SHAPES)
    return snapshot, evaluation


def test_idle_but_allocated_gpu_lends_to_a_batch_share() -> None:
    state = full_cluster(util=0.2)
    snapshot, evaluation = decide(state, REPLICA)
    assert evaluation.reasons[0] == Reason.FITS and evaluation.is_borrowed(0)
    assignment = assign(snapshot, REPLICA, evaluation, 0)
    assert assignment.borrowed and assignment.milli == 1000 and not assignment.guarded
    state.apply("new", assignment)
    gpu = assignment.gpus[0]
    assert state.gpu_free[0, gpu] == 0  # the allocation is untouched: the share floats on idle capacity
    assert state.gpu_borrowed[0, gpu] == 1000
    assert state.gpu_mem_free[0, gpu] == 80 * GIB - 60 * GIB  # memory is never lent
    state.release("new")
    assert state.gpu_borrowed[0, gpu] == 0 and state.gpu_mem_free[0, gpu] == 50 * GIB


def declaring(declared: float, margin: float = 0.15) -> PlacementPolicy:
    return PlacementPolicy(overcommit=Overcommit(enabled=True, safetyMargin=margin, declaredBusy=declared))


@pytest.mark.parametrize(("declared", "lends"), [(0.0, True), (0.5, True), (1.0, False)])
def test_a_lender_counts_at_least_the_policys_part_of_what_its_tenants_declare(declared: float, lends: bool) -> None:
    # Measured 20 % busy, but each tenant declared 60 %: with all of it counted, 0.6 + 0.3 exceeds 1 - 0.15; with
    # half, the measurement is the higher and 0.2 + 0.3 fits.
    state = full_cluster(util=0.2, tenant=replace(REPLICA, expected_busy=0.6))
    assert np.allclose(state.gpu_declared_busy[0, :2], 0.6)
    _, evaluation = decide(state, REPLICA, declaring(declared))
    assert evaluation.is_borrowed(0) is lends
    assert evaluation.reasons[0] == (Reason.FITS if lends else Reason.GPUS_BUSY)


def test_declarations_never_stand_in_for_missing_telemetry() -> None:
    state = full_cluster(util=None, tenant=replace(REPLICA, expected_busy=0.0))
    _, evaluation = decide(state, REPLICA, declaring(1.0))
    assert evaluation.reasons[0] == Reason.GPUS_BUSY


def test_the_ledger_sums_declared_busy_per_gpu() -> None:
    state = ClusterState([h100_node("n1")])
    declared, undeclared = replace(REPLICA, gpu_milli=600), replace(REPLICA, gpu_milli=400, expected_busy=None)
    for key, demand in (("a", declared), ("b", undeclared)):
        snapshot, evaluation = decide(state, demand, PlacementPolicy())
        placed = assign(snapshot, demand, evaluation, 0)
        assert placed.gpus == (0,)  # the tightest fit: both on one GPU
        state.apply(key, placed)
    assert state.gpu_declared_busy[0, 0] == pytest.approx(0.3 + 0.4)  # undeclared: its whole share
    assert state.gpu_declared_busy[0, 1] == 0
    state.release("a")
    state.release("b")
    assert state.gpu_declared_busy[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_a_lender_must_have_the_borrowers_memory_free_as_measured() -> None:
    state = full_cluster(util=0.2)  # declared: 50 GiB of each 80 GiB GPU free
    measured = np.full(state.gpu_util.shape, 20.0 * GIB, dtype=np.float32)  # the tenants use more than they said
    state.set_utilization(state.gpu_util, memory_free_mib=measured)
    _, evaluation = decide(state, REPLICA)  # asks 30 GiB
    assert evaluation.reasons[0] == Reason.GPUS_BUSY and not evaluation.is_borrowed(0)


def test_disabled_policy_or_missing_telemetry_means_allocation_only() -> None:
    for state, policy in ((full_cluster(util=0.2), PlacementPolicy()), (full_cluster(util=None), ON)):
        _, evaluation = decide(state, REPLICA, policy)
        assert evaluation.reasons[0] == Reason.GPUS_BUSY and not evaluation.is_borrowed(0)


@pytest.mark.parametrize(("util", "fits"), [(0.54, True), (0.56, False)])
def test_safety_margin_bounds_measured_plus_expected_load(util: float, fits: bool) -> None:
    # measured + 0.30 expected must stay within 1 - margin = 0.85
    _, evaluation = decide(full_cluster(util=util), REPLICA)
    assert bool(evaluation.reasons[0] == Reason.FITS) is fits


def test_without_a_declared_expectation_the_whole_share_counts() -> None:
    undeclared = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=300, shareable=True, gpu_memory_mib=10 * GIB)
    state = ClusterState([h100_node("n1", gpus=1)])
    state.apply("t", Assignment("n1", 0, 0, (0,), 800))
    state.set_utilization(np.full(state.gpu_util.shape, 0.5, dtype=np.float32))
    assert decide(state, undeclared)[1].reasons[0] == Reason.FITS  # 0.5 + 0.3 <= 0.85
    state.set_utilization(np.full(state.gpu_util.shape, 0.6, dtype=np.float32))
    assert decide(state, undeclared)[1].reasons[0] == Reason.NO_GPU_SHARE


def test_interactive_pods_neither_borrow_nor_lend() -> None:
    interactive = Demand(**{**REPLICA.__dict__, "latency_class": LatencyClass.INTERACTIVE})
    _, evaluation = decide(full_cluster(util=0.1), interactive)
    assert evaluation.reasons[0] == Reason.GPUS_BUSY
    _, evaluation = decide(full_cluster(util=0.1, tenant=interactive), REPLICA)
    assert evaluation.reasons[0] == Reason.GPUS_BUSY


def test_exclusive_gpus_do_not_lend_and_are_not_given_to_exclusive_pods_while_borrowed() -> None:
    exclusive = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=1000)  # nvidia.com/gpu: the device is its own
    assert exclusive.guards_gpu and not REPLICA.guards_gpu
    _, evaluation = decide(full_cluster(util=0.0, tenant=exclusive), REPLICA)
    assert evaluation.reasons[0] == Reason.GPUS_BUSY

    state = full_cluster(util=0.1)
    snapshot, evaluation = decide(state, REPLICA)
    state.apply("borrower", assign(snapshot, REPLICA, evaluation, 0))
    for key in ("t0", "t1"):  # the owners leave; the borrower stays on its GPU
        state.release(key)
    snapshot, evaluation = decide(state, exclusive)
    assert evaluation.reasons[0] == Reason.FITS
    taken = assign(snapshot, exclusive, evaluation, 0).gpus
    assert state.gpu_borrowed[0, taken[0]] == 0  # the GPU without a borrower


def test_memory_must_be_declared_and_free() -> None:
    undeclared = Demand(**{**REPLICA.__dict__, "gpu_memory_mib": 0})
    assert decide(full_cluster(util=0.0), undeclared)[1].reasons[0] == Reason.GPUS_BUSY
    too_big = Demand(**{**REPLICA.__dict__, "gpu_memory_mib": 51 * GIB})  # 50 GiB left on each GPU
    assert decide(full_cluster(util=0.0), too_big)[1].reasons[0] == Reason.GPUS_BUSY


def test_borrowed_share_per_gpu_is_capped_by_the_policy() -> None:
    state = full_cluster(util=0.0)
    light = Demand(**{**REPLICA.__dict__, "gpu_memory_mib": GIB, "expected_busy": 0.01})
    for _ in range(2):  # one borrowed replica per GPU under the default cap of 1000 milli
        snapshot, evaluation = decide(state, light)
        state.apply(f"b{_}", assign(snapshot, light, evaluation, 0))
    assert (state.gpu_borrowed[0, :2] == 1000).all()
    assert decide(state, light)[1].reasons[0] == Reason.GPUS_BUSY


def test_borrowing_prefers_the_gpu_with_most_headroom_and_ranks_by_policy() -> None:
    state = ClusterState([h100_node("busy"), h100_node("free", gpus=1)])
    state.apply("a", Assignment("busy", 0, 0, (0,), 1000, 30 * GIB))
    state.apply("b", Assignment("busy", 0, 0, (1,), 1000, 30 * GIB))
    util = np.full(state.gpu_util.shape, np.nan, dtype=np.float32)
    util[0, :2] = (0.4, 0.1)
    util[1, 0] = 0.0
    state.set_utilization(util)
    snapshot, evaluation = decide(state, REPLICA)
    assert evaluation.is_borrowed(0) and not evaluation.is_borrowed(1)
    assert assign(snapshot, REPLICA, evaluation, 0).gpus == (1,)
    assert evaluation.best() == 0  # consolidate: a safe borrowed place beats opening an idle GPU
    allocation_first = PlacementPolicy(overcommit=Overcommit(enabled=True, prefer="allocation"))
    assert decide(state, REPLICA, allocation_first)[1].best() == 1


def test_ledger_refuses_mixing_borrowers_with_guarded_tenants() -> None:
    state = ClusterState([h100_node("n1")])
    state.apply("guard", Assignment("n1", 0, 0, (0,), 500, guarded=True))
    with pytest.raises(ConflictError, match="forbids borrowing"):
        state.apply("b", Assignment("n1", 0, 0, (0,), 1000, borrowed=True))
    state.apply("b", Assignment("n1", 0, 0, (1,), 1000, borrowed=True))
    with pytest.raises(ConflictError, match="borrowed shares"):
        state.apply("g", Assignment("n1", 0, 0, (1,), 100, guarded=True))


def test_borrowed_assignment_round_trips_through_the_pod_annotation() -> None:
    assignment = Assignment("n1", 1000, 0, (1,), 1000, 30 * GIB, borrowed=True)
    out = assignment_annotations(assignment, h100_node("n1"))
    assert '"borrowed":true' in out["gpu-extender.io/assignment"]
    assert out["gpu-extender.io/gpu-memory-fraction"] == "0.37"
    assert assignment_from_annotations(out, "n1", REPLICA) == assignment
    assert assignment_from_annotations(out, "n1", REPLICA).expected_busy == 0.3  # the pod's declaration
    exclusive = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=1000, gpu_memory_mib=30 * GIB)
    assert assignment_from_annotations(out, "n1", exclusive) is None  # an exclusive pod cannot have borrowed


def _pod(resources: dict[str, str], annotations: dict[str, str]) -> dict:
    return {
        "metadata": {"name": "p", "annotations": annotations},
        "spec": {"containers": [{"name": "c", "resources": {"requests": resources, "limits": resources}}]},
    }


def test_pod_spec_reads_shareable_requests_and_expected_busy() -> None:
    shared = demand_from_pod(_pod({"gpu-extender.io/gpu-milli": "1000"}, {"gpu-extender.io/expected-busy": "0.25"}))
    assert shared.shareable and shared.shares_gpu and shared.expected_busy == 0.25
    assert not demand_from_pod(_pod({"nvidia.com/gpu": "1"}, {})).shares_gpu
    for bad in ("1.5", "nan", "half"):
        with pytest.raises(PodSpecError, match="expected-busy"):
            demand_from_pod(_pod({"gpu-extender.io/gpu-milli": "500"}, {"gpu-extender.io/expected-busy": bad}))


def test_fleet_metrics_show_borrowed_and_idle_allocated_capacity() -> None:
    model = ClusterModel(ON)
    model.replace_nodes([h100_node("n1")])
    model.pod_bound("t0", _held(REPLICA, 0), REPLICA)  # GPU 0 allocated, 20 % busy
    model.pod_bound("b", Assignment("n1", 0, 0, (0,), 1000, 30 * GIB, borrowed=True), REPLICA)
    util = np.full(model.snapshot().gpu_util.shape, np.nan, dtype=np.float32)
    util[0, :2] = (0.2, 0.0)  # GPU 1 idle and unallocated: nothing wasted there
    model.set_utilization(util)
    registry = CollectorRegistry()
    registry.register(FleetCollector(model))
    value = registry.get_sample_value
    assert value("gpu_extender_borrowed_gpus") == 1.0
    assert value("gpu_extender_allocated_gpus") == 1.0  # borrowed shares hold no allocation
    assert value("gpu_extender_measured_gpus") == 2.0
    assert value("gpu_extender_busy_gpus") == pytest.approx(0.2)
    assert value("gpu_extender_idle_allocated_gpus") == pytest.approx(0.8)


def test_capacity_a_borrower_runs_on_is_not_offered_again_when_its_lender_leaves() -> None:
    state = full_cluster(util=0.1)
    snapshot, evaluation = decide(state, REPLICA)
    borrower = assign(snapshot, REPLICA, evaluation, 0)
    state.apply("borrower", borrower)
    state.release(f"t{borrower.gpus[0]}")  # the lender leaves: its GPU's allocation is free again
    share = Demand(cpu_milli=0, gpu_count=1, gpu_milli=500, gpu_memory_mib=GIB)
    snapshot, evaluation = decide(state, share, PlacementPolicy())
    assert evaluation.reasons[0] == Reason.NO_GPU_SHARE  # the freed GPU carries the borrower's load


def test_a_gpu_whose_lender_left_may_lend_again_within_the_limit() -> None:
    state = full_cluster(util=0.1)
    snapshot, evaluation = decide(state, REPLICA)
    first = assign(snapshot, REPLICA, evaluation, 0)
    state.apply("first", first)
    state.release(f"t{first.gpus[0]}")  # its lender leaves: that GPU now runs one share, borrowed
    light = Demand(**{**REPLICA.__dict__, "gpu_memory_mib": GIB})
    borrowers = 0
    while decide(state, light)[1].reasons[0] == Reason.FITS:
        snapshot, evaluation = decide(state, light)
        state.apply(f"more{borrowers}", assign(snapshot, light, evaluation, 0))
        borrowers += 1
    # Each GPU may carry 1000 milli beyond its capacity: one more on the first GPU, one on the other.
    assert borrowers == 2
    placed = state.gpu_borrowed[0, :2] + (1000 - state.gpu_free[0, :2])
    assert (placed == 2000).all()
