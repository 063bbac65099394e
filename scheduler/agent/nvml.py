"""The slice of NVML the node agent uses, behind a Protocol so that tests run the agent against a faithful fake.

Each method is one NVML call (or a fixed sequence of them) and raises what NVML raises: `pynvml.NVMLError`
subclasses such as `NVMLError_NotSupported` (a MIG device asked for its utilization, a T4 asked for its MIG
mode), `NVMLError_LibraryNotFound` or `NVMLError_DriverNotLoaded` at `init`. The agent decides what an error
means; the backends only report it.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from typing import Any, Protocol

import pynvml

__all__ = [
    "GPU_INSTANCE_PROFILE_COUNT",
    "MIG_DISABLE",
    "MIG_ENABLE",
    "GpuInstanceInfo",
    "GpuInstanceProfile",
    "Memory",
    "NvmlBackend",
    "PynvmlBackend",
    "Utilization",
    "nvml_error",
    "open_backend",
]

MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
GPU_INSTANCE_PROFILE_COUNT = pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT
MIB = 1 << 20

Handle = Any  # an opaque device handle; only the backend that produced it may read it


@dataclass(frozen=True)
class Memory:
    """Frame buffer in bytes, as `nvmlDeviceGetMemoryInfo` reports it (per instance on a MIG device)."""

    total: int
    used: int

    @property
    def free(self) -> int:
        return max(self.total - self.used, 0)


@dataclass(frozen=True)
class Utilization:
    """`nvmlDeviceGetUtilizationRates`: percent of the last sample period a kernel ran / memory was read or written."""

    gpu: int
    memory: int


@dataclass(frozen=True)
class GpuInstanceInfo:
    """`nvmlGpuInstanceGetInfo`: the instance's profile id and its placement in memory slices."""

    id: int
    profile_id: int
    start: int
    size: int


@dataclass(frozen=True)
class GpuInstanceProfile:
    """`nvmlDeviceGetGpuInstanceProfileInfo` (v2) for one profile index, name without NVML's `MIG ` prefix."""

    id: int
    name: str
    slice_count: int
    memory_mib: int


class NvmlBackend(Protocol):
    """What the agent reads from NVML. Every method may raise a `pynvml.NVMLError` subclass."""

    def init(self) -> None: ...

    def shutdown(self) -> None: ...

    def device_count(self) -> int: ...

    def device_handle(self, index: int) -> Handle: ...

    def uuid(self, device: Handle) -> str: ...

    def name(self, device: Handle) -> str: ...

    def pci_bus_id(self, device: Handle) -> str: ...

    def memory(self, device: Handle) -> Memory: ...

    def utilization(self, device: Handle) -> Utilization: ...

    def mig_mode(self, device: Handle) -> tuple[int, int]:
        """(current, pending) MIG mode; a pending change takes effect after a GPU reset."""
        ...

    def max_mig_device_count(self, device: Handle) -> int: ...

    def mig_device_handle(self, device: Handle, index: int) -> Handle:
        """The MIG device at `index` (0 .. max count - 1); `NVMLError_NotFound` where none exists."""
        ...

    def gpu_instance_id(self, mig_device: Handle) -> int: ...

    def gpu_instance_info(self, device: Handle, gpu_instance_id: int) -> GpuInstanceInfo: ...

    def gpu_instance_profile(self, device: Handle, profile_index: int) -> GpuInstanceProfile: ...

    def engine_activity(self, device: Handle, gpu_instance_id: int | None = None) -> float | None:
        """Graphics/compute engine active ratio 0..1 since the previous call (GPM, Hopper and later).

        None on the first call for a device or instance, when there is no interval to measure yet.
        """
        ...


def nvml_error(code: int) -> pynvml.NVMLError:
    """The `NVMLError` subclass NVML raises for `code` (e.g. `NVMLError_NotSupported`)."""
    return pynvml.NVMLError(code)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _profile_name(raw: str | bytes) -> str:
    name = _text(raw).strip()
    return name[4:] if name.startswith("MIG ") else name


class PynvmlBackend:
    """NVML through `nvidia-ml-py`. GPM samples are kept between calls to measure engine activity."""

    def __init__(self) -> None:
        self._gpm: dict[tuple[int, int | None], Any] = {}
        self._gpm_support: dict[int, bool] = {}

    def init(self) -> None:
        pynvml.nvmlInit()

    def shutdown(self) -> None:
        for sample in self._gpm.values():
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlGpmSampleFree(sample)
        self._gpm.clear()
        self._gpm_support.clear()
        pynvml.nvmlShutdown()

    def device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def device_handle(self, index: int) -> Handle:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def uuid(self, device: Handle) -> str:
        return _text(pynvml.nvmlDeviceGetUUID(device))

    def name(self, device: Handle) -> str:
        return _text(pynvml.nvmlDeviceGetName(device))

    def pci_bus_id(self, device: Handle) -> str:
        return _text(pynvml.nvmlDeviceGetPciInfo(device).busId)

    def memory(self, device: Handle) -> Memory:
        info = pynvml.nvmlDeviceGetMemoryInfo(device)
        return Memory(total=int(info.total), used=int(info.used))

    def utilization(self, device: Handle) -> Utilization:
        rates = pynvml.nvmlDeviceGetUtilizationRates(device)
        return Utilization(gpu=int(rates.gpu), memory=int(rates.memory))

    def mig_mode(self, device: Handle) -> tuple[int, int]:
        current, pending = pynvml.nvmlDeviceGetMigMode(device)
        return int(current), int(pending)

    def max_mig_device_count(self, device: Handle) -> int:
        return int(pynvml.nvmlDeviceGetMaxMigDeviceCount(device))

    def mig_device_handle(self, device: Handle, index: int) -> Handle:
        return pynvml.nvmlDeviceGetMigDeviceHandleByIndex(device, index)

    def gpu_instance_id(self, mig_device: Handle) -> int:
        return int(pynvml.nvmlDeviceGetGpuInstanceId(mig_device))

    def gpu_instance_info(self, device: Handle, gpu_instance_id: int) -> GpuInstanceInfo:
        instance = pynvml.nvmlDeviceGetGpuInstanceById(device, gpu_instance_id)
        info = pynvml.nvmlGpuInstanceGetInfo(instance)
        return GpuInstanceInfo(
            id=int(info.id),
            profile_id=int(info.profileId),
            start=int(info.placement.start),
            size=int(info.placement.size),
        )

    def gpu_instance_profile(self, device: Handle, profile_index: int) -> GpuInstanceProfile:
        info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(device, profile_index)
        return GpuInstanceProfile(
            id=int(info.id),
            name=_profile_name(info.name),
            slice_count=int(info.sliceCount),
            memory_mib=int(info.memorySizeMB),
        )

    def engine_activity(self, device: Handle, gpu_instance_id: int | None = None) -> float | None:
        address = ctypes.cast(device, ctypes.c_void_p).value or 0
        if not self._gpm_supported(device, address):
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        sample = pynvml.nvmlGpmSampleAlloc()
        try:
            if gpu_instance_id is None:
                pynvml.nvmlGpmSampleGet(device, sample)
            else:
                pynvml.nvmlGpmMigSampleGet(device, gpu_instance_id, sample)
        except pynvml.NVMLError:
            pynvml.nvmlGpmSampleFree(sample)
            raise
        previous = self._gpm.get((address, gpu_instance_id))
        self._gpm[(address, gpu_instance_id)] = sample
        if previous is None:
            return None
        try:
            query = pynvml.c_nvmlGpmMetricsGet_t()
            query.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            query.numMetrics = 1
            query.sample1 = previous
            query.sample2 = sample
            query.metrics[0].metricId = pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL
            pynvml.nvmlGpmMetricsGet(query)
        finally:
            pynvml.nvmlGpmSampleFree(previous)
        metric = query.metrics[0]
        if metric.nvmlReturn != pynvml.NVML_SUCCESS:
            raise nvml_error(int(metric.nvmlReturn))
        return min(max(float(metric.value) / 100.0, 0.0), 1.0)

    def _gpm_supported(self, device: Handle, address: int) -> bool:
        known = self._gpm_support.get(address)
        if known is None:
            try:
                known = bool(pynvml.nvmlGpmQueryDeviceSupport(device).isSupportedDevice)
            except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
                known = False
            self._gpm_support[address] = known
        return known


def open_backend(spec: str, hostname: str = "") -> NvmlBackend:
    """`real` for NVML itself, `fake:SPEC` for the fake (see `scheduler.agent.fake_nvml`)."""
    if spec in ("", "real"):
        return PynvmlBackend()
    if spec.startswith("fake:") or spec == "fake":
        from scheduler.agent.fake_nvml import FakeNvml

        return FakeNvml.from_spec(spec.partition(":")[2], hostname=hostname)
    raise ValueError(f"unknown NVML backend {spec!r}: use 'real' or 'fake:SPEC'")
