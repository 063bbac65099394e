"""GPU-seconds by state and what they cost: the fleet gauges integrated over time.

The gauges of `extender.metrics` say how the fleet stands at one scrape; a platform team paying for GPUs asks how
the fleet spent its hours. `WasteAccountant.tick` samples the cluster model's current snapshot (immutable, read
without a lock) from the housekeeping thread every few seconds, never in a request; until the next tick each
state's counter grows by its GPUs every second. Counters only grow; a restart starts them from zero, which
Prometheus' `rate` and `increase` handle.

Every GPU of the fleet (not in MIG mode) is in exactly one state at each instant, so the states' GPU-seconds add up
to the fleet's GPU-seconds (capacity × time):

- `allocated_busy`: allocated capacity the GPU's fresh utilization sample shows busy;
- `allocated_idle`: allocated capacity the sample shows idle (what allocation-only scheduling cannot see);
- `allocated_unmeasured`: allocated capacity of GPUs without a fresh sample;
- `fragmented`: free capacity the typical pod shapes could not use (FGD, as `gpu_extender_fragmented_gpus`);
- `cpu_stranded`: the rest of the free capacity that the node's free CPU cannot feed at the typical pods' CPU
  per GPU (the part of `gpu_extender_cpu_stranded_gpus` not already fragmented);
- `free`: free capacity that the next typical pod could use.

Borrowed shares (overcommit) run on capacity already counted as allocated, so they have a counter of their own
beside the partition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from policies.fragmentation import TypicalShapes, cpu_stranding, node_fragmentation
from policies.inventory import MILLI_PER_GPU, Assignment
from policies.state import ClusterSnapshot
from scheduler.model import ClusterModel

STATES = ("allocated_busy", "allocated_idle", "allocated_unmeasured", "fragmented", "cpu_stranded", "free")
SECONDS_PER_HOUR = 3600.0

log = logging.getLogger("gpu_extender.waste")


@dataclass(frozen=True)
class FleetSample:
    """The fleet's GPUs by (GPU type, pool) and state at one instant, in GPUs."""

    groups: tuple[tuple[str, str], ...]  # (gpu_type, pool) of each row
    states: np.ndarray  # float [K, len(STATES)]
    capacity: np.ndarray  # float [K]: schedulable GPUs (not in MIG mode)
    borrowed: np.ndarray  # float [K]: shares running on borrowed idle capacity


@dataclass(frozen=True)
class _Grouping:
    """Fixed until the node set or the pool label changes, so worked out once for many ticks."""

    rows: np.ndarray  # int [R]: nodes with at least one schedulable GPU
    group: np.ndarray  # int [R]: each such node's group
    groups: tuple[tuple[str, str], ...]
    gpu_type: Mapping[str, str]  # node name -> GPU type, for every node with GPUs


def _grouping(snapshot: ClusterSnapshot, pool_label: str) -> _Grouping:
    rows = np.flatnonzero(snapshot.gpu_present.any(axis=1))
    index: dict[tuple[str, str], int] = {}
    group = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        labels = snapshot.inventories[row].labels
        key = (snapshot.models[snapshot.model_id[row]], labels.get(pool_label, "") if pool_label else "")
        group[r] = index.setdefault(key, len(index))
    gpu_type = {
        name: snapshot.models[m] for name, m in zip(snapshot.names, snapshot.model_id.tolist(), strict=True) if m >= 0
    }
    return _Grouping(rows, group, tuple(index), gpu_type)


def sample_fleet(
    snapshot: ClusterSnapshot, shapes: TypicalShapes, pool_label: str, grouping: _Grouping | None = None
) -> FleetSample:
    """Split every schedulable GPU's capacity into the `STATES`, summed per (GPU type, pool)."""
    grouping = grouping or _grouping(snapshot, pool_label)
    rows = grouping.rows
    present = snapshot.gpu_present[rows]
    free_gpu = np.where(present, snapshot.gpu_free[rows], 0).astype(np.float64)
    allocated = np.where(present, MILLI_PER_GPU - free_gpu, 0.0)
    util = snapshot.gpu_util[rows]
    known = present & ~np.isnan(util)
    busy = np.clip(np.nan_to_num(util, nan=0.0), 0.0, 1.0) * MILLI_PER_GPU
    allocated_busy = np.where(known, np.minimum(allocated, busy), 0.0).sum(axis=1)
    allocated_idle = np.where(known, allocated, 0.0).sum(axis=1) - allocated_busy
    allocated_unmeasured = np.where(known, 0.0, allocated).sum(axis=1)
    free = free_gpu.sum(axis=1)
    fragmented = np.clip(node_fragmentation(snapshot, rows, shapes), 0.0, free)
    stranded = np.clip(cpu_stranding(snapshot, rows, shapes), 0.0, free - fragmented)
    columns = (allocated_busy, allocated_idle, allocated_unmeasured, fragmented, stranded, free - fragmented - stranded)
    k = len(grouping.groups)

    def by_group(values: np.ndarray) -> np.ndarray:
        return np.bincount(grouping.group, weights=values, minlength=k) / MILLI_PER_GPU

    return FleetSample(
        groups=grouping.groups,
        states=np.stack([by_group(c) for c in columns], axis=1) if k else np.zeros((0, len(STATES))),
        capacity=by_group(present.sum(axis=1) * float(MILLI_PER_GPU)),
        borrowed=by_group(snapshot.gpu_borrowed[rows].sum(axis=1).astype(np.float64)),
    )


def allocation_by_owner(
    assignments: Mapping[str, Assignment],
    gpu_type_of: Mapping[str, str],
    namespace_of: Callable[[str], str | None],
) -> dict[tuple[str, str, str], float]:
    """Allocated GPUs by (namespace, served model, GPU type), "" where unknown. Only what the fleet states count
    as allocated: shares and whole GPUs, not MIG slices (outside the schedulable capacity) nor borrowed shares."""
    milli: dict[tuple[str, str, str], int] = {}
    for key, a in assignments.items():
        gpu_type = gpu_type_of.get(a.node)
        if not a.gpus or a.mig is not None or a.borrowed or gpu_type is None:
            continue
        owner = (namespace_of(key) or "", a.model or "", gpu_type)
        milli[owner] = milli.get(owner, 0) + a.milli * len(a.gpus)
    return {owner: total / MILLI_PER_GPU for owner, total in milli.items()}


def namespace_from_key(lookup: Callable[[str], str | None] | None) -> Callable[[str], str | None]:
    """A pod key's namespace: the prefix of a `namespace/name` key, else what `lookup` knows of the UID."""

    def namespace_of(key: str) -> str | None:
        if "/" in key:
            return key.split("/", 1)[0]
        return lookup(key) if lookup is not None else None

    return namespace_of


class PriceCollector(Collector):
    """The policy's price for each GPU type of the fleet, read at scrape time: the rules join per-model GPU-seconds
    to it for the cost per model and per million tokens."""

    def __init__(self, model: ClusterModel) -> None:
        self._model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self._model.view()
        family = GaugeMetricFamily(
            "gpu_extender_gpu_price_dollars_per_hour",
            "Dollars per GPU-hour of each GPU type in the fleet, from the policy's prices.gpuHourly",
            labels=["gpu_type"],
        )
        for gpu_type in view.snapshot.models:
            price = view.policy.prices.hourly(gpu_type)
            if price is not None:
                family.add_metric([gpu_type], price)
        yield family


# name -> (help, label names) of the counters the accountant exposes (without `_total`).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpu_extender_gpu_seconds": (
        "GPU-seconds of the fleet's schedulable GPUs by state (allocated_busy, allocated_idle, allocated_unmeasured, "
        "fragmented, cpu_stranded, free); the states add up to capacity x time",
        ("gpu_type", "pool", "state"),
    ),
    "gpu_extender_borrowed_gpu_seconds": (
        "GPU-seconds of shares running on borrowed idle capacity (overcommit), beside the states",
        ("gpu_type", "pool"),
    ),
    "gpu_extender_gpu_cost_dollars": (
        "What the fleet's GPU-seconds cost at the policy's prices, by state (GPU types with a price only)",
        ("gpu_type", "pool", "state"),
    ),
    "gpu_extender_allocated_gpu_seconds": (
        "Allocated GPU-seconds by namespace and served model (gpu-extender.io/model; empty where none)",
        ("namespace", "model", "gpu_type"),
    ),
}
Rates = dict[str, dict[tuple[str, ...], float]]  # counter -> labels -> its growth per second


class WasteAccountant(Collector):
    """Integrates the fleet's states over time into counters; `tick` is called by one background thread.

    Each tick samples the fleet and keeps each series' growth per second until the next tick; a scrape sees the
    totals of the past ticks plus that growth times the seconds since the last one. The counters then advance
    smoothly instead of in steps of one tick, so an `increase` over a few minutes is right to well within 1 % whatever
    the phase between ticks and scrapes; and they never go down, since a tick adds what a scrape already saw and more.
    """

    def __init__(
        self,
        model: ClusterModel,
        registry: CollectorRegistry,
        namespace_of: Callable[[str], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model = model
        self._clock = clock
        self._namespace_of = namespace_from_key(namespace_of)
        self._grouping: tuple[object, str, _Grouping] | None = None
        # Whether this replica counts: with leader election every replica keeps the whole cluster view, and only
        # the leader's counters grow, so a sum over replicas counts the fleet once.
        self.active: Callable[[], bool] = lambda: True
        self._lock = threading.Lock()  # tick (housekeeping thread) against collect (a scrape)
        self._last: float | None = None
        self._totals: Rates = {name: {} for name in COUNTERS}
        self._rates: Rates = {name: {} for name in COUNTERS}
        registry.register(self)
        registry.register(PriceCollector(model))

    def tick(self, now: float | None = None) -> None:
        """Add each series' growth since the last tick, then sample the fleet for the time until the next one.
        Time while the cluster view is incomplete, or while this replica is not the leader, is not counted. A
        failure is logged, never raised (the thread that calls this also expires reservations), and nothing is
        counted until a tick samples again."""
        now = self._clock() if now is None else now
        try:
            rates = self._sample() if self._model.ready and self.active() else {}
        except Exception:
            log.exception("cannot sample the fleet: GPU-seconds are not counted until the next tick")
            rates = {}
        with self._lock:
            if self._last is not None and now > self._last:
                self._advance(self._totals, now - self._last)
            self._last = now
            for name, series in self._rates.items():
                self._rates[name] = dict.fromkeys(series, 0.0) | rates.get(name, {})

    def _advance(self, totals: Rates, elapsed: float) -> None:
        for name, series in self._rates.items():
            counted = totals[name]
            for labels, rate in series.items():
                counted[labels] = counted.get(labels, 0.0) + rate * elapsed

    def collect(self) -> Iterator[CounterMetricFamily]:
        now = self._clock()
        with self._lock:
            totals = {name: dict(series) for name, series in self._totals.items()}
            if self._last is not None and now > self._last:
                self._advance(totals, now - self._last)
        for name, (documentation, labels) in COUNTERS.items():
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            for values, total in totals[name].items():
                family.add_metric(list(values), total)
            yield family

    def _sample(self) -> Rates:
        """Each series' growth per second in the fleet's current state."""
        view = self._model.view()
        snapshot, policy = view.snapshot, view.policy
        label = policy.accounting.pool_label
        grouping = self._grouping_of(snapshot, label)
        sample = sample_fleet(snapshot, view.shapes, label, grouping)
        seconds: dict[tuple[str, ...], float] = {}
        cost: dict[tuple[str, ...], float] = {}
        borrowed: dict[tuple[str, ...], float] = {}
        for (gpu_type, pool), states, lent in zip(sample.groups, sample.states, sample.borrowed, strict=True):
            price = policy.prices.hourly(gpu_type)
            for state, gpus in zip(STATES, states.tolist(), strict=True):
                seconds[gpu_type, pool, state] = gpus
                if price is not None:
                    cost[gpu_type, pool, state] = gpus * price / SECONDS_PER_HOUR
            borrowed[gpu_type, pool] = float(lent)
        owners = allocation_by_owner(self._model.assignments(), grouping.gpu_type, self._namespace_of)
        return {
            "gpu_extender_gpu_seconds": seconds,
            "gpu_extender_borrowed_gpu_seconds": borrowed,
            "gpu_extender_gpu_cost_dollars": cost,
            "gpu_extender_allocated_gpu_seconds": dict(owners),
        }

    def _grouping_of(self, snapshot: ClusterSnapshot, label: str) -> _Grouping:
        """Nodes by (GPU type, pool), kept until the node set or the pool label changes."""
        cached = self._grouping
        if cached is None or cached[0] is not snapshot.inventories or cached[1] != label:
            cached = self._grouping = (snapshot.inventories, label, _grouping(snapshot, label))
        return cached[2]
