"""The hybrid histogram policy of "Serverless in the Wild" (Shahrad et al., USENIX ATC'20), per model.

Each model keeps the distribution of its idle times (model idle to next arrival) in one-minute bins up to a range
(4 hours). When the histogram is representative, an idle replica is let go at once and a replica is ready again at
the head (a low percentile) of the distribution, kept until its tail (a high percentile), both with a margin; when
the head is shorter than a start, keeping the replica warm until the tail is cheaper than letting it go. When the
histogram is not representative (too few idle times, or too many beyond the range), a fixed keep-alive stands in.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from policies.forecast.base import ModelHistory, WarmPlan


def percentile_sorted(values: list[float], q: float) -> float:
    """The `q`-th percentile (0..100) of ascending `values` by the nearest rank below: no interpolation, no copy."""
    if not values:
        raise ValueError("no values")
    index = min(len(values) - 1, max(0, math.ceil(q / 100.0 * len(values)) - 1))
    return values[index]


@dataclass(frozen=True)
class HistogramPolicy:
    """`head_pct` / `tail_pct`: the percentiles that bound the warm window; `margin`: the window widens by this
    share on each side; `bin_s` and `range_s`: the histogram's bins and reach; `min_samples` and `max_oob`: below
    that many idle times, or above that share of them beyond the range, the histogram is not trusted and
    `fallback_keep_s` (a fixed keep-alive) applies."""

    head_pct: float = 5.0
    tail_pct: float = 99.0
    margin: float = 0.1
    bin_s: float = 60.0
    range_s: float = 4 * 3600.0
    min_samples: int = 10
    max_oob: float = 0.5
    fallback_keep_s: float = 600.0

    @property
    def name(self) -> str:
        return f"histogram p{self.head_pct:g}-p{self.tail_pct:g}"

    def representative(self, history: ModelHistory) -> bool:
        idle = history.idle_sorted
        if len(idle) < self.min_samples:
            return False
        beyond = len(idle) - _count_at_most(idle, self.range_s)
        return beyond / len(idle) <= self.max_oob

    def window(self, history: ModelHistory) -> tuple[float, float]:
        """(head, tail) in seconds after the model went idle, on bin edges, with the margin applied; idle times
        beyond the range count at the range (they fall in the histogram's last bin)."""
        head = min(percentile_sorted(history.idle_sorted, self.head_pct), self.range_s)
        tail = min(percentile_sorted(history.idle_sorted, self.tail_pct), self.range_s)
        head = math.floor(head / self.bin_s) * self.bin_s * (1.0 - self.margin)
        tail = math.ceil(tail / self.bin_s + 1e-9) * self.bin_s * (1.0 + self.margin)
        return head, tail

    def plan(self, history: ModelHistory, idle_since: float, now: float, start_s: float) -> WarmPlan:
        if not self.representative(history):
            return WarmPlan(keep_until=idle_since + self.fallback_keep_s)
        head, tail = self.window(history)
        if now > idle_since:  # the window planned at idle time lapsed unused: the next arrival is out of the histogram
            return WarmPlan(keep_until=now)
        if head <= start_s:  # letting go and starting again before the head would cost more than staying warm
            return WarmPlan(keep_until=idle_since + tail)
        return WarmPlan(keep_until=idle_since, prewarm_at=idle_since + head, prewarm_until=idle_since + tail)


def _count_at_most(ascending: list[float], limit: float) -> int:
    return bisect.bisect_right(ascending, limit)
