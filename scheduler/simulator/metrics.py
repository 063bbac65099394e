"""From per-arrival records to the published metrics.

As the FGD paper's analysis does: the arrived GPU request (% of capacity) of each event is rounded to an integer
bin and a bin's value is the mean allocation ratio of its events (a bin without events takes the events within
one point of it). Fragmentation at 90 % is the cluster's fragmented GPU capacity over its GPU capacity.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.simulator.replay import RunResult

MAX_BIN = 130

SUMMARY_COLUMNS = (
    "workload",
    "policy",
    "n_seeds",
    "alloc_pct_at_arrival100",
    "alloc_pct_at_arrival130",
    "unalloc_gpus_at_130_of_6212",
    "frag_pct_at_arrival90",
    "first_arrival_pct_alloc_lags_gt1pt",
)


def arrival_pct(result: RunResult) -> np.ndarray:
    return 100.0 * result.arrived_milli / result.capacity_milli


def allocation_pct(result: RunResult) -> np.ndarray:
    return 100.0 * result.allocated_milli / result.capacity_milli


def binned(values: np.ndarray, arrived_pct: np.ndarray, max_bin: int = MAX_BIN) -> np.ndarray:
    """float [max_bin + 1]: per integer arrival bin, the mean of `values` over its events (NaN where none)."""
    bins = np.round(arrived_pct).astype(np.int64)
    out = np.full(max_bin + 1, np.nan)
    ok = ~np.isnan(values)
    sums = np.bincount(bins[ok], weights=values[ok], minlength=max_bin + 2)[: max_bin + 1]
    counts = np.bincount(bins[ok], minlength=max_bin + 2)[: max_bin + 1]
    has = counts > 0
    out[has] = sums[has] / counts[has]
    for b in np.flatnonzero(~has):
        near = ok & (bins >= b - 1) & (bins <= b + 1)
        if near.any():
            out[b] = values[near].mean()
    return out


def allocation_curve(result: RunResult) -> np.ndarray:
    return binned(np.round(allocation_pct(result), 2), arrival_pct(result))


def fragmentation_curve(result: RunResult) -> np.ndarray:
    return binned(100.0 * result.frag_milli / result.capacity_milli, arrival_pct(result))


@dataclass(frozen=True)
class SeedMetrics:
    alloc100: float
    alloc130: float
    frag90: float
    lag: float


def seed_metrics(result: RunResult) -> SeedMetrics:
    curve = allocation_curve(result)
    frag = fragmentation_curve(result)
    lag = math.nan
    for b in range(len(curve)):
        if not np.isnan(curve[b]) and b - curve[b] > 1.0:
            lag = float(b)
            break
    return SeedMetrics(float(curve[100]), float(curve[MAX_BIN]), float(frag[90]), lag)


def _mean(values: Iterable[float]) -> float:
    data = [v for v in values if not math.isnan(v)]
    return float(np.mean(data)) if data else math.nan


def summarize(workload: str, policy: str, results: list[RunResult]) -> dict[str, object]:
    """One row of `summary.csv` from the seeds of one workload and policy."""
    per_seed = [seed_metrics(r) for r in results]
    alloc130 = _mean(m.alloc130 for m in per_seed)
    gpus = results[0].gpus if results else 0
    return {
        "workload": workload,
        "policy": policy,
        "n_seeds": len(results),
        "alloc_pct_at_arrival100": round(_mean(m.alloc100 for m in per_seed), 2),
        "alloc_pct_at_arrival130": round(alloc130, 2),
        "unalloc_gpus_at_130_of_6212": round((100.0 - alloc130) / 100.0 * gpus) if not math.isnan(alloc130) else "",
        "frag_pct_at_arrival90": round(_mean(m.frag90 for m in per_seed), 2),
        "first_arrival_pct_alloc_lags_gt1pt": round(_mean(m.lag for m in per_seed), 1),
    }


def write_csv(path: Path, rows: list[dict[str, object]], columns: Iterable[str] | None = None) -> None:
    """Rows as a CSV with a header (the first row's keys unless `columns` is given); nothing for no rows."""
    if not rows and columns is None:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns if columns is not None else rows[0]))
        writer.writeheader()
        writer.writerows(rows)
