"""What every forecaster sees and answers: one model's arrival history, and when to keep a replica warm.

A forecaster is asked when a model goes idle (its last running request ended) and again when a pre-warm window it
planned lapses unused. Its answer is a `WarmPlan`: how long to keep the idle replica warm, and, once it is let go,
when to have one ready again and for how long. Times are seconds on the caller's clock; forecasters read no clock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class WarmPlan:
    """`keep_until`: the idle replica stays warm until then (at or before `now`: let it go now). `prewarm_at` /
    `prewarm_until`: after it is let go, a replica should be ready again at `prewarm_at` and stay warm until
    `prewarm_until` unless a request comes first; None when nothing is expected soon enough to pay for."""

    keep_until: float
    prewarm_at: float | None = None
    prewarm_until: float | None = None

    def __post_init__(self) -> None:
        if (self.prewarm_at is None) != (self.prewarm_until is None):
            raise ValueError("prewarm_at and prewarm_until go together")
        if self.prewarm_at is not None and self.prewarm_until is not None and self.prewarm_until < self.prewarm_at:
            raise ValueError("prewarm_until must not precede prewarm_at")


@dataclass
class ModelHistory:
    """One model's past: arrival times (ascending) and idle times (from the model going idle to its next arrival,
    the quantity Serverless in the Wild keeps a histogram of). The caller appends; forecasters only read."""

    arrivals: list[float] = field(default_factory=list)
    idle_times: list[float] = field(default_factory=list)
    idle_sorted: list[float] = field(default_factory=list)  # the same idle times, ascending: percentiles in O(1)

    def arrive(self, at: float, idle_since: float | None) -> None:
        """Record an arrival; `idle_since` is when the model went idle before it (None while requests ran)."""
        if self.arrivals and at < self.arrivals[-1]:
            raise ValueError("arrivals must come in time order")
        self.arrivals.append(at)
        if idle_since is not None:
            idle = max(0.0, at - idle_since)
            self.idle_times.append(idle)
            bisect.insort(self.idle_sorted, idle)

    def count_between(self, start: float, end: float) -> int:
        """Arrivals in [start, end)."""
        return bisect.bisect_left(self.arrivals, end) - bisect.bisect_left(self.arrivals, start)


class Forecaster(Protocol):
    """One pre-warming policy; a pure function of a model's history and the time (state lives in the history)."""

    @property
    def name(self) -> str: ...

    def plan(self, history: ModelHistory, idle_since: float, now: float, start_s: float) -> WarmPlan:
        """The plan for a model idle since `idle_since`, asked at `now` (>= idle_since). `start_s` is how long a
        replica takes to become ready (a load, or a wake from sleep): keeping one warm through a gap shorter than
        that costs less than letting it go and starting it again."""
        ...
