"""What drives the fake GPUs' load: a constant, a step schedule, or a recorded production trace.

The recorded traces are the genai-serving per-pod GPU duty cycle and GPU memory files (`container_ip`,
`timestamp_anon`, `value`; one sample per pod every 57 s). Each fake device replays one pod of the trace, chosen
by a stable hash of its key, so many agents on one machine show different but reproducible load.
"""

from __future__ import annotations

import bisect
import csv
import zlib
from array import array
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Protocol

from scheduler.datasets import shared_data

__all__ = [
    "DUTY_CYCLE_CSV",
    "MEMORY_USED_CSV",
    "Constant",
    "Schedule",
    "Steps",
    "Trace",
    "load_trace",
    "parse_schedule",
    "shared_data",
]

DUTY_CYCLE_CSV = "genai-serving/pod_gpu_duty_cycle_anon.csv"
MEMORY_USED_CSV = "genai-serving/pod_gpu_memory_used_bytes_anon.csv"


class Schedule(Protocol):
    """A value over time for one device. `absolute` values are bytes; the others are fractions of capacity."""

    @property
    def absolute(self) -> bool: ...

    def value(self, t: float, key: str) -> float:
        """The value `t` seconds after the fake started, for the device called `key`."""
        ...


@dataclass(frozen=True)
class Constant:
    fraction: float
    absolute: bool = False

    def value(self, t: float, key: str) -> float:
        return self.fraction


@dataclass(frozen=True)
class Steps:
    """Piecewise constant: each (seconds, fraction) holds until the next; before the first, the first holds."""

    points: tuple[tuple[float, float], ...]
    absolute: bool = False

    def value(self, t: float, key: str) -> float:
        times = [p[0] for p in self.points]
        i = bisect.bisect_right(times, t) - 1
        return self.points[max(i, 0)][1]


@dataclass(frozen=True, eq=False)
class Series:
    """One recorded pod: sample times (unix seconds, ascending) and values, as compact float arrays."""

    pod: str
    times: array[float]
    values: array[float]


@dataclass(frozen=True)
class Trace:
    """Replays one recorded pod per device, `speed` trace seconds per second from `offset` trace seconds into
    each pod's record, wrapping around at its end. `pods` (another trace's pod order) makes a device replay
    the same pod in both traces, so its memory and its duty cycle stay those of one real pod."""

    series: tuple[Series, ...]
    scale: float = 1.0
    speed: float = 1.0
    seed: int = 0
    offset: float = 0.0
    absolute: bool = False
    pods: tuple[str, ...] = ()

    @cached_property
    def _by_pod(self) -> dict[str, Series]:
        return {s.pod: s for s in self.series}

    def pick(self, key: str) -> Series:
        h = zlib.crc32(key.encode()) + self.seed
        if self.pods:
            found = self._by_pod.get(self.pods[h % len(self.pods)])
            if found is not None:
                return found
        return self.series[h % len(self.series)]

    def value(self, t: float, key: str) -> float:
        s = self.pick(key)
        start, end = s.times[0], s.times[-1]
        span = max(end - start, 1.0)
        at = start + (self.offset + t * self.speed) % (span + 1.0)
        i = bisect.bisect_right(s.times, at) - 1
        return s.values[max(i, 0)] * self.scale


@cache
def load_trace(path: Path) -> tuple[Series, ...]:
    """Per-pod series of one genai-serving CSV, in a stable order (pods sorted by their anonymised id)."""
    rows: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        try:
            at, val, pod = header.index("timestamp_anon"), header.index("value"), header.index("container_ip")
        except ValueError:
            raise ValueError(f"{path}: expected the columns timestamp_anon, value, container_ip") from None
        for row in reader:
            try:
                ts, value = float(row[at]), float(row[val])
            except (IndexError, ValueError):
                continue  # "NULL" and empty values
            rows.setdefault(row[pod], []).append((ts, value))
    series = []
    for name in sorted(rows):
        points = sorted(rows[name])
        series.append(Series(name, array("d", (p[0] for p in points)), array("d", (p[1] for p in points))))
    if not series:
        raise ValueError(f"{path}: no samples")
    return tuple(series)


def _percent(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{text}: a percentage must be within 0..100")
    return value / 100.0


def parse_schedule(text: str, memory: bool = False, speed: float = 1.0, seed: int = 0, offset: float = 0.0) -> Schedule:
    """`const:PCT`, `step:PCT@SEC,PCT@SEC,...` or `trace[:PATH]` (utilization, or memory when `memory`)."""
    kind, _, arg = text.partition(":")
    if kind == "const":
        return Constant(_percent(arg or "0"))
    if kind == "step":
        points = []
        for part in arg.split(","):
            pct, _, at = part.partition("@")
            points.append((float(at or 0), _percent(pct)))
        if not points:
            raise ValueError(f"{text}: a step schedule needs PCT@SEC points")
        return Steps(tuple(sorted(points)))
    if kind == "trace":
        path = Path(arg) if arg else shared_data() / (MEMORY_USED_CSV if memory else DUTY_CYCLE_CSV)
        if not path.is_file():
            raise ValueError(f"trace {path} not found (set GPU_EXTENDER_DATA to the shared data folder)")
        scale = 1.0 if memory else 0.01
        return Trace(load_trace(path), scale=scale, speed=speed, seed=seed, offset=offset, absolute=memory)
    raise ValueError(f"unknown schedule {text!r}: use const:PCT, step:PCT@SEC,... or trace[:PATH]")
