"""Live GPU utilization from Prometheus, smoothed per GPU and pushed into the cluster model in the background.

One query per interval reads every GPU's series of the last `lookback` seconds with their real sample times
(a range selector evaluated as an instant query), whether they come from DCGM exporter or from our node agent:
both use DCGM's names and the labels `Hostname` (or `node` / `kubernetes_node`) and `gpu`. Per GPU the busy
fraction is `DCGM_FI_PROF_GR_ENGINE_ACTIVE` where the hardware gives it, else `DCGM_FI_DEV_GPU_UTIL` / 100,
smoothed over `window_s` (mean or a percentile); its free memory is the newest `DCGM_FI_DEV_FB_FREE`. MIG
instance series (`GPU_I_ID`) are not whole-GPU load and are skipped.

A GPU whose newest sample is older than `max_age_s` is unknown (NaN): the policy then places on allocation and
declared GPU memory alone for it. Pods bound after a GPU's newest sample count as estimated load (their share of
the GPU) until a sample taken after the binding shows them. Failures of Prometheus keep the samples already held
until they expire; the store logs the first failure and the recovery, and never raises into its caller.
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from policies.inventory import MILLI_PER_GPU, Assignment
from policies.state import ClusterSnapshot
from scheduler.model import ClusterModel
from scheduler.promql import PrometheusClient, PrometheusError, Series

__all__ = [
    "BUSY_METRICS",
    "EstimateHook",
    "RecentBindings",
    "TelemetryConfig",
    "TelemetryStore",
    "TelemetryView",
    "add_arguments",
    "config_from_args",
    "smooth",
]

log = logging.getLogger("gpu_extender.telemetry")

ENGINE_ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"  # ratio 0..1
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"  # percent
FB_USED = "DCGM_FI_DEV_FB_USED"  # MiB
FB_FREE = "DCGM_FI_DEV_FB_FREE"  # MiB
BUSY_METRICS = (ENGINE_ACTIVE, GPU_UTIL)  # in order of preference
_SCALE = {ENGINE_ACTIVE: 1.0, GPU_UTIL: 0.01}

Smoothing = Literal["mean", "p90", "p99", "max"]
_PERCENTILE = {"p90": 90, "p99": 99, "max": 100}
GpuKey = tuple[str, int]  # (node, GPU index)
EstimateHook = Callable[[], Iterable[tuple[float, Assignment]]]  # (unix time bound, assignment)


@dataclass(frozen=True)
class TelemetryConfig:
    """Where to read utilization and how to turn samples into one busy fraction per GPU."""

    url: str
    interval_s: float = 15.0
    window_s: float = 60.0
    max_age_s: float = 90.0
    smoothing: Smoothing = "mean"
    timeout_s: float = 5.0
    node_labels: tuple[str, ...] = ("Hostname", "node", "kubernetes_node")
    gpu_label: str = "gpu"
    selector: str = ""  # extra label matchers, e.g. 'job="gpu-node-agent"'
    estimate_grace_s: float = 0.0  # count a binding until a sample this long after it
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.smoothing not in ("mean", *_PERCENTILE):
            raise ValueError(f"smoothing must be mean, p90, p99 or max, not {self.smoothing!r}")
        if self.interval_s <= 0 or self.window_s <= 0 or self.max_age_s <= 0:
            raise ValueError("interval_s, window_s and max_age_s must be positive")

    @property
    def lookback_s(self) -> int:
        return math.ceil(max(self.window_s, self.max_age_s))

    def query(self) -> str:
        names = "|".join((*BUSY_METRICS, FB_USED, FB_FREE))
        extra = f",{self.selector}" if self.selector else ""
        return f'{{__name__=~"{names}"{extra}}}[{self.lookback_s}s]'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags of the telemetry store; without `--prometheus-url` placement uses allocation only."""
    group = parser.add_argument_group("live utilization")
    group.add_argument("--prometheus-url", help="Prometheus base URL with DCGM exporter or node agent series")
    group.add_argument("--telemetry-interval", type=float, default=15.0, help="seconds between queries")
    group.add_argument("--telemetry-window", type=float, default=60.0, help="seconds of samples to smooth over")
    group.add_argument(
        "--telemetry-max-age",
        type=float,
        default=90.0,
        help="a GPU whose newest sample is older is unknown (allocation only)",
    )
    group.add_argument("--telemetry-smoothing", choices=["mean", *_PERCENTILE], default="mean")
    group.add_argument(
        "--telemetry-estimate-grace",
        type=float,
        default=0.0,
        help="seconds a new pod keeps counting at its whole share after the first sample that could show it "
        "(with a long window, set it near the window so old samples do not hide new load)",
    )
    group.add_argument("--telemetry-selector", default="", help="extra label matchers, e.g. 'job=\"gpu-node-agent\"'")


def config_from_args(args: argparse.Namespace) -> TelemetryConfig | None:
    if not getattr(args, "prometheus_url", None):
        return None
    return TelemetryConfig(
        url=args.prometheus_url,
        interval_s=args.telemetry_interval,
        window_s=args.telemetry_window,
        max_age_s=args.telemetry_max_age,
        smoothing=args.telemetry_smoothing,
        selector=args.telemetry_selector,
        estimate_grace_s=args.telemetry_estimate_grace,
    )


@dataclass(frozen=True)
class TelemetryView:
    """The store's latest result. `busy` holds fresh GPUs only; the others are unknown."""

    busy: Mapping[GpuKey, float]
    memory_used_mib: Mapping[GpuKey, float]
    memory_total_mib: Mapping[GpuKey, float]
    sampled_at: Mapping[GpuKey, float]
    fresh_nodes: int = 0
    stale_nodes: int = 0
    computed_at: float = 0.0


def smooth(values: Iterable[float] | np.ndarray, how: Smoothing, axis: int | None = None) -> np.ndarray:
    """Busy fraction from a window of samples: the mean, or a high percentile (p99 and max see rare bursts,
    the right choice when the value decides whether a GPU may lend idle capacity)."""
    if how == "mean":
        return np.mean(values, axis=axis)
    return np.percentile(values, _PERCENTILE[how], axis=axis)


class RecentBindings:
    """Bindings recorded by the bind path for the store's estimate hook; entries older than `keep_s` are dropped."""

    def __init__(self, keep_s: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        self._keep_s = keep_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: list[tuple[float, Assignment]] = []

    def record(self, assignment: Assignment, at: float | None = None) -> None:
        with self._lock:
            self._items.append((self._clock() if at is None else at, assignment))

    def __call__(self) -> list[tuple[float, Assignment]]:
        cutoff = self._clock() - self._keep_s
        with self._lock:
            self._items = [item for item in self._items if item[0] >= cutoff]
            return list(self._items)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.nodes = Gauge(
            "gpu_extender_telemetry_nodes",
            "Nodes with shareable GPUs by utilization freshness (stale: placed by allocation only)",
            ["state"],
            registry=registry,
        )
        self.gpus = Gauge("gpu_extender_telemetry_gpus", "GPUs with a fresh utilization", registry=registry)
        self.queries = Counter(
            "gpu_extender_telemetry_queries", "Prometheus queries by result", ["result"], registry=registry
        )
        self.duration = Gauge(
            "gpu_extender_telemetry_query_seconds", "Duration of the last Prometheus query", registry=registry
        )
        self.last_success = Gauge(
            "gpu_extender_telemetry_last_success_timestamp_seconds",
            "When Prometheus last answered",
            registry=registry,
        )


class TelemetryStore:
    """Pulls utilization every `interval_s` on a background thread and feeds `model.set_utilization`."""

    def __init__(
        self,
        config: TelemetryConfig,
        model: ClusterModel,
        estimates: EstimateHook | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        client: PrometheusClient | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self._model = model
        self._estimates = estimates
        self._clock = clock
        self._client = client or PrometheusClient(config.url, config.timeout_s, config.headers)
        self._samples: dict[GpuKey, dict[str, dict[float, float]]] = {}
        self._metrics = _Metrics(self.registry)
        self._view = TelemetryView({}, {}, {}, {})
        self._failing = False
        self._stale: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> TelemetryStore:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> TelemetryStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def view(self) -> TelemetryView:
        return self._view

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.poll_once()
            self._stop.wait(max(self.config.interval_s - (time.monotonic() - started), 0.05))

    # -- one interval ------------------------------------------------------------------------------------
    def poll_once(self) -> TelemetryView:
        """Query, merge, expire, smooth and push. Never raises; returns the resulting view."""
        try:
            self._fetch()
            self._view = self._push(self._compute())
        except Exception:  # a bug here must not stop the loop or reach the caller
            log.exception("telemetry update failed")
        self.polls += 1
        return self._view

    def _fetch(self) -> None:
        now = self._clock()
        started = time.perf_counter()
        try:
            series = self._client.query(self.config.query(), at=now)
        except PrometheusError as exc:
            self._metrics.queries.labels("error").inc()
            if not self._failing:
                log.warning(
                    "cannot read utilization from Prometheus; keeping recent samples until they expire",
                    extra={"url": self.config.url, "error": str(exc)},
                )
            self._failing = True
            return
        finally:
            self._metrics.duration.set(time.perf_counter() - started)
        self._metrics.queries.labels("ok").inc()
        self._metrics.last_success.set(now)
        if self._failing:
            log.info("Prometheus answers again", extra={"url": self.config.url})
        self._failing = False
        self._merge(series)

    def _key(self, labels: Mapping[str, str]) -> GpuKey | None:
        if labels.get("GPU_I_ID"):
            return None
        node = next((labels[n] for n in self.config.node_labels if labels.get(n)), None)
        try:
            gpu = int(labels.get(self.config.gpu_label, ""))
        except ValueError:
            return None
        return (node, gpu) if node and gpu >= 0 else None

    def _merge(self, series: list[Series]) -> None:
        for s in series:
            name = s.labels.get("__name__", "")
            key = self._key(s.labels)
            if key is None or not s.samples:
                continue
            self._samples.setdefault(key, {}).setdefault(name, {}).update(s.samples)

    def _compute(self) -> TelemetryView:
        now = self._clock()
        horizon = now - self.config.lookback_s
        fresh_after = now - self.config.max_age_s
        busy: dict[GpuKey, float] = {}
        newest: dict[GpuKey, float] = {}
        used: dict[GpuKey, float] = {}
        total: dict[GpuKey, float] = {}
        for key in list(self._samples):
            metrics = self._samples[key]
            for name in list(metrics):
                kept = {ts: v for ts, v in metrics[name].items() if ts >= horizon}
                if kept:
                    metrics[name] = kept
                else:
                    del metrics[name]
            if not metrics:
                del self._samples[key]
                continue
            for name in BUSY_METRICS:
                points = metrics.get(name)
                if points and max(points) >= fresh_after:
                    busy[key] = self._smooth(points, now) * _SCALE[name]
                    newest[key] = max(points)
                    break
            if FB_USED in metrics and FB_FREE in metrics and max(metrics[FB_USED]) >= fresh_after:
                u, f = metrics[FB_USED][max(metrics[FB_USED])], metrics[FB_FREE][max(metrics[FB_FREE])]
                used[key], total[key] = u, u + f
        for key, extra in self._estimated(newest).items():
            busy[key] = busy[key] + extra
        busy = {k: min(max(v, 0.0), 1.0) for k, v in busy.items()}
        return TelemetryView(
            MappingProxyType(busy),
            MappingProxyType(used),
            MappingProxyType(total),
            MappingProxyType(newest),
            computed_at=now,
        )

    def _smooth(self, points: dict[float, float], now: float) -> float:
        recent = [v for ts, v in points.items() if ts >= now - self.config.window_s]
        if not recent:
            return points[max(points)]
        return float(smooth(recent, self.config.smoothing))

    def _estimated(self, newest: Mapping[GpuKey, float]) -> dict[GpuKey, float]:
        """Load of pods bound after a GPU's newest sample (plus the grace), by GPU with fresh data."""
        if self._estimates is None:
            return {}
        extra: dict[GpuKey, float] = {}
        try:
            recent = list(self._estimates())
        except Exception:  # the hook belongs to the caller; a failure there only loses the estimate
            log.exception("estimate hook failed")
            return {}
        for bound_at, assignment in recent:
            share = assignment.milli / MILLI_PER_GPU
            for gpu in assignment.gpus:
                key = (assignment.node, gpu)
                if key in newest and bound_at + self.config.estimate_grace_s > newest[key]:
                    extra[key] = extra.get(key, 0.0) + share
        return extra

    def _push(self, view: TelemetryView) -> TelemetryView:
        for _ in range(3):  # the node set may change between building the array and handing it over
            snapshot = self._model.snapshot()
            util = _per_gpu(snapshot, view.busy)
            free = {key: view.memory_total_mib[key] - used for key, used in view.memory_used_mib.items()}
            memory_free = _per_gpu(snapshot, free)
            current = self._model.snapshot()
            if current.names == snapshot.names and current.gpu_present.shape == util.shape:
                self._model.set_utilization(util, memory_free)
                break
        else:
            log.warning("node set kept changing; utilization not updated this interval")
            return view
        return self._account(snapshot.names, snapshot.gpu_present, util, view)

    def _account(
        self, names: tuple[str, ...], present: np.ndarray, util: np.ndarray, view: TelemetryView
    ) -> TelemetryView:
        """Count nodes with shareable GPUs by freshness; log when the set placed by allocation only changes."""
        shared = present.any(axis=1)
        known = (~np.isnan(util) & present).any(axis=1)
        fresh, stale = int((shared & known).sum()), int((shared & ~known).sum())
        self._metrics.nodes.labels("fresh").set(fresh)
        self._metrics.nodes.labels("stale").set(stale)
        self._metrics.gpus.set(int((~np.isnan(util) & present).sum()))
        stale_names = frozenset(names[i] for i in np.flatnonzero(shared & ~known))
        if stale_names != self._stale:
            if stale_names:
                log.warning(
                    "no fresh utilization for some nodes; they are placed by allocation only",
                    extra={"stale_nodes": len(stale_names), "fresh_nodes": fresh, "examples": sorted(stale_names)[:10]},
                )
            else:
                log.info("fresh utilization for every node", extra={"fresh_nodes": fresh})
            self._stale = stale_names
        return replace(view, fresh_nodes=fresh, stale_nodes=stale)


def _per_gpu(snapshot: ClusterSnapshot, values: Mapping[GpuKey, float]) -> np.ndarray:
    """float32 [N, G]: `values` by (node, GPU) in the snapshot's rows, NaN where there is none."""
    n, g = snapshot.gpu_present.shape
    out = np.full((n, g), np.nan, dtype=np.float32)
    for (node, gpu), value in values.items():
        i = snapshot.index.get(node)
        if i is not None and gpu < g:
            out[i, gpu] = value
    return out
