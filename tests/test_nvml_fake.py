"""The fake NVML answers like NVML: the same error classes in the same situations, real models and MIG tables."""

from __future__ import annotations

import pynvml
import pytest

from policies.mig import MIG_TABLES
from scheduler.agent.fake_nvml import CATALOG, FakeNvml
from scheduler.agent.nvml import MIB, MIG_DISABLE, MIG_ENABLE, PynvmlBackend, open_backend
from scheduler.agent.traces import Constant, Steps, Trace, parse_schedule, shared_data


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def started(spec: str, clock: Clock | None = None) -> FakeNvml:
    fake = FakeNvml.from_spec(spec, hostname="n1", clock=clock or Clock())
    fake.init()
    return fake


def test_calls_before_init_and_after_last_shutdown_raise_uninitialized() -> None:
    fake = FakeNvml.from_spec("t4")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.device_count()
    fake.init()
    fake.init()  # NVML counts initialisations
    handle = fake.device_handle(0)
    fake.shutdown()
    assert fake.device_count() == 1
    fake.shutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.memory(handle)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.shutdown()


def test_real_models_and_memory_totals() -> None:
    fake = started("h100,a100-40gb,a100-80gb,t4")
    seen = [(fake.name(h), fake.memory(h).total // MIB) for h in map(fake.device_handle, range(4))]
    assert seen == [
        ("NVIDIA H100 80GB HBM3", 81_559),
        ("NVIDIA A100-SXM4-40GB", 40_960),
        ("NVIDIA A100-SXM4-80GB", 81_920),
        ("Tesla T4", 15_360),
    ]
    uuids = {fake.uuid(fake.device_handle(i)) for i in range(4)}
    assert len(uuids) == 4 and all(u.startswith("GPU-") for u in uuids)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.device_handle(4)


def test_uuids_are_stable_per_host_and_differ_between_hosts() -> None:
    a = FakeNvml.from_spec("h100x2", hostname="n1")
    b = FakeNvml.from_spec("h100x2", hostname="n1")
    c = FakeNvml.from_spec("h100x2", hostname="n2")
    assert [g.uuid for g in a.gpus] == [g.uuid for g in b.gpus] != [g.uuid for g in c.gpus]


def test_mig_calls_on_a_t4_are_not_supported() -> None:
    fake = started("t4")
    h = fake.device_handle(0)
    for call in (
        lambda: fake.mig_mode(h),
        lambda: fake.max_mig_device_count(h),
        lambda: fake.mig_device_handle(h, 0),
        lambda: fake.gpu_instance_profile(h, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE),
        lambda: fake.gpu_instance_info(h, 1),
        lambda: fake.gpu_instance_id(h),
        lambda: fake.engine_activity(h),  # no GPM before Hopper
    ):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            call()
    assert fake.utilization(h).gpu == 0


def test_mig_devices_report_profile_placement_and_no_utilization() -> None:
    fake = started("h100/mig=3g.40gb@4+2g.20gb@0+1g.10gb@2;util=const:60;mem=const:50")
    h = fake.device_handle(0)
    assert fake.mig_mode(h) == (MIG_ENABLE, MIG_ENABLE)
    assert fake.max_mig_device_count(h) == 7
    migs = [fake.mig_device_handle(h, k) for k in range(3)]
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.mig_device_handle(h, 3)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.mig_device_handle(h, 7)
    placements = {}
    for mig in migs:
        gi = fake.gpu_instance_id(mig)
        info = fake.gpu_instance_info(h, gi)
        placements[info.profile_id] = (info.start, info.size)
        assert fake.uuid(mig).startswith("MIG-")
        with pytest.raises(pynvml.NVMLError_NotSupported):
            fake.utilization(mig)
        memory = fake.memory(mig)
        assert 0 < memory.used < memory.total < 81_559 * MIB
    assert placements == {9: (4, 4), 14: (0, 2), 19: (2, 1)}  # nvidia-smi mig -lgip profile ids
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.utilization(h)  # the whole GPU reports no utilization in MIG mode
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.gpu_instance_info(h, 42)


def test_profile_infos_follow_the_mig_tables() -> None:
    fake = started("a100-40gb")
    h = fake.device_handle(0)
    assert fake.mig_mode(h) == (MIG_DISABLE, MIG_DISABLE)
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.mig_device_handle(h, 0)
    names = {}
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            p = fake.gpu_instance_profile(h, index)
        except pynvml.NVMLError_NotSupported:
            continue
        names[p.id] = (p.name, p.slice_count)
    assert names == {
        19: ("1g.5gb", 1),
        20: ("1g.5gb+me", 1),
        15: ("1g.10gb", 1),
        14: ("2g.10gb", 2),
        9: ("3g.20gb", 3),
        5: ("4g.20gb", 4),
        0: ("7g.40gb", 7),
    }
    assert {n for n, _ in names.values()} - {"1g.5gb+me"} == set(MIG_TABLES["A100-40GB"].profile_names)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.gpu_instance_profile(h, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)


def test_invalid_mig_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be placed"):
        FakeNvml.from_spec("h100/mig=3g.40gb@2")  # a 3g starts at 0 or 4
    with pytest.raises(ValueError, match="cannot be placed"):
        FakeNvml.from_spec("h100/mig=4g.40gb@0+3g.40gb@0")
    with pytest.raises(ValueError, match="no MIG profile"):
        FakeNvml.from_spec("a100-40gb/mig=3g.40gb@0")  # an H100/A100-80GB name
    with pytest.raises(ValueError, match="does not support MIG"):
        FakeNvml.from_spec("t4/mig=1g.5gb@0")
    with pytest.raises(ValueError, match="MODEL"):
        FakeNvml.from_spec("v100x2")
    with pytest.raises(ValueError, match="unknown fake NVML options"):
        FakeNvml.from_spec("h100;colour=red")


def test_engine_activity_needs_two_samples_and_exists_per_mig_instance_on_hopper() -> None:
    fake = started("h100,h100/mig=7g.80gb@0;util=const:30")
    whole, mig = fake.device_handle(0), fake.device_handle(1)
    assert fake.engine_activity(whole) is None
    assert fake.engine_activity(whole) == pytest.approx(0.3)
    assert fake.engine_activity(mig, 0) is None
    assert fake.engine_activity(mig, 0) == pytest.approx(0.3)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.engine_activity(mig)  # not for the whole GPU in MIG mode
    a100 = started("a100-80gb/mig=7g.80gb@0")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        a100.engine_activity(a100.device_handle(0), 0)


def test_driver_failures_and_lost_gpus() -> None:
    fake = FakeNvml.from_spec("h100x2;fail=driver*2;lost=1")
    for _ in range(2):
        with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
            fake.init()
    fake.init()
    assert fake.device_count() == 2
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.device_handle(1)
    always = FakeNvml.from_spec("t4;fail=library")
    for _ in range(3):
        with pytest.raises(pynvml.NVMLError_LibraryNotFound):
            always.init()


def test_step_schedule_drives_utilization_over_time() -> None:
    clock = Clock(0.0)
    fake = started("t4;util=step:10@0,90@30,20@60", clock)
    h = fake.device_handle(0)
    readings = []
    for t in (0.0, 29.0, 30.0, 59.9, 600.0):
        clock.t = t
        readings.append(fake.utilization(h).gpu)
    assert readings == [10, 10, 90, 90, 20]


def test_memory_schedule_is_a_share_of_the_frame_buffer() -> None:
    fake = started("a100-80gb;mem=const:25")
    memory = fake.memory(fake.device_handle(0))
    assert memory.used == 81_920 * MIB // 4 and memory.free == memory.total - memory.used


def test_schedules_parse() -> None:
    assert parse_schedule("const:40") == Constant(0.4)
    assert parse_schedule("step:0@0,50@10") == Steps(((0.0, 0.0), (10.0, 0.5)))
    with pytest.raises(ValueError):
        parse_schedule("const:140")
    with pytest.raises(ValueError):
        parse_schedule("sine:3")


requires_traces = pytest.mark.skipif(
    not (shared_data() / "genai-serving" / "pod_gpu_duty_cycle_anon.csv").is_file(), reason="shared data absent"
)


@requires_traces
def test_recorded_duty_cycle_drives_devices_differently_and_reproducibly() -> None:
    clock = Clock(0.0)
    spec = "h100x4;util=trace;mem=trace;speed=57"
    fake, again = started(spec, clock), started(spec, clock)
    schedule = fake.util_schedule
    assert isinstance(schedule, Trace) and len(schedule.series) > 100
    series = []
    for t in range(0, 600, 7):
        clock.t = float(t)
        series.append(tuple(fake.utilization(fake.device_handle(i)).gpu for i in range(4)))
        assert series[-1] == tuple(again.utilization(again.device_handle(i)).gpu for i in range(4))
        for i in range(4):
            memory = fake.memory(fake.device_handle(i))
            assert 0 <= memory.used <= 0.95 * memory.total
    memory_schedule = fake.memory_schedule
    assert isinstance(memory_schedule, Trace)
    assert [memory_schedule.pick(f"n1/{i}").pod for i in range(4)] == [schedule.pick(f"n1/{i}").pod for i in range(4)]
    per_device = list(zip(*series, strict=True))
    assert len(set(per_device)) > 1  # devices replay different pods
    assert all(0 <= v <= 100 for v in sum(per_device, ()))
    assert any(len(set(d)) > 1 for d in per_device)  # and the load moves


def test_open_backend() -> None:
    assert isinstance(open_backend("real"), PynvmlBackend)
    fake = open_backend("fake:t4x3", hostname="n9")
    assert isinstance(fake, FakeNvml) and len(fake.gpus) == 3 and fake.hostname == "n9"
    with pytest.raises(ValueError):
        open_backend("dcgm")
    assert set(CATALOG) == {"h100", "a100-40gb", "a100-80gb", "t4"}


def test_real_nvml_without_a_driver_raises_nvml_errors() -> None:
    backend = PynvmlBackend()
    try:
        backend.init()
    except pynvml.NVMLError as exc:
        assert isinstance(exc, (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded))
        return
    try:  # a machine with a GPU: the real backend reads it
        assert backend.device_count() >= 1
        h = backend.device_handle(0)
        assert backend.uuid(h).startswith("GPU-") and backend.memory(h).total > 0
    finally:
        backend.shutdown()
