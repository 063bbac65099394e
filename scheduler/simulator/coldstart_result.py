"""What a cold-start replay counts (a `Tally`, summed over models) and reports (a `Result`, one row per policy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

EPS = 1e-9  # a wait shorter than this is no wait


@dataclass
class Tally:
    """What one replay (or one model of it) counts inside the measured window."""

    requests: int = 0
    waits: list[float] = field(default_factory=list)  # added wait of every counted request
    waited_load: int = 0  # requests that waited on a full load
    waited_wake: int = 0  # ... on a wake from sleep
    waited_busy: int = 0  # ... only on a slot of a busy replica
    full_loads: int = 0
    prewarm_loads: int = 0  # of the full loads, those a forecast started
    wakes: int = 0
    prewarm_wakes: int = 0
    awake_s: float = 0.0
    sleeping_s: float = 0.0  # replica-seconds asleep (times sleep_share for GPU-hours)

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(other, name)
            if isinstance(value, list):
                getattr(self, name).extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class Result:
    policy: str
    requests: int
    waited: int
    waited_load: int
    waited_wake: int
    full_loads: int
    prewarm_loads: int
    wakes: int
    wait_mean_s: float  # over all requests
    wait_p50_s: float  # over the requests that waited
    wait_p99_s: float  # over all requests
    gpu_hours_awake: float
    gpu_hours_sleeping: float  # GPU-hour equivalents held by sleeping replicas

    @property
    def waited_share(self) -> float:
        return self.waited / self.requests if self.requests else 0.0

    @property
    def gpu_hours(self) -> float:
        return self.gpu_hours_awake + self.gpu_hours_sleeping

    def row(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "requests": self.requests,
            "cold_starts": self.waited,
            "cold_start_pct": round(100 * self.waited_share, 2),
            "waited_on_load": self.waited_load,
            "waited_on_wake": self.waited_wake,
            "full_loads": self.full_loads,
            "prewarm_loads": self.prewarm_loads,
            "wakes": self.wakes,
            "wait_mean_s": round(self.wait_mean_s, 3),
            "wait_p50_of_waited_s": round(self.wait_p50_s, 2),
            "wait_p99_s": round(self.wait_p99_s, 2),
            "gpu_hours_awake": round(self.gpu_hours_awake, 1),
            "gpu_hours_sleeping": round(self.gpu_hours_sleeping, 1),
            "gpu_hours": round(self.gpu_hours, 1),
        }


def result(policy: str, tally: Tally, sleep_share: float) -> Result:
    waits = sorted(tally.waits)
    waited = [w for w in waits if w > EPS]
    return Result(
        policy=policy,
        requests=tally.requests,
        waited=len(waited),
        waited_load=tally.waited_load,
        waited_wake=tally.waited_wake,
        full_loads=tally.full_loads,
        prewarm_loads=tally.prewarm_loads,
        wakes=tally.wakes,
        wait_mean_s=sum(waits) / len(waits) if waits else 0.0,
        wait_p50_s=_quantile(waited, 0.5),
        wait_p99_s=_quantile(waits, 0.99),
        gpu_hours_awake=tally.awake_s / 3600.0,
        gpu_hours_sleeping=tally.sleeping_s * sleep_share / 3600.0,
    )


def _quantile(ascending: Sequence[float], q: float) -> float:
    if not ascending:
        return 0.0
    return ascending[min(len(ascending) - 1, max(0, math.ceil(q * len(ascending)) - 1))]


def clipped(start: float, end: float, lo: float, hi: float) -> float:
    """Seconds of [start, end) inside the measured window [lo, hi)."""
    return max(0.0, min(end, hi) - max(start, lo))
