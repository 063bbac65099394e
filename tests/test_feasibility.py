"""Hard fit and the reasons reported for each rejection."""

import numpy as np

from policies.demand import Demand
from policies.feasibility import Reason, feasibility, is_resolvable, usable_gpus
from policies.inventory import Assignment, GpuDevice, MigInstance, MigPlacement, NodeInventory
from policies.state import ClusterState
from tests.helpers import mig_node, node


def reasons(state: ClusterState, demand: Demand) -> list[Reason]:
    snap = state.view()
    return [Reason(r) for r in feasibility(snap, np.arange(snap.size), demand)]


def test_whole_gpus_need_fully_free_gpus():
    state = ClusterState([node("a", gpus=2), node("b", gpus=1), node("c")])
    state.apply("p", Assignment("a", gpus=(0,), milli=100))
    two = Demand(gpu_count=2, gpu_milli=1000)
    assert reasons(state, two) == [Reason.GPUS_BUSY, Reason.TOO_FEW_GPUS, Reason.NO_GPU]


def test_share_needs_one_gpu_with_room():
    state = ClusterState([node("a", gpus=2)])
    state.apply("p", Assignment("a", gpus=(0,), milli=700))
    state.apply("q", Assignment("a", gpus=(1,), milli=700))
    assert reasons(state, Demand(gpu_count=1, gpu_milli=300)) == [Reason.FITS]
    assert reasons(state, Demand(gpu_count=1, gpu_milli=400)) == [Reason.NO_GPU_SHARE]


def test_gpu_model_cpu_and_memory():
    state = ClusterState([node("t4", gpus=1, model="T4"), node("v", gpus=1, model="V100M16", cpu=1000)])
    pod = Demand(cpu_milli=2000, gpu_count=1, gpu_milli=1000, allowed_models=frozenset({"V100M16"}))
    assert reasons(state, pod) == [Reason.GPU_MODEL, Reason.CPU]
    assert reasons(state, Demand(memory_mib=10**9)) == [Reason.MEMORY, Reason.MEMORY]


def test_gpu_memory_request_filters_small_gpus():
    state = ClusterState([node("a", gpus=1)])  # 16 GiB GPUs
    assert reasons(state, Demand(gpu_count=1, gpu_milli=500, gpu_memory_mib=20_000)) == [Reason.GPU_MEMORY_TOO_SMALL]


def test_measured_gpu_memory_bounds_what_declarations_leave():
    # Nothing is declared on either GPU, but GPU 0 measures 12 GiB in use (a server that took its memory up front).
    state = ClusterState([node("a", gpus=2)])  # 16 GiB GPUs
    pod = Demand(gpu_count=1, gpu_milli=500, gpu_memory_mib=8_192)
    idle, free = np.zeros(state.gpu_util.shape), np.full(state.gpu_util.shape, np.nan)
    free[0, :2] = 4_096.0, 16_384.0
    state.set_utilization(idle, memory_free_mib=free)
    assert usable_gpus(state.view(), np.arange(1), pod)[0, :2].tolist() == [False, True]
    free[0, 1] = 4_096.0
    state.set_utilization(idle, memory_free_mib=free)
    assert reasons(state, pod) == [Reason.NO_GPU_SHARE]
    state.set_utilization(idle)  # no reading: declarations alone decide
    assert reasons(state, pod) == [Reason.FITS]
    assert reasons(state, Demand(gpu_count=1, gpu_milli=500)) == [Reason.FITS]  # declares nothing: not checked


def test_mig_profile_availability():
    state = ClusterState([mig_node("m"), node("t4", gpus=1)])
    pod = Demand(gpu_count=1, gpu_milli=1000, mig_profile="4g.40gb")
    assert reasons(state, pod) == [Reason.FITS, Reason.NO_MIG_PROFILE]
    state.apply("p", Assignment("m", mig=MigPlacement(0, "3g.40gb", 0)))
    assert reasons(state, pod)[0] == Reason.MIG_SLICES_BUSY
    assert reasons(state, Demand(gpu_count=1, gpu_milli=1000, mig_profile="3g.40gb"))[0] == Reason.FITS


def test_hardware_reasons_are_not_resolvable_by_preemption():
    assert not is_resolvable(Reason.TOO_FEW_GPUS)
    assert not is_resolvable(Reason.GPU_MODEL)
    assert not is_resolvable(Reason.NO_MIG_PROFILE)
    assert is_resolvable(Reason.GPUS_BUSY)
    assert is_resolvable(Reason.MIG_SLICES_BUSY)


def test_static_mig_layout_offers_only_existing_instances():
    layout = (MigInstance("3g.40gb", 0), MigInstance("3g.40gb", 4))
    gpu = GpuDevice(0, "NVIDIA-H100-80GB-HBM3", 81_920, mig_table="H100-80GB", mig_instances=layout)
    state = ClusterState([NodeInventory("m", 64_000, 262_144, (gpu,))])
    three, four = (Demand(mig_profile=p) for p in ("3g.40gb", "4g.40gb"))
    assert reasons(state, four) == [Reason.NO_MIG_PROFILE]  # slices are free, but no such instance exists
    state.apply("p", Assignment("m", mig=MigPlacement(0, "3g.40gb", 0)))
    assert reasons(state, three) == [Reason.FITS]
    state.apply("q", Assignment("m", mig=MigPlacement(0, "3g.40gb", 4)))
    assert reasons(state, three) == [Reason.MIG_SLICES_BUSY]
