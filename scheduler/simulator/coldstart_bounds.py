"""The bounds a pre-warming policy is measured against.

The clairvoyant knows every arrival. The hindsight bound is for the policies that act on the time since a model
went idle (fixed keep-alive, the histogram policy, the cost-aware one): each model gets the one warm window (ready
at h, warm until T after it goes idle) that is cheapest on the very days being measured, fitted in hindsight on their
idle times. No such policy can do better with a single window per model; what it leaves to the clairvoyant needs a
forecast of *when* the next request comes, not of how long gaps usually are.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from policies.forecast import ModelHistory, WarmPlan
from policies.forecast.costaware import best_window
from scheduler.simulator.coldstart import ReplayOptions, Request
from scheduler.simulator.coldstart_result import Result, Tally, clipped, result


def clairvoyant(
    requests: Mapping[str, Sequence[Request]], options: ReplayOptions, load_s: float, name: str = "clairvoyant"
) -> Result:
    """The bound: every arrival known. Requests go to the lowest free replica slot; each replica is loaded
    `load_s` before its first request, and through a gap it stays warm only when the gap is shorter than the load
    that would follow a release (the break-even); otherwise it is let go and loaded again `load_s` before its next
    request. No request waits."""
    tally = Tally()
    lo, hi = options.measure_from, options.measure_to
    for model in sorted(requests):
        busy: list[list[tuple[float, float]]] = []  # per replica: the intervals it serves
        running: list[list[float]] = []  # per replica: end times of its requests, a heap
        for r in requests[model]:
            end = r.arrival + r.service_s
            _place(busy, running, r.arrival, end, options.concurrency)
            if lo <= r.arrival < hi:
                tally.requests += 1
                tally.waits.append(0.0)
        for intervals in busy:
            for start, end in _warm_spans(_merge(intervals), load_s):
                tally.awake_s += clipped(start, end, lo, hi)
                if lo <= start + load_s < hi:
                    tally.full_loads += 1
                    tally.prewarm_loads += 1
    return result(name, tally, options.sleep_share)


def _place(
    replicas: list[list[tuple[float, float]]], running: list[list[float]], start: float, end: float, limit: int
) -> None:
    """First replica with a free slot at `start` (fewer than `limit` of its requests still running; 0: no limit)."""
    for intervals, ends in zip(replicas, running, strict=True):
        while ends and ends[0] <= start:
            heapq.heappop(ends)
        if not limit or len(ends) < limit:
            intervals.append((start, end))
            heapq.heappush(ends, end)
            return
    replicas.append([(start, end)])
    running.append([end])


def _merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _warm_spans(busy: list[tuple[float, float]], load_s: float) -> list[tuple[float, float]]:
    """Awake spans (load included) of one replica serving the merged `busy` intervals at the break-even."""
    spans: list[tuple[float, float]] = []
    for s, e in busy:
        if spans and s - spans[-1][1] <= load_s:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s - load_s, e))
    return spans


@dataclass(frozen=True)
class FixedWindow:
    """One model's window; before `start` (the history days) it keeps the 10-minute keep-alive."""

    head_s: float
    tail_s: float
    start: float
    before_keep_s: float = 600.0

    @property
    def name(self) -> str:
        return "hindsight window"

    def plan(self, history: ModelHistory, idle_since: float, now: float, start_s: float) -> WarmPlan:
        if idle_since < self.start:
            return WarmPlan(keep_until=idle_since + self.before_keep_s)
        if now > idle_since:
            return WarmPlan(keep_until=now)
        if self.head_s <= 0:
            return WarmPlan(keep_until=idle_since + self.tail_s)
        return WarmPlan(
            keep_until=idle_since, prewarm_at=idle_since + self.head_s, prewarm_until=idle_since + self.tail_s
        )


def idle_gaps(requests: Sequence[Request], start: float) -> np.ndarray:
    """Ascending idle times (from all running requests ended to the next arrival) of gaps ending at or after
    `start`, with every request served at once."""
    merged: list[list[float]] = []
    for r in sorted(requests, key=lambda r: r.arrival):
        end = r.arrival + r.service_s
        if merged and r.arrival <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([r.arrival, end])
    gaps = [b[0] - a[1] for a, b in pairwise(merged) if b[0] >= start]
    return np.sort(np.asarray(gaps, dtype=float))


def hindsight_windows(
    requests: Mapping[str, Sequence[Request]], start: float, load_s: float, cold_cost_s: float
) -> dict[str, FixedWindow]:
    """Per model, the window `best_window` prices cheapest on its own idle times from `start` on."""
    out = {}
    for model, rs in requests.items():
        gaps = idle_gaps(rs, start)
        head, tail = best_window(gaps, load_s, cold_cost_s) if len(gaps) else (0.0, 0.0)
        out[model] = FixedWindow(head, tail, start)
    return out
