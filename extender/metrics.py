"""Prometheus metrics of the extender: decision latency and outcomes, and the state of the GPU fleet."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from extender.waste import WasteAccountant
from policies.fragmentation import cpu_stranding, node_fragmentation
from policies.state import ClusterSnapshot
from scheduler.model import ClusterModel

# Sub-millisecond resolution: every millisecond spent here is lost scheduler throughput.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class FleetCollector(Collector):
    """Fleet gauges computed from the current snapshot at scrape time (never on the request path)."""

    def __init__(self, model: ClusterModel) -> None:
        self._model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self._model.view()
        snapshot = view.snapshot
        capacity = snapshot.gpu_present.sum()
        allocated = (snapshot.gpu_allocated_milli()) / 1000.0
        fragmented = stranded = 0.0
        if snapshot.size:
            rows = np.arange(snapshot.size)
            fragmented = float(node_fragmentation(snapshot, rows, view.shapes).sum()) / 1000.0
            stranded = float(cpu_stranding(snapshot, rows, view.shapes).sum()) / 1000.0
        yield GaugeMetricFamily("gpu_extender_gpus", "Schedulable GPUs (not in MIG mode) in the fleet", float(capacity))
        yield GaugeMetricFamily("gpu_extender_allocated_gpus", "GPU capacity held by pods, in GPUs", allocated)
        yield GaugeMetricFamily(
            "gpu_extender_fragmented_gpus",
            "Idle GPU capacity the typical pod shapes could not use (FGD measure), in GPUs",
            fragmented,
        )
        yield GaugeMetricFamily(
            "gpu_extender_cpu_stranded_gpus",
            "Idle GPU capacity the nodes' free CPU cannot feed at the typical pods' CPU per GPU, in GPUs",
            stranded,
        )
        borrowed = float(snapshot.gpu_borrowed.sum()) / 1000.0
        yield GaugeMetricFamily(
            "gpu_extender_borrowed_gpus", "GPU shares running on borrowed idle capacity (overcommit), in GPUs", borrowed
        )
        yield from _measured_load(snapshot)
        yield GaugeMetricFamily("gpu_extender_nodes", "Nodes in the cluster view", float(snapshot.size))
        yield GaugeMetricFamily("gpu_extender_ready", "1 when the cluster view is complete", float(self._model.ready))
        yield GaugeMetricFamily(
            "gpu_extender_reservations",
            "Bind-time reservations not yet seen by the watch",
            self._model.reservation_count(),
        )


def _measured_load(snapshot: ClusterSnapshot) -> Iterator[GaugeMetricFamily]:
    """What allocated GPUs really do, where telemetry is fresh: busy capacity, and allocated capacity left idle
    (the waste allocation-only scheduling cannot see)."""
    known = snapshot.gpu_present & ~np.isnan(snapshot.gpu_util)
    allocated = np.clip((1000 - snapshot.gpu_free[known]) / 1000.0, 0.0, 1.0)
    busy = np.clip(snapshot.gpu_util[known], 0.0, 1.0)
    yield GaugeMetricFamily("gpu_extender_measured_gpus", "GPUs with a fresh utilization sample", float(known.sum()))
    yield GaugeMetricFamily(
        "gpu_extender_busy_gpus", "Measured busy capacity of GPUs with fresh samples, in GPUs", float(busy.sum())
    )
    yield GaugeMetricFamily(
        "gpu_extender_idle_allocated_gpus",
        "Allocated GPU capacity that is measurably idle (allocated minus busy, per GPU), in GPUs",
        float(np.clip(allocated - busy, 0.0, None).sum()),
    )


class ReuseCollector(Collector):
    """How much work the hot path found done ahead: prioritize answers computed right after filter and still
    valid, binds that took the placement held since prioritize, and node evaluations kept from earlier pods."""

    def __init__(self, scores: object, evaluations: object) -> None:
        self._scores = scores
        self._evaluations = evaluations

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name in ("hits", "misses"):
            yield CounterMetricFamily(
                f"gpu_extender_score_cache_{name}",
                f"Prioritize answers {name} in the scores computed ahead",
                getattr(self._scores, name),
            )
        yield CounterMetricFamily(
            "gpu_extender_score_cache_planned_binds",
            "Binds that took the placement held or planned when scoring instead of deciding again",
            self._scores.planned_hits,
        )
        rows = CounterMetricFamily(
            "gpu_extender_node_evaluations",
            "Node evaluations for filter and prioritize, by whether they were computed or reused",
            labels=["outcome"],
        )
        rows.add_metric(["computed"], self._evaluations.rows_evaluated)
        rows.add_metric(["reused"], self._evaluations.rows_reused)
        yield rows
        yield CounterMetricFamily(
            "gpu_extender_node_evaluation_resets",
            "Times the kept node evaluations were dropped (node set, policy or typical shapes changed)",
            self._evaluations.resets,
        )


class WatchCollector(Collector):
    """The cluster watch's counters (lists, relists, reconnects, events, conflicts) at scrape time."""

    COUNTERS = ("lists", "relists", "watch_restarts", "reconnects", "events", "bookmarks", "conflicts", "unreadable")
    GAUGES = ("unknown_gpu_pods", "invalid_pods")

    def __init__(self, stats: object) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name in self.COUNTERS:
            yield CounterMetricFamily(
                f"gpu_extender_watch_{name}", f"Cluster watch: {name}", getattr(self._stats, name)
            )
        for name in self.GAUGES:
            yield GaugeMetricFamily(f"gpu_extender_watch_{name}", f"Cluster watch: {name}", getattr(self._stats, name))


class ExtenderMetrics:
    """Every metric of the extender in one registry. `waste.tick()` integrates the fleet's GPU-seconds by state;
    the housekeeping thread calls it (`namespace_of` names the namespace of a pod the model keys by UID)."""

    def __init__(
        self,
        model: ClusterModel,
        registry: CollectorRegistry | None = None,
        watch_stats: object | None = None,
        namespace_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.latency = Histogram(
            "gpu_extender_request_duration_seconds",
            "Time to answer one extender call, by verb",
            ["verb"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "gpu_extender_decisions_total",
            "Extender calls by verb and outcome",
            ["verb", "outcome"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "gpu_extender_rejections_total", "Nodes rejected by filter, by reason", ["reason"], registry=self.registry
        )
        self.policy_reloads = Counter(
            "gpu_extender_policy_reloads_total", "Policy file reloads by result", ["result"], registry=self.registry
        )
        self.policy_valid = Gauge(
            "gpu_extender_policy_valid",
            "1 when the policy file on disk is the one in force; 0 when it is invalid and the last good one is used",
            registry=self.registry,
        )
        self.policy_valid.set(1)
        self.registry.register(FleetCollector(model))
        self.waste = WasteAccountant(model, self.registry, namespace_of=namespace_of)
        if watch_stats is not None:
            self.registry.register(WatchCollector(watch_stats))
