"""A cost-aware variant of the histogram policy: per model, the warm window that minimises GPU time plus a price
per cold start over the model's own idle-time distribution.

"Serverless in the Wild" bounds the window by fixed percentiles (head p5, tail p99), which keeps a model with a
long tail warm for hours. Here each candidate window is priced on the model's past idle times: a replica kept
warm from the moment the model goes idle until T, or let go at once, loaded to be ready at h and kept until T.
Every idle time the window misses costs a load (GPU time) plus `cold_cost_s` (the price of a request that waits,
in GPU-seconds); every second warm costs a second. `cold_cost_s` is the one knob: it moves the policy along its
cold-start / GPU-hours frontier, and is tuned on past days against the fixed keep-alive's GPU-hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.forecast.base import ModelHistory, WarmPlan

QUANTILES = np.linspace(0.0, 1.0, 41)
MIN_CAUGHT = 0.1  # a pre-warm window must take this share of past idle times: no window fitted to one sample
MARGIN = 0.1  # candidate bounds also sit this share before and after each quantile, to take a period with slack


@dataclass(frozen=True)
class CostAwarePolicy:
    cold_cost_s: float = 600.0
    min_samples: int = 10
    fallback_keep_s: float = 600.0
    _cache: dict[tuple[int, int, float], tuple[float, float]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @property
    def name(self) -> str:
        return f"cost-aware {self.cold_cost_s / 60:g} min/cold"

    def window(self, history: ModelHistory, start_s: float) -> tuple[float, float]:
        """(h, T): ready at h, warm until T, in seconds after the model goes idle (h = 0: never let go)."""
        key = (id(history), len(history.idle_sorted), start_s)
        found = self._cache.get(key)
        if found is None:
            found = best_window(np.asarray(history.idle_sorted), start_s, self.cold_cost_s)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key] = found
        return found

    def plan(self, history: ModelHistory, idle_since: float, now: float, start_s: float) -> WarmPlan:
        if len(history.idle_sorted) < self.min_samples:
            return WarmPlan(keep_until=idle_since + self.fallback_keep_s)
        if now > idle_since:  # the window lapsed unused: this idle time is beyond what the history prices
            return WarmPlan(keep_until=now)
        head, tail = self.window(history, start_s)
        if head <= 0:
            return WarmPlan(keep_until=idle_since + tail)
        return WarmPlan(keep_until=idle_since, prewarm_at=idle_since + head, prewarm_until=idle_since + tail)


def best_window(idle: np.ndarray, start_s: float, cold_cost_s: float) -> tuple[float, float]:
    """The cheapest (h, T) over candidate bounds at the quantiles of `idle` (ascending), priced as the module says.
    A gap ending before h or after T is a cold start (a load plus `cold_cost_s`); a pre-warm costs its load. Like
    the paper's, a pre-warm is ready a margin before a quantile, and a window ends at one or a margin after it."""
    n = len(idle)
    prefix = np.concatenate(([0.0], np.cumsum(idle)))
    quantiles = np.unique(np.quantile(idle, QUANTILES))
    ends = np.unique(np.concatenate(([0.0], quantiles, quantiles * (1 + MARGIN))))
    heads = np.unique(quantiles * (1 - MARGIN))
    miss = start_s + cold_cost_s
    # keep warm from idle until T: sum(min(g, T)) + misses beyond T
    upto = np.searchsorted(idle, ends, side="right")  # gaps <= T
    beyond = n - upto
    keep = prefix[upto] + ends * beyond + miss * beyond
    best_cost, best = float(keep.min()), (0.0, float(ends[int(keep.argmin())]))
    # let go, ready at h, warm until T (h > start_s so the load fits; T > h)
    below = np.searchsorted(idle, heads, side="left")  # gaps < h
    h = heads[:, None]
    t = ends[None, :]
    early = below[:, None]
    inside = upto[None, :] - below[:, None]
    late = n - upto[None, :]
    warm = (prefix[upto][None, :] - prefix[below][:, None]) - h * inside + start_s * inside
    cost = warm + miss * early + late * ((t - h) + start_s + miss)
    valid = (h > start_s) & (t > h) & (inside >= max(2.0, MIN_CAUGHT * n))
    if valid.any():
        cost = np.where(valid, cost, np.inf)
        i, j = np.unravel_index(int(cost.argmin()), cost.shape)
        if cost[i, j] < best_cost:
            best = (float(heads[i]), float(ends[j]))
    return best
