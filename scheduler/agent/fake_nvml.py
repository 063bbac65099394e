"""A fake NVML with real GPU models, for tests and for running many agents on a machine without GPUs.

It answers like NVML: the same `pynvml.NVMLError` subclasses for the same situations (a call before `init` or after
the last `shutdown` raises `NVMLError_Uninitialized`; utilization of a MIG device, or of a GPU in MIG mode, raises
`NVMLError_NotSupported`; MIG calls on a T4 raise `NVMLError_NotSupported`; engine activity (GPM) exists on Hopper
only and needs two samples, so the first call answers None). Models carry NVML's names and memory totals and the
MIG profile ids and placements of NVIDIA's tables.

Spec (`gpu-extender agent --nvml fake:SPEC`)::

    SPEC   := GROUP ("," GROUP)* (";" OPTION)*
    GROUP  := MODEL ["x" COUNT] ["/mig=" [PROFILE "@" START ("+" PROFILE "@" START)*]]
    OPTION := util=SCHEDULE | mem=SCHEDULE | speed=FLOAT | offset=SEC | seed=INT | fail=driver|library[*N]
            | lost=I[+I...]

MODEL is one of `h100`, `a100-40gb`, `a100-80gb`, `t4`; SCHEDULE is `const:PCT`, `step:PCT@SEC,...` or
`trace[:PATH]` (see `scheduler.agent.traces`); `speed` and `offset` (trace seconds) place a trace replay in time,
`seed` changes which recorded pod each device replays. Example: `h100x2,a100-40gb/mig=3g.20gb@0+2g.10gb@4;util=trace`.
"""

from __future__ import annotations

import re
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pynvml

from policies.mig import MIG_TABLES, MigProfile
from scheduler.agent.nvml import (
    GPU_INSTANCE_PROFILE_COUNT,
    MIB,
    MIG_DISABLE,
    MIG_ENABLE,
    GpuInstanceInfo,
    GpuInstanceProfile,
    Memory,
    Utilization,
    nvml_error,
)
from scheduler.agent.traces import Constant, Schedule, Trace, parse_schedule

__all__ = ["CATALOG", "FakeGpu", "FakeHandle", "FakeInstance", "FakeNvml", "GpuModel"]

_UUID_NS = uuidlib.UUID("5f0c1a8e-3d0b-4c55-9a7e-2f1d6b9e4c21")
_MAX_MIG_DEVICES = 7


@dataclass(frozen=True)
class GpuModel:
    """A GPU as NVML names it, with its frame buffer and (for MIG-capable GPUs) its `policies.mig` table."""

    key: str
    name: str
    memory_mib: int
    mig_table: str | None = None
    gpm: bool = False  # GPU performance monitoring (engine activity): Hopper and later


CATALOG: dict[str, GpuModel] = {
    m.key: m
    for m in (
        GpuModel("h100", "NVIDIA H100 80GB HBM3", 81_559, "H100-80GB", gpm=True),
        GpuModel("a100-40gb", "NVIDIA A100-SXM4-40GB", 40_960, "A100-40GB"),
        GpuModel("a100-80gb", "NVIDIA A100-SXM4-80GB", 81_920, "A100-80GB"),
        GpuModel("t4", "Tesla T4", 15_360),
    )
}
_ALIASES = {"h100-80gb": "h100", "a100": "a100-40gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb"}

# NVML profile index (NVML_GPU_INSTANCE_PROFILE_*) and profile id (as `nvidia-smi mig -lgip` lists it), by the
# profile's (compute slices, memory slices). The same ids on A100 and H100.
_PROFILE_IDS: dict[tuple[int, int], tuple[int, int]] = {
    (1, 1): (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19),
    (1, 2): (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15),
    (2, 2): (pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14),
    (3, 4): (pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9),
    (4, 4): (pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5),
    (7, 8): (pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0),
}
_ME_PROFILE = (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20)  # 1g.Xgb+me: one slice with the media engines


@dataclass(frozen=True)
class FakeProfile:
    index: int
    id: int
    name: str
    compute_slices: int
    memory_slices: int
    starts: tuple[int, ...]


def _profiles(model: GpuModel) -> dict[str, FakeProfile]:
    """The GPU-instance profiles of a MIG-capable model, by name (the `+me` variant included)."""
    if model.mig_table is None:
        return {}
    out: dict[str, FakeProfile] = {}
    for p in MIG_TABLES[model.mig_table].profiles:
        index, pid = _PROFILE_IDS[(p.compute_slices, p.memory_slices)]
        out[p.name] = FakeProfile(index, pid, p.name, p.compute_slices, p.memory_slices, p.starts)
        if (p.compute_slices, p.memory_slices) == (1, 1):
            me = f"{p.name}+me"
            out[me] = FakeProfile(*_ME_PROFILE, me, 1, 1, p.starts)
    return out


def _instance_memory_mib(model: GpuModel, memory_slices: int) -> int:
    """About what NVML reports for an instance: its share of the eight slices, less overhead, in 256 MiB units."""
    return int(model.memory_mib * memory_slices / 8 * 0.95) // 256 * 256


@dataclass(frozen=True)
class FakeHandle:
    """A device handle: a physical GPU, or a MIG device when `gi` is set."""

    gpu: int
    gi: int | None = None


@dataclass
class FakeInstance:
    gi: int
    profile: FakeProfile
    start: int
    uuid: str
    memory_mib: int


@dataclass
class FakeGpu:
    model: GpuModel
    index: int
    uuid: str
    mig_current: int = MIG_DISABLE
    mig_pending: int = MIG_DISABLE
    instances: list[FakeInstance] = field(default_factory=list)
    lost: bool = False

    def instance(self, gi: int) -> FakeInstance | None:
        return next((i for i in self.instances if i.gi == gi), None)


def _code(name: str) -> int:
    return int(getattr(pynvml, f"NVML_ERROR_{name}"))


_FAILURES = {"driver": _code("DRIVER_NOT_LOADED"), "library": _code("LIBRARY_NOT_FOUND")}
_GROUP = re.compile(r"^(?P<model>[a-z0-9-]+?)(?:x(?P<count>\d+))?(?:/mig=(?P<mig>[^/]*))?$")


class FakeNvml:
    """An NVML with configurable GPUs whose utilization and memory follow schedules. Thread-safe."""

    def __init__(
        self,
        gpus: list[tuple[str, list[tuple[str, int]] | None]],
        hostname: str = "fake",
        util: Schedule | None = None,
        memory: Schedule | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`gpus`: per GPU, a model key and its MIG layout (None: MIG off; a list of (profile, start): MIG on)."""
        self.hostname = hostname
        if isinstance(util, Trace) and isinstance(memory, Trace):
            memory = replace(memory, pods=tuple(s.pod for s in util.series))
        self.util_schedule: Schedule = util or Constant(0.0)
        self.memory_schedule: Schedule = memory or Constant(0.0)
        self.init_errors: list[int] = []  # error codes the next `init` calls raise, one each
        self.always_fail: int | None = None  # an error code every `init` raises
        self.init_calls = 0
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._refcount = 0
        self._gpm_seen: set[tuple[int, int | None]] = set()
        self.gpus: list[FakeGpu] = []
        for index, (key, layout) in enumerate(gpus):
            model = CATALOG[_ALIASES.get(key.lower(), key.lower())]
            gpu = FakeGpu(model, index, f"GPU-{uuidlib.uuid5(_UUID_NS, f'{hostname}/{index}')}")
            if layout is not None:
                self._carve(gpu, layout)
            self.gpus.append(gpu)

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str, hostname: str = "fake", clock: Callable[[], float] = time.monotonic) -> FakeNvml:
        groups_text, *options = (spec or "h100x8").split(";")
        opts: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep:
                raise ValueError(f"fake NVML option {option!r}: expected KEY=VALUE")
            opts[key.strip()] = value.strip()
        unknown = set(opts) - {"util", "mem", "speed", "offset", "seed", "fail", "lost"}
        if unknown:
            raise ValueError(f"unknown fake NVML options {sorted(unknown)}")
        gpus: list[tuple[str, list[tuple[str, int]] | None]] = []
        for group in groups_text.split(","):
            m = _GROUP.match(group.strip().lower())
            if m is None or _ALIASES.get(m["model"], m["model"]) not in CATALOG:
                expected = f"expected MODEL[xN][/mig=P@S+...] with MODEL in {list(CATALOG)}"
                raise ValueError(f"fake GPU group {group!r}: {expected}")
            layout = None
            if m["mig"] is not None:
                layout = []
                for inst in _split_me(m["mig"]):
                    profile, _, start = inst.partition("@")
                    layout.append((profile, int(start or 0)))
            gpus.extend([(m["model"], layout)] * int(m["count"] or 1))
        speed, offset, seed = float(opts.get("speed", "1")), float(opts.get("offset", "0")), int(opts.get("seed", "0"))

        def schedule(key: str, memory: bool) -> Schedule | None:
            if key not in opts:
                return None
            return parse_schedule(opts[key], memory=memory, speed=speed, seed=seed, offset=offset)

        fake = cls(
            gpus,
            hostname=hostname,
            util=schedule("util", memory=False),
            memory=schedule("mem", memory=True),
            clock=clock,
        )
        if "fail" in opts:
            kind, _, times = opts["fail"].partition("*")
            if kind not in _FAILURES:
                raise ValueError(f"fail={opts['fail']}: expected driver or library, optionally *N")
            if times:
                fake.init_errors = [_FAILURES[kind]] * int(times)
            else:
                fake.always_fail = _FAILURES[kind]
        for lost in filter(None, opts.get("lost", "").split("+")):
            fake.gpus[int(lost)].lost = True
        return fake

    def set_mig_layout(self, index: int, layout: list[tuple[str, int]] | None) -> None:
        """Repartition GPU `index` as the MIG manager would; None turns MIG off."""
        with self._lock:
            gpu = self.gpus[index]
            gpu.instances.clear()
            if layout is None:
                gpu.mig_current = gpu.mig_pending = MIG_DISABLE
            else:
                self._carve(gpu, layout)

    def _carve(self, gpu: FakeGpu, layout: list[tuple[str, int]]) -> None:
        """Create GPU instances as `nvidia-smi mig -cgi ... -C` would, refusing placements NVIDIA does not allow."""
        profiles = _profiles(gpu.model)
        if not profiles:
            raise ValueError(f"{gpu.model.name} does not support MIG")
        gpu.mig_current = gpu.mig_pending = MIG_ENABLE
        occupied = 0
        next_gi = 1
        for name, start in layout:
            p = profiles.get(name)
            if p is None:
                raise ValueError(f"{gpu.model.name}: no MIG profile {name!r} (have {sorted(profiles)})")
            mask = MigProfile(p.name, p.compute_slices, p.memory_slices, p.starts).mask_at(start)
            if start not in p.starts or occupied & mask:
                raise ValueError(f"{gpu.model.name}: {name} cannot be placed at slot {start}")
            occupied |= mask
            gi = 0 if p.memory_slices == 8 else next_gi
            next_gi += gi != 0
            mig_uuid = f"MIG-{uuidlib.uuid5(_UUID_NS, f'{gpu.uuid}/{gi}')}"
            gpu.instances.append(FakeInstance(gi, p, start, mig_uuid, _instance_memory_mib(gpu.model, p.memory_slices)))

    # -- NVML --------------------------------------------------------------------------------------------
    def init(self) -> None:
        with self._lock:
            self.init_calls += 1
            if self.init_errors:
                raise nvml_error(self.init_errors.pop(0))
            if self.always_fail is not None:
                raise nvml_error(self.always_fail)
            self._refcount += 1

    def shutdown(self) -> None:
        with self._lock:
            if self._refcount == 0:
                raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
            self._refcount -= 1
            if self._refcount == 0:
                self._gpm_seen.clear()

    def device_count(self) -> int:
        self._ready()
        return len(self.gpus)

    def device_handle(self, index: int) -> FakeHandle:
        self._ready()
        if not 0 <= index < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._gpu(FakeHandle(index))
        return FakeHandle(index)

    def uuid(self, device: FakeHandle) -> str:
        gpu, inst = self._resolve(device)
        return inst.uuid if inst else gpu.uuid

    def name(self, device: FakeHandle) -> str:
        gpu, inst = self._resolve(device)
        return f"{gpu.model.name} MIG {inst.profile.name}" if inst else gpu.model.name

    def pci_bus_id(self, device: FakeHandle) -> str:
        gpu, _ = self._resolve(device)
        return f"00000000:{0x18 + 0x10 * gpu.index:02X}:00.0"

    def memory(self, device: FakeHandle) -> Memory:
        gpu, inst = self._resolve(device)
        if inst is not None:
            return Memory(inst.memory_mib * MIB, self._used(inst.memory_mib, self._key(gpu, inst)))
        total = gpu.model.memory_mib
        if gpu.mig_current == MIG_ENABLE:
            used = sum(self._used(i.memory_mib, self._key(gpu, i)) for i in gpu.instances)
            return Memory(total * MIB, used)
        return Memory(total * MIB, self._used(total, self._key(gpu, None)))

    def utilization(self, device: FakeHandle) -> Utilization:
        gpu, inst = self._resolve(device)
        if inst is not None or gpu.mig_current == MIG_ENABLE:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        busy = self._busy(self._key(gpu, None))
        return Utilization(gpu=round(busy * 100), memory=round(busy * 40))

    def mig_mode(self, device: FakeHandle) -> tuple[int, int]:
        gpu = self._mig_parent(device)
        return gpu.mig_current, gpu.mig_pending

    def max_mig_device_count(self, device: FakeHandle) -> int:
        self._mig_parent(device)
        return _MAX_MIG_DEVICES

    def mig_device_handle(self, device: FakeHandle, index: int) -> FakeHandle:
        gpu = self._mig_parent(device)
        if not 0 <= index < _MAX_MIG_DEVICES:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        ordered = sorted(gpu.instances, key=lambda i: i.gi) if gpu.mig_current == MIG_ENABLE else []
        if index >= len(ordered):
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return FakeHandle(gpu.index, ordered[index].gi)

    def gpu_instance_id(self, mig_device: FakeHandle) -> int:
        _, inst = self._resolve(mig_device)
        if inst is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return inst.gi

    def gpu_instance_info(self, device: FakeHandle, gpu_instance_id: int) -> GpuInstanceInfo:
        gpu = self._mig_parent(device)
        inst = gpu.instance(gpu_instance_id) if gpu.mig_current == MIG_ENABLE else None
        if inst is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return GpuInstanceInfo(inst.gi, inst.profile.id, inst.start, inst.profile.memory_slices)

    def gpu_instance_profile(self, device: FakeHandle, profile_index: int) -> GpuInstanceProfile:
        gpu = self._mig_parent(device)
        if not 0 <= profile_index < GPU_INSTANCE_PROFILE_COUNT:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for p in _profiles(gpu.model).values():
            if p.index == profile_index:
                memory = _instance_memory_mib(gpu.model, p.memory_slices)
                return GpuInstanceProfile(p.id, p.name, p.compute_slices, memory)
        raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def engine_activity(self, device: FakeHandle, gpu_instance_id: int | None = None) -> float | None:
        gpu, inst = self._resolve(device)
        if inst is not None or not gpu.model.gpm:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if gpu_instance_id is None:
            if gpu.mig_current == MIG_ENABLE:
                raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            key = self._key(gpu, None)
        else:
            found = gpu.instance(gpu_instance_id) if gpu.mig_current == MIG_ENABLE else None
            if found is None:
                raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
            key = self._key(gpu, found)
        with self._lock:
            first = (gpu.index, gpu_instance_id) not in self._gpm_seen
            self._gpm_seen.add((gpu.index, gpu_instance_id))
        return None if first else self._busy(key)

    # -- internals ---------------------------------------------------------------------------------------
    def _ready(self) -> None:
        if self._refcount == 0:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, device: FakeHandle) -> FakeGpu:
        self._ready()
        if not isinstance(device, FakeHandle) or not 0 <= device.gpu < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[device.gpu]
        if gpu.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return gpu

    def _resolve(self, device: FakeHandle) -> tuple[FakeGpu, FakeInstance | None]:
        gpu = self._gpu(device)
        if device.gi is None:
            return gpu, None
        inst = gpu.instance(device.gi) if gpu.mig_current == MIG_ENABLE else None
        if inst is None:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # the MIG device no longer exists
        return gpu, inst

    def _mig_parent(self, device: FakeHandle) -> FakeGpu:
        gpu, inst = self._resolve(device)
        if inst is not None:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpu.model.mig_table is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _key(self, gpu: FakeGpu, inst: FakeInstance | None) -> str:
        return f"{self.hostname}/{gpu.index}" + (f"/{inst.gi}" if inst else "")

    def _t(self) -> float:
        return self._clock() - self._started

    def _busy(self, key: str) -> float:
        return min(max(self.util_schedule.value(self._t(), key), 0.0), 1.0)

    def _used(self, total_mib: int, key: str) -> int:
        value = self.memory_schedule.value(self._t(), key)
        total = total_mib * MIB
        used = min(value, 0.95 * total) if self.memory_schedule.absolute else min(max(value, 0.0), 1.0) * total
        return int(used) // MIB * MIB


def _split_me(text: str) -> list[str]:
    """Split `1g.10gb+me@0+3g.40gb@4` on the `+` that separate instances, not the one of the `+me` suffix."""
    return [part for part in re.split(r"\+(?!me@|me$)", text) if part]
