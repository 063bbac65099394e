"""A daily-seasonal forecaster: a model used at this time of day on most of the previous days will likely be used
now, so keep its replica warm through such hours and have one ready before they start.

The day is cut into bins (30 minutes). A bin is *hot* when, on at least `threshold` of the previous `days` days
(counting only days since the model's first arrival), at least one request arrived in the same bin. An idle
replica stays warm to the end of the run of hot bins it is in (at least the fallback keep-alive); once let go, one
is ready again at the start of the next hot run within a day. Models with under `min_days` of history get the
fallback keep-alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.forecast.base import ModelHistory, WarmPlan

DAY_S = 86_400.0


@dataclass(frozen=True)
class SeasonalPolicy:
    bin_s: float = 1800.0
    days: int = 7
    threshold: float = 0.5
    min_days: int = 2
    fallback_keep_s: float = 600.0

    def __post_init__(self) -> None:
        if self.bin_s <= 0 or DAY_S % self.bin_s:
            raise ValueError("bin_s must divide a day")
        if not 0 < self.threshold <= 1:
            raise ValueError("threshold must be within (0, 1]")

    @property
    def name(self) -> str:
        return f"seasonal {self.bin_s / 60:g}min≥{self.threshold:g}"

    def occupancy(self, history: ModelHistory, bin_start: float, now: float) -> float:
        """The share of the previous days (up to `days`, since the model's first arrival, seen before `now`) with
        an arrival in this bin's time of day."""
        if not history.arrivals:
            return 0.0
        days = min(self.days, math.floor((now - history.arrivals[0]) / DAY_S))
        if days <= 0:
            return 0.0
        hits = 0
        for back in range(1, days + 1):
            start = bin_start - back * DAY_S
            if history.count_between(start, min(start + self.bin_s, now)) > 0:
                hits += 1
        return hits / days

    def hot(self, history: ModelHistory, bin_start: float, now: float) -> bool:
        return self.occupancy(history, bin_start, now) >= self.threshold

    def plan(self, history: ModelHistory, idle_since: float, now: float, start_s: float) -> WarmPlan:
        if not history.arrivals or now - history.arrivals[0] < self.min_days * DAY_S:
            return WarmPlan(keep_until=idle_since + self.fallback_keep_s)
        bin_start = math.floor(now / self.bin_s) * self.bin_s
        horizon = now + DAY_S  # a bin a day ahead has its previous day's bin started before now
        keep_until = max(now, idle_since + self.fallback_keep_s)
        t = bin_start
        while t < horizon and self.hot(history, t, now):  # the hot run we are in
            t += self.bin_s
        keep_until = max(keep_until, t) if t > bin_start else keep_until
        # the next hot run after the replica is let go
        t = max(t, math.floor(keep_until / self.bin_s) * self.bin_s)
        while t < horizon and not self.hot(history, t, now):
            t += self.bin_s
        if t >= horizon:
            return WarmPlan(keep_until=keep_until)
        start = max(t, keep_until)
        end = t
        while end < horizon and self.hot(history, end, now):
            end += self.bin_s
        if end <= start:
            return WarmPlan(keep_until=keep_until)
        return WarmPlan(keep_until=keep_until, prewarm_at=start, prewarm_until=end)
