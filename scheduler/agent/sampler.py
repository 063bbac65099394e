"""One pass over every GPU through an `NvmlBackend`: the readings for `/metrics` and the node's inventory.

Readings NVML does not support on a device (utilization of a MIG device, engine activity before Hopper) are left
out, never reported as 0, and recorded as unsupported. Other errors on one reading or one GPU leave that part out
and are counted; errors that mean NVML itself is gone (uninitialised, driver unloaded) propagate so that the agent
re-initialises it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import pynvml
from pydantic import ValidationError

from policies.mig import MIG_TABLES, mig_table_for
from scheduler.agent.nvml import GPU_INSTANCE_PROFILE_COUNT, MIB, MIG_ENABLE, GpuInstanceProfile, NvmlBackend
from scheduler.annotations import GpuDoc, MigDoc, MigInstanceDoc, NodeInventoryDoc

__all__ = [
    "FATAL_ERRORS",
    "METRICS",
    "DeviceSample",
    "GpuState",
    "MigState",
    "NodeSample",
    "Sampler",
    "gfd_product",
    "inventory_doc",
    "shareable_gpus",
]

log = logging.getLogger("gpu_extender.agent")

# DCGM field name -> DeviceSample attribute.
METRICS: dict[str, str] = {
    "DCGM_FI_DEV_GPU_UTIL": "gpu_util",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "mem_copy_util",
    "DCGM_FI_DEV_FB_USED": "fb_used_mib",
    "DCGM_FI_DEV_FB_FREE": "fb_free_mib",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "engine_active",
}

# Errors after which no reading can be trusted until NVML is initialised again.
FATAL_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(pynvml, name)
    for name in (
        "NVMLError_Uninitialized",
        "NVMLError_DriverNotLoaded",
        "NVMLError_LibraryNotFound",
        "NVMLError_LibRmVersionMismatch",
    )
    if hasattr(pynvml, name)
)

T = TypeVar("T")


@dataclass(frozen=True)
class DeviceSample:
    """One device's readings, labelled as DCGM exporter labels them (a MIG device carries its GPU's index and UUID)."""

    gpu: int
    uuid: str
    model_name: str
    pci_bus_id: str
    mig_profile: str | None = None
    gpu_instance_id: int | None = None
    gpu_util: float | None = None  # percent
    mem_copy_util: float | None = None  # percent
    fb_used_mib: float | None = None
    fb_free_mib: float | None = None
    engine_active: float | None = None  # ratio 0..1


@dataclass(frozen=True)
class MigState:
    gpu_instance_id: int
    profile: str
    start: int
    uuid: str


@dataclass(frozen=True)
class GpuState:
    """What the inventory needs of one physical GPU."""

    index: int
    uuid: str
    name: str
    memory_mib: int
    mig_capable: bool
    mig_enabled: bool
    mig_pending: bool
    instances: tuple[MigState, ...] = ()


@dataclass(frozen=True)
class NodeSample:
    taken_at: float  # unix seconds
    duration_s: float
    devices: tuple[DeviceSample, ...]
    gpus: tuple[GpuState, ...]
    supported: dict[tuple[str, int], bool] = field(default_factory=dict)  # (metric, gpu index) -> supported
    complete: bool = True  # every GPU was read, or reported lost: the inventory can be trusted


class _Unsupported(Exception):
    """A reading NVML does not offer on this device."""


class Sampler:
    """Reads every GPU once per call. Keeps per-GPU MIG profile tables and which errors were already logged."""

    def __init__(self, backend: NvmlBackend, clock: Callable[[], float] = time.time) -> None:
        self._nvml = backend
        self._clock = clock
        self._profiles: dict[str, dict[int, GpuInstanceProfile]] = {}
        self._logged: set[tuple[Any, ...]] = set()
        self.errors: dict[tuple[str, str], int] = {}  # (call, error class) -> count

    def reset(self) -> None:
        """Forget cached NVML state (after a re-initialisation the devices may have changed)."""
        self._profiles.clear()

    def sample(self) -> NodeSample:
        started = time.perf_counter()
        devices: list[DeviceSample] = []
        gpus: list[GpuState] = []
        supported: dict[tuple[str, int], bool] = {}
        complete = True
        for index in range(self._nvml.device_count()):
            try:
                gpu, readings = self._read_gpu(index, supported)
            except FATAL_ERRORS:
                raise
            except pynvml.NVMLError as exc:
                self._error("device", exc, index)
                complete = complete and isinstance(exc, pynvml.NVMLError_GpuIsLost)
                continue
            gpus.append(gpu)
            devices.extend(readings)
        duration = time.perf_counter() - started
        return NodeSample(self._clock(), duration, tuple(devices), tuple(gpus), supported, complete)

    # -- one GPU -----------------------------------------------------------------------------------------
    def _read_gpu(self, index: int, supported: dict[tuple[str, int], bool]) -> tuple[GpuState, list[DeviceSample]]:
        nvml = self._nvml
        handle = nvml.device_handle(index)
        uuid, name = nvml.uuid(handle), nvml.name(handle)
        bus = self._try("pci_bus_id", index, lambda: nvml.pci_bus_id(handle))[0] or ""
        memory = nvml.memory(handle)
        try:
            current, pending = nvml.mig_mode(handle)
            capable = True
        except pynvml.NVMLError_NotSupported:
            current = pending = 0
            capable = False
        enabled = current == MIG_ENABLE
        if capable and pending != current:
            self.log_once(
                ("pending", uuid), "MIG mode change pending a GPU reset", gpu=index, current=current, pending=pending
            )
        base = DeviceSample(index, uuid, name, bus)
        readings: list[DeviceSample] = []
        instances: tuple[MigState, ...] = ()
        if enabled:
            instances, readings = self._read_mig(index, handle, uuid, base, supported)
            whole = replace(base, fb_used_mib=memory.used / MIB, fb_free_mib=memory.free / MIB)
            self._mark(supported, index, "DCGM_FI_DEV_GPU_UTIL", False)
            self._mark(supported, index, "DCGM_FI_DEV_MEM_COPY_UTIL", False)
        else:
            util, util_ok = self._try("utilization", index, lambda: nvml.utilization(handle))
            activity, activity_ok = self._try("engine_activity", index, lambda: nvml.engine_activity(handle))
            whole = replace(
                base,
                fb_used_mib=memory.used / MIB,
                fb_free_mib=memory.free / MIB,
                gpu_util=None if util is None else float(util.gpu),
                mem_copy_util=None if util is None else float(util.memory),
                engine_active=activity,
            )
            self._mark(supported, index, "DCGM_FI_DEV_GPU_UTIL", util_ok)
            self._mark(supported, index, "DCGM_FI_DEV_MEM_COPY_UTIL", util_ok)
            self._mark(supported, index, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", activity_ok)
        self._mark(supported, index, "DCGM_FI_DEV_FB_USED", True)
        self._mark(supported, index, "DCGM_FI_DEV_FB_FREE", True)
        state = GpuState(index, uuid, name, memory.total // MIB, capable, enabled, pending == MIG_ENABLE, instances)
        return state, [whole, *readings]

    def _read_mig(
        self, index: int, handle: Any, uuid: str, base: DeviceSample, supported: dict[tuple[str, int], bool]
    ) -> tuple[tuple[MigState, ...], list[DeviceSample]]:
        nvml = self._nvml
        profiles = self._profile_table(uuid, handle)
        seen: dict[int, MigState] = {}
        readings: list[DeviceSample] = []
        for k in range(nvml.max_mig_device_count(handle)):
            try:
                mig = nvml.mig_device_handle(handle, k)
            except pynvml.NVMLError_NotFound:
                continue
            gi = nvml.gpu_instance_id(mig)
            if gi in seen:  # several compute instances of one GPU instance: one entry, as DCGM reports it
                continue
            info = nvml.gpu_instance_info(handle, gi)
            profile = profiles.get(info.profile_id)
            profile_name = profile.name if profile else f"profile-{info.profile_id}"
            seen[gi] = MigState(gi, profile_name, info.start, nvml.uuid(mig))
            memory = nvml.memory(mig)
            util, _ = self._try("utilization", index, partial(nvml.utilization, mig))
            activity, activity_ok = self._try("engine_activity", index, partial(nvml.engine_activity, handle, gi))
            readings.append(
                replace(
                    base,
                    mig_profile=profile_name,
                    gpu_instance_id=gi,
                    fb_used_mib=memory.used / MIB,
                    fb_free_mib=memory.free / MIB,
                    gpu_util=None if util is None else float(util.gpu),
                    engine_active=activity,
                )
            )
            self._mark(supported, index, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", activity_ok)
        return tuple(sorted(seen.values(), key=lambda s: s.start)), readings

    def _profile_table(self, uuid: str, handle: Any) -> dict[int, GpuInstanceProfile]:
        """Profile id -> profile, read once per GPU (`nvmlGpuInstanceGetInfo` gives only the id)."""
        table = self._profiles.get(uuid)
        if table is None:
            table = {}
            for profile_index in range(GPU_INSTANCE_PROFILE_COUNT):
                try:
                    p = self._nvml.gpu_instance_profile(handle, profile_index)
                except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_InvalidArgument):
                    continue
                table[p.id] = p
            self._profiles[uuid] = table
        return table

    # -- error handling ----------------------------------------------------------------------------------
    def _try(self, call: str, index: int, read: Callable[[], T | None]) -> tuple[T | None, bool]:
        """(value, supported): None and False where NVML does not support it; None and True where it failed
        otherwise (counted and logged once) or has no value yet."""
        try:
            return read(), True
        except pynvml.NVMLError_NotSupported:
            return None, False
        except FATAL_ERRORS:
            raise
        except pynvml.NVMLError as exc:
            self._error(call, exc, index)
            return None, True

    def _error(self, call: str, exc: pynvml.NVMLError, index: int) -> None:
        kind = type(exc).__name__
        self.errors[(call, kind)] = self.errors.get((call, kind), 0) + 1
        self.log_once((call, kind, index), "NVML call failed", call=call, gpu=index, error=f"{kind}: {exc}")

    def log_once(self, key: tuple[Any, ...], message: str, **fields: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, extra=fields)

    @staticmethod
    def _mark(supported: dict[tuple[str, int], bool], index: int, metric: str, ok: bool) -> None:
        supported[(metric, index)] = supported.get((metric, index), False) or ok


# -- inventory -------------------------------------------------------------------------------------------
def gfd_product(nvml_name: str) -> str:
    """The model as GPU Feature Discovery labels it (`nvidia.com/gpu.product`): NVML's name, spaces as dashes."""
    return "-".join(nvml_name.split())


def inventory_doc(
    gpus: tuple[GpuState, ...], skipped: Callable[[str, dict[str, Any]], None] | None = None
) -> NodeInventoryDoc:
    """The node's `gpu-extender.io/gpu-inventory` document (without `observedAt`).

    MIG instances of profiles the scheduler's tables do not know (such as `+me` variants) are left out, so the
    scheduler never offers them; a GPU in MIG mode whose model has no table is left out whole.
    """
    docs: list[GpuDoc] = []
    for g in gpus:
        model = gfd_product(g.name)
        mig: MigDoc | None = None
        if g.mig_enabled:
            table_name = mig_table_for(model, g.memory_mib)
            if table_name is None:
                if skipped:
                    skipped("GPU in MIG mode without a known MIG table", {"gpu": g.index, "model": model})
                continue
            table = MIG_TABLES[table_name]
            kept = []
            for inst in g.instances:
                profile = table.profile(inst.profile)
                if profile is None or inst.start not in profile.starts:
                    if skipped:
                        skipped("MIG instance of an unknown profile", {"gpu": g.index, "profile": inst.profile})
                    continue
                kept.append(MigInstanceDoc(profile=inst.profile, start=inst.start, uuid=inst.uuid))
            mig = MigDoc(enabled=True, instances=kept)
        elif g.mig_capable:
            mig = MigDoc(enabled=False)
        try:
            docs.append(GpuDoc(index=g.index, uuid=g.uuid, model=model, memoryMiB=g.memory_mib, mig=mig))
        except ValidationError as exc:
            if skipped:
                skipped("GPU does not fit the inventory schema", {"gpu": g.index, "error": str(exc)})
    return NodeInventoryDoc(v=1, gpus=docs, observedAt=None)


def shareable_gpus(doc: NodeInventoryDoc) -> int:
    """GPUs usable whole or shared (not in MIG mode): the node advertises 1000 `gpu-milli` for each."""
    return sum(1 for g in doc.gpus if g.mig is None or not g.mig.enabled)
