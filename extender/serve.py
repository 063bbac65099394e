"""Wire the service together for `gpu-extender serve`: a static fleet file or a live cluster."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from extender.app import create_app
from extender.leadership import leadership_from_args
from extender.logs import configure
from extender.metrics import ExtenderMetrics
from policies.config import PlacementPolicy, PolicyError
from scheduler.model import ClusterModel
from scheduler.planner.serve import PlannerConfigError, planner_from_args
from scheduler.policy_reload import PolicyReloader
from scheduler.prewarm.serve import PrewarmConfigError, prewarmer_from_args
from scheduler.service import PlacementService
from scheduler.telemetry import TelemetryStore, config_from_args
from scheduler.watch import ClusterWatcher

log = logging.getLogger("gpu_extender.serve")


def fleet_service(path: str, policy: PlacementPolicy) -> PlacementService:
    """A dry-run service over a static fleet: bind records assignments in memory."""
    from scheduler.binder import MemoryBinder
    from scheduler.nodes import load_fleet

    model = ClusterModel(policy)
    model.replace_nodes(load_fleet(path))
    model.mark_ready()
    return PlacementService(model, MemoryBinder(), confirm_on_bind=True)


def live_service(kubeconfig: str | None, policy: PlacementPolicy) -> tuple[PlacementService, ClusterWatcher, Any]:
    """The production service: watches feed the model, bind writes to the API server. Also returns an API
    client for the background loops that write objects (the planner's ConfigMap)."""
    from kubernetes import client, config

    from scheduler.binder import KubernetesBinder

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    model = ClusterModel(policy)
    watcher = ClusterWatcher(client.ApiClient(), model)
    watcher.start()
    binder = KubernetesBinder(client.ApiClient(client.Configuration.get_default_copy()))
    return PlacementService(model, binder), watcher, client.ApiClient(client.Configuration.get_default_copy())


def _housekeeping(
    model: ClusterModel, stop: threading.Event, interval: float = 5.0, tick: Callable[[], None] | None = None
) -> None:
    """Expire reservations the watch never confirmed, follow the cluster's pod mix, count GPU-seconds (`tick`)."""
    while not stop.wait(interval):
        model.refresh_shapes()
        if tick is not None:
            tick()
        expired = model.expire_reservations()
        if expired:
            log.warning("reservations expired without a binding seen", extra={"pods": expired})


def _exit_on_signal(signum: int, _frame: object) -> None:
    """Leave by an exception, so `finally` blocks run; the exit status is the shell's for a signal."""
    raise SystemExit(128 + signum)


GC_THRESHOLD_GEN0 = 50_000


def _warn_if_slow_stack() -> None:
    """uvicorn falls back to its pure-Python parser and event loop without a word; they cost more per call than
    the decision itself."""
    missing = [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name) is None]
    if missing:
        log.warning("serving without uvicorn's fast stack", extra={"missing": missing})


def _http_protocol() -> Any:
    """uvicorn's fast HTTP protocol, writing each response at once (`extender.transport`); its default without
    httptools."""
    if importlib.util.find_spec("httptools") is None:
        return "auto"
    from extender.transport import CoalescingHttpToolsProtocol

    return CoalescingHttpToolsProtocol


def run(args: argparse.Namespace) -> int:
    configure(args.log_level)
    reloader = None
    policy = PlacementPolicy()
    if args.policy:
        reloader = PolicyReloader(args.policy)
        try:
            policy = reloader.load_initial()
        except PolicyError as exc:
            log.error("cannot start with this policy", extra={"error": str(exc)})
            return 2
    watcher: ClusterWatcher | None = None
    api_client: Any = None
    if args.fleet:
        try:
            service = fleet_service(args.fleet, policy)
        except (OSError, ValueError) as exc:
            log.error("cannot read the fleet file", extra={"path": args.fleet, "error": str(exc)})
            return 2
    else:
        service, watcher, api_client = live_service(args.kubeconfig, policy)
    namespace_of = watcher.namespace_of if watcher else None
    metrics = ExtenderMetrics(service.model, watch_stats=watcher.stats if watcher else None, namespace_of=namespace_of)
    try:
        leadership = leadership_from_args(args, service.model, api_client)
    except ValueError as exc:
        log.error("cannot elect a leader", extra={"error": str(exc)})
        return 2
    try:
        planner = planner_from_args(args, service.model, metrics.registry, api_client)
        prewarmer = prewarmer_from_args(args, metrics.registry, api_client)
    except (PlannerConfigError, PrewarmConfigError) as exc:
        log.error("cannot start a background loop", extra={"error": str(exc)})
        return 2
    telemetry_config = config_from_args(args)
    telemetry = None
    if telemetry_config is not None:
        telemetry = TelemetryStore(
            telemetry_config, service.model, estimates=service.recent_bindings, registry=metrics.registry
        ).start()
    if reloader is not None:

        def report(ok: bool) -> None:
            metrics.policy_reloads.labels("applied" if ok else "invalid").inc()
            metrics.policy_valid.set(1 if ok else 0)

        reloader.start(apply=service.model.set_policy, report=report)
    stop = threading.Event()
    if leadership is not None:
        metrics.waste.active = leadership.elector.is_leader  # the fleet's GPU-seconds counted once, by the leader
    housekeeping = (service.model, stop, 5.0, metrics.waste.tick)
    threading.Thread(target=_housekeeping, args=housekeeping, daemon=True, name="housekeeping").start()
    for loop in (planner, prewarmer):
        if loop is not None:
            if leadership is not None:
                loop.active = leadership.elector.is_leader  # the background loops act only on the leader
            loop.start()
    app: Any = create_app(service, metrics)
    if leadership is not None:
        app = leadership.start(app, metrics.registry)
    # Everything built so far lives as long as the process: keep the collector from rescanning it on every pass.
    gc.collect()
    gc.freeze()
    # Requests allocate many short-lived containers; at the default threshold (700) the collector runs several
    # times per call and its older generations pause for milliseconds in the latency tail. Almost everything here
    # dies by reference counting, so collections can be rarer.
    gc.set_threshold(GC_THRESHOLD_GEN0, 20, 100)
    log.info("serving", extra={"host": args.host, "port": args.port, "mode": "fleet" if args.fleet else "live"})
    _warn_if_slow_stack()
    # uvicorn re-raises the SIGTERM it shut down on, with this handler back in place: exit through the cleanup below
    # (the leader hands its Lease over there), not by the signal's default action, which would skip it.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            # kube-scheduler connects directly: no forwarded headers to trust, and one ASGI layer less per call.
            proxy_headers=False,
            server_header=False,
            ws="none",
            http=_http_protocol(),
            # Longer than kube-scheduler's idle timeout (Go's 90 s): the scheduler closes idle connections first,
            # so it never sends a call on a connection we are closing, and bursts after a pause reuse connections
            # (no new TCP and TLS handshakes).
            timeout_keep_alive=120,
            ssl_certfile=args.tls_cert,
            ssl_keyfile=args.tls_key,
        )
    finally:
        if leadership is not None:
            leadership.stop()  # first: stop deciding and hand the Lease to a successor at once
        stop.set()
        if reloader is not None:
            reloader.stop()
        if watcher is not None:
            watcher.stop()
        if telemetry is not None:
            telemetry.stop()
        for loop in (planner, prewarmer):
            if loop is not None:
                loop.stop()
    return 0
