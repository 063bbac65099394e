"""The real backend's glue over `nvidia-ml-py`, with NVML's C functions replaced by stand-ins that fill the same
structs: field names, the `MIG ` prefix, GPM's two-sample protocol and error mapping, without a GPU."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pynvml
import pytest

from scheduler.agent.nvml import PynvmlBackend

OK = pynvml.NVML_SUCCESS


@pytest.fixture
def c_functions(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[..., int]]:
    table: dict[str, Callable[..., int]] = {}

    def lookup(name: str) -> Callable[..., int]:
        if name not in table:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return table[name]

    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", lookup)
    return table


def out(ref: Any) -> Any:
    """The object behind a `ctypes.byref` argument."""
    return ref._obj


def device() -> Any:
    return ctypes.pointer(pynvml.struct_c_nvmlDevice_t())


def test_mig_placement_and_profile_names(c_functions: dict[str, Callable[..., int]]) -> None:
    def mig_mode(dev: Any, current: Any, pending: Any) -> int:
        out(current).value, out(pending).value = 1, 0
        return OK

    def profile_info(dev: Any, profile: int, info: Any) -> int:
        if profile != pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        i = out(info)
        i.id, i.sliceCount, i.memorySizeMB, i.name = 9, 3, 40_192, b"MIG 3g.40gb"
        return OK

    def instance_by_id(dev: Any, gi: int, instance: Any) -> int:
        return OK if gi == 2 else pynvml.NVML_ERROR_NOT_FOUND

    def instance_info(instance: Any, info: Any) -> int:
        i = out(info)
        i.id, i.profileId, i.placement.start, i.placement.size = 2, 9, 4, 4
        return OK

    c_functions.update(
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetGpuInstanceProfileInfoV=profile_info,
        nvmlDeviceGetGpuInstanceById=instance_by_id,
        nvmlGpuInstanceGetInfo=instance_info,
        nvmlDeviceGetUtilizationRates=lambda dev, util: pynvml.NVML_ERROR_NOT_SUPPORTED,
    )
    backend = PynvmlBackend()
    d = device()
    assert backend.mig_mode(d) == (1, 0)
    profile = backend.gpu_instance_profile(d, pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE)
    assert (profile.id, profile.name, profile.slice_count, profile.memory_mib) == (9, "3g.40gb", 3, 40_192)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        backend.gpu_instance_profile(d, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE)
    info = backend.gpu_instance_info(d, 2)
    assert (info.id, info.profile_id, info.start, info.size) == (2, 9, 4, 4)
    with pytest.raises(pynvml.NVMLError_NotFound):
        backend.gpu_instance_info(d, 5)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        backend.utilization(d)


def test_engine_activity_from_two_gpm_samples(c_functions: dict[str, Callable[..., int]]) -> None:
    freed: list[int] = []
    mig_samples: list[int] = []

    def support(dev: Any, s: Any) -> int:
        out(s).isSupportedDevice = 1
        return OK

    def metrics_get(query: Any) -> int:
        q = out(query)
        assert q.numMetrics == 1 and q.metrics[0].metricId == pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL
        q.metrics[0].value, q.metrics[0].nvmlReturn = 37.5, OK
        return OK

    def mig_sample(dev: Any, gi: int, sample: Any) -> int:
        mig_samples.append(gi)
        return OK

    c_functions.update(
        nvmlGpmQueryDeviceSupport=support,
        nvmlGpmSampleAlloc=lambda sample: OK,
        nvmlGpmSampleGet=lambda dev, sample: OK,
        nvmlGpmMigSampleGet=mig_sample,
        nvmlGpmMetricsGet=metrics_get,
        nvmlGpmSampleFree=lambda sample: freed.append(1) or OK,
        nvmlShutdown=lambda: OK,
    )
    backend = PynvmlBackend()
    d = device()
    assert backend.engine_activity(d) is None  # no interval yet
    assert backend.engine_activity(d) == pytest.approx(0.375)
    assert backend.engine_activity(d, 3) is None  # each MIG instance has its own pair
    assert backend.engine_activity(d, 3) == pytest.approx(0.375)
    assert mig_samples == [3, 3]
    assert len(freed) == 2  # the older sample of each pair
    backend.shutdown()
    assert len(freed) == 4  # and the kept ones at shutdown


def test_engine_activity_is_not_supported_without_gpm(c_functions: dict[str, Callable[..., int]]) -> None:
    def support(dev: Any, s: Any) -> int:
        out(s).isSupportedDevice = 0
        return OK

    c_functions["nvmlGpmQueryDeviceSupport"] = support
    with pytest.raises(pynvml.NVMLError_NotSupported):
        PynvmlBackend().engine_activity(device())
    del c_functions["nvmlGpmQueryDeviceSupport"]  # a driver older than GPM
    with pytest.raises(pynvml.NVMLError_NotSupported):
        PynvmlBackend().engine_activity(device())


def test_strings_and_memory(c_functions: dict[str, Callable[..., int]]) -> None:
    def name(dev: Any, buf: Any, size: Any) -> int:
        ctypes.memmove(buf, b"NVIDIA H100 80GB HBM3\0", 22)
        return OK

    def memory(dev: Any, m: Any) -> int:
        out(m).total, out(m).used, out(m).free = 85_520_809_984, 1 << 30, 85_520_809_984 - (1 << 30)
        return OK

    def pci(dev: Any, info: Any) -> int:
        out(info).busId = b"00000000:18:00.0"
        return OK

    c_functions.update(nvmlDeviceGetName=name, nvmlDeviceGetMemoryInfo=memory, nvmlDeviceGetPciInfo_v3=pci)
    backend = PynvmlBackend()
    d = device()
    assert backend.name(d) == "NVIDIA H100 80GB HBM3"
    assert backend.pci_bus_id(d) == "00000000:18:00.0"
    m = backend.memory(d)
    assert (m.total >> 20, m.used >> 20) == (81_559, 1_024)
