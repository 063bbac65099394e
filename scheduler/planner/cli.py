"""`gpu-extender plan`: how many replicas of each served model to run, and on which GPU, MIG slice or GPU share, at
the least cost for a fleet; printed, and with `--out` written as `plan.json`, Deployments to apply and a picture of
the used GPUs (`plan.png`, when matplotlib is installed).

Examples:
  gpu-extender plan --fleet fleet.yaml --demand demand.csv --prices H100=2.5,A100=1.6 --out plan/
  gpu-extender plan --fleet fleet.yaml --requests trace.csv --time-limit 30 --allow-mig

The planner (and OR-Tools with it) is imported when the command runs, not when the parser is built: every
`gpu-extender` command builds this parser.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from policies.catalog import ModelCatalog, ModelSpec
    from policies.colocation import FleetGpu, Plan, PlannedReplica, PlannerOptions, ServedModel
    from policies.colocation.problem import Problem

from policies.inventory import MILLI_PER_GPU
from scheduler.annotations import GPU_MEMORY_FRACTION
from scheduler.podspec import (
    ANNOTATION_GPU_MEMORY,
    ANNOTATION_LATENCY_CLASS,
    ANNOTATION_MODEL,
    GPU_MILLI_RESOURCE,
    GPU_RESOURCE,
    MIG_RESOURCE_PREFIX,
)

DEFAULT_IMAGE = "vllm/vllm-openai:latest"
DEFAULT_SCHEDULER = "gpu-scheduler"
MEMORY_FRACTION_ENV = "GPU_MEMORY_FRACTION"
DNS_LABEL_MAX = 63


class _Refusal(Exception):
    """An input the plan cannot be made from: its message is all the user needs (exit 2, no traceback)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", required=True, help="fleet file: openb node CSV or a YAML list of Node objects")
    parser.add_argument("--catalog", help="model catalog YAML (default: the shipped policies/models.yaml)")
    demand = parser.add_mutually_exclusive_group(required=True)
    demand.add_argument(
        "--demand", help="demand per model: CSV model,requests_per_second[,min_replicas] or YAML model: rps"
    )
    demand.add_argument(
        "--requests", help="request trace CSV (timestamp,model[,service_time]); its histories keep peaks apart"
    )
    parser.add_argument("--trace-step", type=float, default=60.0, help="with --requests: seconds per rate step (60)")
    parser.add_argument(
        "--percentile", type=float, default=95.0, help="with --requests: the step rate to plan for (95th)"
    )
    parser.add_argument("--margin", type=float, help="compute kept free on every GPU and slice (default: planner's)")
    parser.add_argument("--max-replicas-per-gpu", type=int, help="replicas one GPU may share (default: planner's)")
    parser.add_argument(
        "--correlation-threshold", type=float, help="models whose histories correlate above it never share a GPU"
    )
    parser.add_argument("--time-limit", type=float, help="solver seconds (default: planner's)")
    parser.add_argument("--workers", type=int, help="solver threads (default: planner's)")
    parser.add_argument("--prices", default="", help="$/h per GPU name part, e.g. H100=2.5,A100=1.6 (default 1.0)")
    parser.add_argument("--allow-mig", action="store_true", help="let the plan carve MIG-capable GPUs into slices")
    parser.add_argument("--top", type=int, default=40, help="GPUs to list (default 40)")
    parser.add_argument("--out", help="directory for plan.json, deployments.yaml and plan.png")
    parser.add_argument("--namespace", default="default", help="namespace of the Deployments (default: default)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"serving image (default {DEFAULT_IMAGE})")
    parser.add_argument(
        "--scheduler-name", default=DEFAULT_SCHEDULER, help=f"the extender's scheduler (default {DEFAULT_SCHEDULER})"
    )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _Refusal as exc:
        print(f"gpu-extender plan: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from policies.colocation import PlanError, solve
    from policies.colocation.problem import build_problem

    catalog = _catalog(args.catalog)
    fleet = _fleet(args.fleet, args.prices, args.allow_mig)
    models, histories = _demand(args, catalog)
    try:
        options = _options(args)
        problem = build_problem(models, fleet, options, histories)
        plan = solve(problem)
        baselines = _baselines(problem, plan)
    except PlanError as exc:
        raise _Refusal(str(exc)) from None
    report = plan_report(plan, baselines, models, fleet, options)
    print(render(report, args.top, args.out))
    if args.out:
        documents, notes = deployments(plan, [m.spec for m in models], args.namespace, args.image, args.scheduler_name)
        report["deployments"] = [_summary(d) for d in documents]
        report["deployment_notes"] = notes
        _write(Path(args.out), report, documents, notes)
    return 0


# --- inputs ------------------------------------------------------------------------------------------------------


def _reason(exc: Exception, path: str) -> str:
    """An error's message without the path the caller names anyway."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).removeprefix(f"{path}: ")


def _catalog(path: str | None) -> ModelCatalog:
    from policies.catalog import CatalogError, default_catalog, load_catalog

    try:
        return load_catalog(path) if path else default_catalog()
    except CatalogError as exc:
        raise _Refusal(f"cannot read the catalog: {exc}") from None


def _fleet(path: str, prices: str, allow_mig: bool) -> list[FleetGpu]:
    from scheduler.nodes import load_fleet
    from scheduler.planner.fleet import fleet_gpus, parse_prices

    try:
        price_table = parse_prices(prices)
    except ValueError as exc:
        raise _Refusal(f"--prices: {exc}") from None
    try:
        nodes = load_fleet(path)
    except (OSError, ValueError, KeyError) as exc:
        raise _Refusal(f"cannot read the fleet {path}: {_reason(exc, path)}") from None
    gpus = fleet_gpus(nodes, price_table, allow_mig)
    if not gpus:
        raise _Refusal(f"the fleet {path} has no GPUs")
    return gpus


def _demand(args: argparse.Namespace, catalog: ModelCatalog) -> tuple[list[ServedModel], list[np.ndarray]]:
    """The models to serve, in name order, and their request histories in the same order (empty without a trace),
    through the planner loop's own reading (`served_models`). A name the catalog lacks is refused with the names it
    has: a plan without that model would be a silent under-provisioning."""
    from scheduler.planner.demand import read_trace_demand
    from scheduler.planner.demand_file import read_demand_file, wants_as_loads
    from scheduler.planner.served import served_models

    path = args.requests or args.demand
    try:
        if args.requests:
            loads, floors = read_trace_demand(path, args.trace_step, args.percentile), {}
        else:
            loads, floors = wants_as_loads(read_demand_file(path))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _Refusal(f"cannot read the demand {path}: {_reason(exc, path)}") from None
    if not loads:
        raise _Refusal(f"the demand {path} names no model")
    models, histories, unknown = served_models(loads, catalog, floors)
    if unknown:
        known = textwrap.fill(
            "the catalog has: " + ", ".join(spec.name for spec in catalog.models),
            116,
            initial_indent="  ",
            subsequent_indent="    ",
            break_on_hyphens=False,
        )
        raise _Refusal(f"not in the catalog {args.catalog or 'policies/models.yaml'}: {', '.join(unknown)}\n{known}")
    return models, histories


def _options(args: argparse.Namespace) -> PlannerOptions:
    """The planner's options, its own defaults where a flag is not given."""
    from policies.colocation import PlannerOptions

    given = {
        "margin": args.margin,
        "max_replicas_per_gpu": args.max_replicas_per_gpu,
        "correlation_threshold": args.correlation_threshold,
        "time_limit_s": args.time_limit,
        "workers": args.workers,
    }
    return PlannerOptions(**{k: v for k, v in given.items() if v is not None})


# --- the report --------------------------------------------------------------------------------------------------


def _baselines(problem: Problem, plan: Plan) -> dict[str, dict[str, Any]]:
    """What the fleet would use without the planner (one replica per GPU) and with its greedy hint alone, and
    what the plan saves against each."""
    from policies.colocation import first_fit_decreasing, one_replica_per_gpu

    gpus, cost = one_replica_per_gpu(problem)
    greedy, unplaced = first_fit_decreasing(problem)
    return {
        "one_replica_per_gpu": {**_saving(gpus, cost, plan), "fits_fleet": gpus <= sum(t.count for t in problem.types)},
        "first_fit_decreasing": {
            **_saving(greedy.gpus_used(), greedy.cost_per_hour(problem), plan),
            "complete": not unplaced,
        },
    }


def _percent(saved: float, base: float) -> float:
    return round(100 * saved / base, 1) if base > 0 else 0.0


def _saving(gpus: int, cost: float, plan: Plan) -> dict[str, Any]:
    return {
        "gpus": gpus,
        "cost_per_hour": round(cost, 4),
        "gpus_saved": gpus - plan.gpus_used,
        "gpus_saved_percent": _percent(gpus - plan.gpus_used, gpus),
        "cost_saved_per_hour": round(cost - plan.cost_per_hour, 4),
        "cost_saved_percent": _percent(cost - plan.cost_per_hour, cost),
    }


def _gpu_key(replica: PlannedReplica) -> tuple[str, int]:
    return replica.node, replica.gpu


def alone_on_gpu(plan: Plan) -> set[tuple[str, int]]:
    """GPUs that hold one whole-GPU (not MIG) replica and nothing else: that replica asks for `nvidia.com/gpu`."""
    counts: dict[tuple[str, int], int] = defaultdict(int)
    mig: set[tuple[str, int]] = set()
    for r in plan.replicas:
        counts[_gpu_key(r)] += 1
        if r.mig_profile is not None:
            mig.add(_gpu_key(r))
    return {gpu for gpu, n in counts.items() if n == 1 and gpu not in mig}


def placement(replica: PlannedReplica, alone: set[tuple[str, int]]) -> str:
    """`3g.40gb@4` for a MIG slice, `whole` for a GPU of its own, `share` for a GPU share."""
    if replica.mig_profile is not None:
        return f"{replica.mig_profile}@{replica.mig_start}"
    return "whole" if _gpu_key(replica) in alone else "share"


def plan_report(
    plan: Plan,
    baselines: dict[str, dict[str, Any]],
    models: Sequence[ServedModel],
    fleet: Sequence[FleetGpu],
    options: PlannerOptions,
) -> dict[str, Any]:
    """Everything the command prints, as plain data (`plan.json`); the printout is rendered from it."""
    from dataclasses import asdict

    return {
        "method": plan.method,
        "solve_seconds": round(plan.solve_seconds, 3),
        "cost_per_hour": round(plan.cost_per_hour, 4),
        "lower_bound_per_hour": round(plan.lower_bound_per_hour, 4),
        "gap_percent": round(100 * plan.gap, 2),
        "gpus_used": plan.gpus_used,
        "fleet_gpus": len(fleet),
        "moves": plan.moves,
        "min_headroom": round(plan.min_headroom, 4),
        "notes": list(plan.notes),
        "options": asdict(options),
        "baselines": baselines,
        "gpus": _gpu_rows(plan, fleet),
        "models": _model_rows(plan, models),
    }


def _gpu_rows(plan: Plan, fleet: Sequence[FleetGpu]) -> list[dict[str, Any]]:
    price = {(g.node, g.index): g.price_per_hour for g in fleet}
    memory = {(g.node, g.index): g.memory_mib for g in fleet}
    alone = alone_on_gpu(plan)
    by_gpu: dict[tuple[str, int], list[PlannedReplica]] = defaultdict(list)
    for r in plan.replicas:
        by_gpu[_gpu_key(r)].append(r)
    rows = []
    for (node, index), replicas in sorted(by_gpu.items()):
        rows.append(
            {
                "node": node,
                "gpu": index,
                "gpu_model": replicas[0].gpu_model,
                "price_per_hour": price.get((node, index)),
                "memory_mib": memory.get((node, index)),
                "replicas": [
                    _replica_row(r, alone) for r in sorted(replicas, key=lambda r: (r.mig_start or 0, r.model))
                ],
            }
        )
    return rows


def _replica_row(r: PlannedReplica, alone: set[tuple[str, int]]) -> dict[str, Any]:
    return {
        "model": r.model,
        "placement": placement(r, alone),
        "mig_profile": r.mig_profile,
        "mig_start": r.mig_start,
        "memory_mib": r.memory_mib,
        "gpu_memory_utilization": r.memory_fraction,
        "load_percent": round(r.load_milli / 10, 1),
        "requests_per_second": round(r.requests_per_second, 3),
    }


def _model_rows(plan: Plan, models: Sequence[ServedModel]) -> list[dict[str, Any]]:
    alone = alone_on_gpu(plan)
    rows = []
    for served in sorted(models, key=lambda m: m.name):
        replicas = plan.replicas_of(served.name)
        kinds: dict[str, int] = defaultdict(int)
        for r in replicas:
            kinds[r.mig_profile or placement(r, alone)] += 1
        rows.append(
            {
                "model": served.name,
                "requests_per_second": served.requests_per_second,
                "min_replicas": served.min_replicas,
                "replicas": len(replicas),
                "carried_requests_per_second": round(sum(r.requests_per_second for r in replicas), 3),
                "memory_mib": served.spec.memory_mib,
                "placements": dict(sorted(kinds.items())),
            }
        )
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _gpus(n: int) -> str:
    return f"{n} GPU" if abs(n) == 1 else f"{n} GPUs"


def _baseline_line(label: str, b: dict[str, Any], fleet_gpus: int) -> str:
    line = (
        f"vs {label:<22} {_gpus(b['gpus']):>9}  ${b['cost_per_hour']:,.2f}/h   plan saves {_gpus(b['gpus_saved'])} "
        f"({b['gpus_saved_percent']:.1f}%), ${b['cost_saved_per_hour']:,.2f}/h ({b['cost_saved_percent']:.1f}%)"
    )
    if b.get("fits_fleet") is False:
        line += f"   [more than the fleet's {fleet_gpus}]"
    if b.get("complete") is False:
        line += "   [incomplete: some demand left unplaced]"
    return line


def render(report: dict[str, Any], top: int, out: str | None = None) -> str:
    """The printout: the plan's header, the savings against the baselines, the GPUs, then the models."""
    r = report
    lines = [
        f"method         {r['method']} in {r['solve_seconds']:.2f} s",
        f"cost           ${r['cost_per_hour']:,.2f}/h   lower bound ${r['lower_bound_per_hour']:,.2f}/h   "
        f"gap {r['gap_percent']:.1f}%",
        f"GPUs used      {r['gpus_used']} of {r['fleet_gpus']}   moves {r['moves']}   "
        f"min headroom {100 * r['min_headroom']:.1f}%",
        _baseline_line("one replica per GPU", r["baselines"]["one_replica_per_gpu"], r["fleet_gpus"]),
        _baseline_line("first-fit decreasing", r["baselines"]["first_fit_decreasing"], r["fleet_gpus"]),
        *(f"note: {n}" for n in r["notes"]),
        "",
    ]
    rows = []
    for gpu in r["gpus"][: max(0, top)]:
        for i, rep in enumerate(gpu["replicas"]):
            first = i == 0
            rows.append(
                [
                    gpu["node"] if first else "",
                    str(gpu["gpu"]) if first else "",
                    gpu["gpu_model"] if first else "",
                    rep["model"],
                    rep["placement"],
                    str(rep["memory_mib"]),
                    f"{rep['gpu_memory_utilization']:.3f}",
                    f"{rep['load_percent']:.1f}%",
                ]
            )
    header = ["node", "gpu", "gpu model", "replica", "where", "memory MiB", "mem util", "load"]
    lines += _table(header, rows, right={1, 5, 6, 7})
    hidden = len(r["gpus"]) - max(0, top)
    if hidden > 0:
        where = "plan.json lists them" if out else "--top shows more"
        lines.append(f"... {hidden} more GPU{'s' if hidden != 1 else ''} ({where})")
    lines.append("")
    model_rows = [
        [
            m["model"],
            f"{m['requests_per_second']:.2f}",
            f"{m['carried_requests_per_second']:.2f}",
            str(m["replicas"]),
            ", ".join(f"{n} {kind}" for kind, n in m["placements"].items()) or "-",
        ]
        for m in r["models"]
    ]
    lines += _table(["model", "req/s", "carried", "replicas", "where"], model_rows, right={1, 2, 3})
    return "\n".join(lines)


# --- Deployments -------------------------------------------------------------------------------------------------


def dns_name(model: str, limit: int = DNS_LABEL_MAX) -> str:
    """A DNS-1123 label for a model name: lowercase, anything but letters, digits and `-` (`/`, `.`, `_`) as `-`,
    at most `limit` characters."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", model.lower())).strip("-")
    return (name[:limit].rstrip("-")) or "model"


def _milli_request(load_milli: int) -> int:
    """A share's request: its load rounded up to a multiple of 10, at least 10 (tidy numbers, never below the
    load the plan gave it)."""
    return max(10, -(-load_milli // 10) * 10)


def shared_requests(plan: Plan) -> tuple[dict[str, int], list[str]]:
    """`gpu-extender.io/gpu-milli` per model for its GPU shares, and what to know about it.

    One pod template serves all of a model's shares, so each asks for the busiest one's planned load: no replica
    gets less compute than the plan gave it. Where the plan split a model's load unevenly, that asks more than
    the plan packed onto some GPUs; the note says so (the extender then places those replicas elsewhere)."""
    alone = alone_on_gpu(plan)
    shared = [r for r in plan.replicas if r.mig_profile is None and _gpu_key(r) not in alone]
    asks: dict[str, list[int]] = defaultdict(list)
    for r in shared:
        asks[r.model].append(_milli_request(r.load_milli))
    largest = {model: max(values) for model, values in asks.items()}
    on_gpu: dict[tuple[str, int], int] = defaultdict(int)
    for r in shared:
        on_gpu[_gpu_key(r)] += largest[r.model]
    overfilled = sorted(gpu for gpu, total in on_gpu.items() if total > MILLI_PER_GPU)
    notes = []
    if overfilled:
        uneven = ", ".join(
            f"{model} ({min(values)}..{max(values)})"
            for model, values in sorted(asks.items())
            if min(values) < max(values)
        )
        where = ", ".join(f"{node}/{gpu}" for node, gpu in overfilled[:8]) + (" ..." if len(overfilled) > 8 else "")
        notes.append(
            f"{len(overfilled)} planned GPUs ({where}) would be asked for more than {MILLI_PER_GPU} milli: a model's "
            f"shares all ask for its busiest replica's load, and the plan splits these unevenly: {uneven}"
        )
    return largest, notes


def _resource(replica: PlannedReplica, alone: set[tuple[str, int]], milli: dict[str, int]) -> tuple[str, int]:
    if replica.mig_profile is not None:
        return MIG_RESOURCE_PREFIX + replica.mig_profile, 1
    if _gpu_key(replica) in alone:
        return GPU_RESOURCE, 1
    return GPU_MILLI_RESOURCE, milli[replica.model]


def _suffix(resource: str) -> str:
    if resource == GPU_RESOURCE:
        return "gpu"
    if resource == GPU_MILLI_RESOURCE:
        return "share"
    return dns_name(resource.removeprefix(MIG_RESOURCE_PREFIX))


def deployments(
    plan: Plan, specs: Sequence[ModelSpec], namespace: str, image: str, scheduler_name: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """One Deployment per model, and notes on them. A model whose replicas need different resources (a whole GPU
    here, a MIG slice there) gets one Deployment per resource, named with a suffix: a pod template asks for one
    thing. A model with no replica (scaled to zero) gets none."""
    alone = alone_on_gpu(plan)
    milli, notes = shared_requests(plan)
    groups: dict[str, dict[tuple[str, int], list[PlannedReplica]]] = defaultdict(lambda: defaultdict(list))
    for r in plan.replicas:
        groups[r.model][_resource(r, alone, milli)].append(r)
    out = []
    taken: set[str] = set()
    for spec in sorted(specs, key=lambda s: s.name):
        by_resource = groups.get(spec.name, {})
        if not by_resource:
            notes.append(f"{spec.name}: no replica planned, so no Deployment (scale a running one to 0)")
        for (resource, quantity), replicas in sorted(by_resource.items()):
            suffix = f"-{_suffix(resource)}" if len(by_resource) > 1 else ""
            name = _unique(dns_name(spec.name, DNS_LABEL_MAX - len(suffix) - 3) + suffix, taken)
            out.append(_deployment(name, spec, replicas, (resource, quantity), namespace, image, scheduler_name))
    return out, notes


def _summary(deployment: dict[str, Any]) -> dict[str, Any]:
    """A Deployment as `plan.json` lists it: name, model, replicas and what each asks for."""
    template = deployment["spec"]["template"]
    return {
        "name": deployment["metadata"]["name"],
        "model": template["metadata"]["annotations"][ANNOTATION_MODEL],
        "replicas": deployment["spec"]["replicas"],
        "resources": template["spec"]["containers"][0]["resources"]["limits"],
    }


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _memory_utilization(replicas: Sequence[PlannedReplica], resource: str) -> tuple[str, list[dict[str, Any]]]:
    """vLLM's `--gpu-memory-utilization` and the env it needs. A whole GPU or a slice has one value for all
    replicas. A share takes the fraction the extender writes at bind: the extender, not this plan, decides which
    replicas share a GPU, and the fraction it computes from the pod's memory is the one it accounted for."""
    values = {r.memory_fraction for r in replicas}
    if resource != GPU_MILLI_RESOURCE and len(values) == 1:
        return f"{values.pop():g}", []
    env = [
        {
            "name": MEMORY_FRACTION_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{GPU_MEMORY_FRACTION}']"}},
        }
    ]
    return f"$({MEMORY_FRACTION_ENV})", env


def _deployment(
    name: str,
    spec: ModelSpec,
    replicas: Sequence[PlannedReplica],
    request: tuple[str, int],
    namespace: str,
    image: str,
    scheduler_name: str,
) -> dict[str, Any]:
    resource, quantity = request
    utilization, env = _memory_utilization(replicas, resource)
    container: dict[str, Any] = {
        "name": "vllm",
        "image": image,
        "args": [
            "--model",
            spec.name,
            "--served-model-name",
            spec.name,
            "--gpu-memory-utilization",
            utilization,
        ],
    }
    if env:
        container["env"] = env
    container["ports"] = [{"name": "http", "containerPort": 8000}]
    container["resources"] = {"limits": {resource: str(quantity)}}
    labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": dns_name(spec.name),  # all of a model's Deployments, for one Service
        "app.kubernetes.io/managed-by": "gpu-extender-plan",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": len(replicas),
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    "annotations": {
                        ANNOTATION_MODEL: spec.name,
                        ANNOTATION_GPU_MEMORY: f"{spec.memory_mib}Mi",
                        ANNOTATION_LATENCY_CLASS: spec.latency_class,
                    },
                },
                "spec": {"schedulerName": scheduler_name, "containers": [container]},
            },
        },
    }


DEPLOYMENTS_HEADER = """\
# Deployments for the plan of `gpu-extender plan`: full, minimal Deployments (not patches), one per model, or one
# per resource where a model's replicas need different ones. `kubectl apply -f deployments.yaml` creates them or
# updates those it created before. To fold the plan into Deployments of your own, copy `replicas`, the container's
# `resources`, the pod annotations and vLLM's args.
#
# The pods ask the extender (schedulerName) for a whole GPU (nvidia.com/gpu), a MIG slice (nvidia.com/mig-*) or a
# GPU share (gpu-extender.io/gpu-milli: the largest planned load of the model's shares, rounded up to 10). A shared
# replica reads vLLM's --gpu-memory-utilization from the annotation gpu-extender.io/gpu-memory-fraction that the
# extender writes when it binds the pod (the downward API): the extender decides which replicas share a GPU, so the
# fraction is its own. Pods of one model carry the label app.kubernetes.io/instance for a Service to select.
"""


def _comment(text: str) -> str:
    return "#\n" + "".join(f"# {line}\n" for line in textwrap.wrap(text, 116, break_on_hyphens=False))


def _write(out: Path, report: dict[str, Any], documents: Sequence[dict[str, Any]], notes: Sequence[str]) -> None:
    import yaml

    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(report, indent=2) + "\n")
        body = yaml.safe_dump_all(documents, sort_keys=False, width=120)
        header = DEPLOYMENTS_HEADER + "".join(_comment(f"note: {note}") for note in notes)
        (out / "deployments.yaml").write_text(header + "---\n" + body)
    except OSError as exc:
        raise _Refusal(f"cannot write to {out}: {_reason(exc, str(out))}") from None
    from scheduler.planner.plot import draw_plan

    count = f"{len(documents)} Deployment{'' if len(documents) == 1 else 's'}"
    picture = draw_plan(report, out / "plan.png")
    drawn = f" and {picture}" if picture else ""
    print(f"\nwrote {out / 'plan.json'} and {out / 'deployments.yaml'} ({count}){drawn}")
    for note in notes:
        print(f"note: {note}")
