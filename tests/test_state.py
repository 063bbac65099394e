"""The state refuses double booking and its snapshots do not move under readers."""

import numpy as np
import pytest

from policies.inventory import Assignment, GpuDevice, MigInstance, MigPlacement, NodeInventory
from policies.state import ClusterState, ConflictError
from tests.helpers import mig_node, node


def test_overbooking_a_gpu_is_refused():
    state = ClusterState([node("a", gpus=1)])
    state.apply("p", Assignment("a", gpus=(0,), milli=600))
    with pytest.raises(ConflictError):
        state.apply("q", Assignment("a", gpus=(0,), milli=500))
    state.apply("q", Assignment("a", gpus=(0,), milli=400))
    assert state.gpu_free[0, 0] == 0


def test_apply_is_idempotent_and_release_restores():
    state = ClusterState([node("a", gpus=1)])
    a = Assignment("a", cpu_milli=1000, gpus=(0,), milli=500)
    state.apply("p", a)
    state.apply("p", a)
    with pytest.raises(ConflictError):
        state.apply("p", Assignment("a", gpus=(0,), milli=100))
    assert state.release("p") == a
    assert state.gpu_free[0, 0] == 1000 and state.cpu_free[0] == 32_000


def test_overlapping_mig_slices_are_refused():
    state = ClusterState([mig_node("m")])
    state.apply("p", Assignment("m", mig=MigPlacement(0, "3g.40gb", 4)))
    with pytest.raises(ConflictError):
        state.apply("q", Assignment("m", mig=MigPlacement(0, "2g.20gb", 4)))
    with pytest.raises(ConflictError):
        state.apply("q", Assignment("m", mig=MigPlacement(0, "3g.40gb", 2)))  # not a valid start
    state.apply("q", Assignment("m", mig=MigPlacement(0, "4g.40gb", 0)))


def test_snapshot_is_frozen_and_independent():
    state = ClusterState([node("a", gpus=1)])
    snap = state.snapshot()
    state.apply("p", Assignment("a", gpus=(0,), milli=1000))
    assert snap.gpu_free[0, 0] == 1000
    with pytest.raises(ValueError):
        snap.gpu_free[0, 0] = 5


def test_set_nodes_keeps_assignments_that_still_fit():
    state = ClusterState([node("a", gpus=2), node("b", gpus=1)])
    state.apply("p", Assignment("a", gpus=(1,), milli=1000))
    state.apply("q", Assignment("b", gpus=(0,), milli=1000))
    dropped = state.set_nodes([node("a", gpus=2), node("c", gpus=1)])
    assert dropped == ["q"]
    assert np.array_equal(state.gpu_free[0, :2], [1000, 0])


def test_static_mig_layout_refuses_instances_that_do_not_exist():
    gpu = GpuDevice(
        0, "NVIDIA-H100-80GB-HBM3", 81_920, mig_table="H100-80GB", mig_instances=(MigInstance("1g.10gb", 0),)
    )
    state = ClusterState([NodeInventory("m", 64_000, 262_144, (gpu,))])
    with pytest.raises(ConflictError, match="no MIG instance"):
        state.apply("p", Assignment("m", mig=MigPlacement(0, "1g.10gb", 1)))
    state.apply("p", Assignment("m", mig=MigPlacement(0, "1g.10gb", 0)))
