"""The `serve` flags of the pre-warmer, and the loop they configure."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from policies.forecast import Forecaster
    from scheduler.prewarm.loop import PrewarmLoop

FORECASTERS = ("seasonal", "cost-aware", "histogram", "keepalive")


class PrewarmConfigError(ValueError):
    """Flags that cannot make a pre-warmer."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "pre-warmer (Deployments labelled gpu-extender.io/prewarm=enabled: replica floors, vLLM sleep and wake)"
    )
    group.add_argument("--prewarm", action="store_true", help="run the pre-warmer in this process (live mode)")
    group.add_argument(
        "--prewarm-requests",
        help="request log (timestamp,model[,service_time] CSV), re-read every round; default: vLLM's series in "
        "--prometheus-url",
    )
    group.add_argument(
        "--prewarm-forecaster",
        choices=FORECASTERS,
        default="seasonal",
        help="seasonal (30-minute bins, the default chosen on the genai-serving trace's tuning days), cost-aware "
        "(the choice there for sleep mode), histogram (Serverless in the Wild), keepalive (fixed)",
    )
    group.add_argument("--prewarm-keep-alive", type=float, default=600.0, help="seconds (keepalive, and fallbacks)")
    group.add_argument(
        "--prewarm-bin-seconds", type=float, default=60.0, help="histogram: width of an idle-time bin (60)"
    )
    group.add_argument("--prewarm-start-seconds", type=float, default=25.0, help="a replica's full load (25)")
    group.add_argument("--prewarm-wake-seconds", type=float, default=6.0, help="a wake from vLLM sleep (6)")
    group.add_argument("--prewarm-interval", type=float, default=5.0, help="seconds between rounds (5)")
    group.add_argument("--prewarm-namespace", help="act on this namespace only (default: all)")
    group.add_argument(
        "--prewarm-max-starts", type=int, default=2, help="floors raised per round, soonest window first (2; 0: all)"
    )


def forecaster_named(name: str, keep_alive_s: float, bin_s: float = 60.0) -> Forecaster:
    from policies.forecast import (
        FixedKeepAlive,
        HistogramPolicy,
        default_forecaster,
        default_sleep_forecaster,
    )

    if name == "keepalive":
        return FixedKeepAlive(keep_alive_s)
    if name == "histogram":
        return HistogramPolicy(bin_s=bin_s, fallback_keep_s=keep_alive_s)
    if name == "seasonal":
        return replace(default_forecaster(), fallback_keep_s=keep_alive_s)
    if name == "cost-aware":
        return replace(default_sleep_forecaster(), fallback_keep_s=keep_alive_s)
    raise PrewarmConfigError(f"unknown forecaster {name!r}; choose from {', '.join(FORECASTERS)}")


def prewarmer_from_args(args: argparse.Namespace, registry: CollectorRegistry, api_client: Any) -> PrewarmLoop | None:
    """The pre-warmer `--prewarm` asks for (None without it); it acts on the cluster, so live mode only."""
    if not args.prewarm:
        return None
    if api_client is None:
        raise PrewarmConfigError("--prewarm acts on Deployments: it needs a cluster (not --fleet)")
    from scheduler.prewarm.activity import PrometheusActivity, RequestLogActivity
    from scheduler.prewarm.loop import PrewarmLoop, PrewarmMetrics

    if args.prewarm_requests:
        activity: Any = RequestLogActivity(args.prewarm_requests)
    elif getattr(args, "prometheus_url", None):
        from scheduler.promql import PrometheusClient

        activity = PrometheusActivity(PrometheusClient(args.prometheus_url))
    else:
        raise PrewarmConfigError("--prewarm needs --prewarm-requests FILE or --prometheus-url (vLLM's series)")
    durations = (args.prewarm_start_seconds, args.prewarm_wake_seconds, args.prewarm_interval, args.prewarm_keep_alive)
    if min(durations) < 0 or args.prewarm_bin_seconds <= 0:
        raise PrewarmConfigError("pre-warmer durations must be >= 0 (the histogram's bins > 0)")
    return PrewarmLoop(
        api_client,
        forecaster_named(args.prewarm_forecaster, args.prewarm_keep_alive, args.prewarm_bin_seconds),
        activity,
        start_s=args.prewarm_start_seconds,
        wake_s=args.prewarm_wake_seconds,
        interval_s=args.prewarm_interval,
        namespace=args.prewarm_namespace,
        metrics=PrewarmMetrics(registry),
        max_starts_per_round=max(0, args.prewarm_max_starts),
    )
