"""The `serve` flags of the co-location planner, and the loop they configure."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from scheduler.model import ClusterModel

if TYPE_CHECKING:  # the planner's imports (OR-Tools) load only when `--plan` asks for it
    from scheduler.planner.loop import DemandSource, PlannerLoop

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class PlannerConfigError(ValueError):
    """Flags that cannot make a planner (no demand source, an unreadable catalog, bad prices)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("co-location planner (re-plans in the background; serving pods follow it)")
    group.add_argument("--plan", action="store_true", help="run the planner in this process")
    group.add_argument(
        "--plan-demand",
        help="demand file (model,requests_per_second[,min_replicas] CSV or YAML), re-read every round; "
        "default: vLLM's series in --prometheus-url",
    )
    group.add_argument("--plan-catalog", help="model catalog YAML (default: the shipped policies/models.yaml)")
    group.add_argument("--plan-interval", type=float, default=60.0, help="seconds between plans (60)")
    group.add_argument("--plan-time-limit", type=float, default=10.0, help="solver seconds per plan (10)")
    group.add_argument("--plan-margin", type=float, help="compute kept free on every GPU (default: planner's)")
    group.add_argument("--plan-prices", default="", help="$/h per GPU name part, e.g. H100=2.5,A100=1.6")
    group.add_argument("--plan-allow-mig", action="store_true", help="let the plan carve MIG-capable GPUs")
    group.add_argument(
        "--plan-node-selector",
        default="",
        help="plan only nodes with these labels, e.g. pool=serving,nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
    )
    group.add_argument(
        "--plan-namespace",
        help="namespace of the gpu-extender-plan ConfigMap (default: this pod's namespace, else kube-system)",
    )


def planner_from_args(
    args: argparse.Namespace, model: ClusterModel, registry: CollectorRegistry, api_client: Any | None
) -> PlannerLoop | None:
    """The planner `--plan` asks for (None without it). `api_client`: publish to a ConfigMap (live mode)."""
    if not args.plan:
        return None
    from policies.catalog import CatalogError, default_catalog, load_catalog
    from policies.colocation import PlannerOptions
    from scheduler.planner.fleet import parse_prices
    from scheduler.planner.loop import PlannerLoop, PlannerMetrics, configmap_publisher

    try:
        catalog = load_catalog(args.plan_catalog) if args.plan_catalog else default_catalog()
    except CatalogError as exc:
        raise PlannerConfigError(f"cannot read the model catalog: {exc}") from None
    try:
        prices = parse_prices(args.plan_prices)
        options = PlannerOptions(
            time_limit_s=args.plan_time_limit, **({} if args.plan_margin is None else {"margin": args.plan_margin})
        )
    except ValueError as exc:
        raise PlannerConfigError(str(exc)) from None
    demand = _demand_source(args)
    selector = _label_selector(args.plan_node_selector)
    publish = configmap_publisher(api_client, _namespace(args)) if api_client is not None else None
    return PlannerLoop(
        model,
        catalog,
        demand,
        options=options,
        prices=prices,
        allow_mig=args.plan_allow_mig,
        interval_s=args.plan_interval,
        node_selector=selector,
        publish=publish,
        metrics=PlannerMetrics(registry),
    )


def _demand_source(args: argparse.Namespace) -> DemandSource:
    if args.plan_demand:
        from scheduler.planner.demand_file import read_demand_file, wants_as_loads

        path = args.plan_demand
        return lambda: wants_as_loads(read_demand_file(path))
    if not getattr(args, "prometheus_url", None):
        raise PlannerConfigError("--plan needs --plan-demand FILE or --prometheus-url (vLLM's series)")
    from scheduler.planner.demand import PrometheusDemandReader
    from scheduler.promql import PrometheusClient

    reader = PrometheusDemandReader(PrometheusClient(args.prometheus_url))
    return lambda: (reader.read(), {})


def _label_selector(text: str) -> dict[str, str]:
    """`key=value,key=value` as a mapping; raises PlannerConfigError naming a malformed entry."""
    selector = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise PlannerConfigError(f"--plan-node-selector: {entry!r} is not key=value")
        selector[key.strip()] = value.strip()
    return selector


def _namespace(args: argparse.Namespace) -> str:
    if args.plan_namespace:
        return str(args.plan_namespace)
    try:
        with open(NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or "kube-system"
    except OSError:
        return os.environ.get("POD_NAMESPACE", "kube-system")
