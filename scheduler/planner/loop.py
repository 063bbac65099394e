"""The co-location planner inside the extender: re-plan every interval, in the background, never per request.

Each round reads the fleet (the GPUs no other pod holds, on the nodes `node_selector` picks) and the serving
replicas that run now from the cluster model, the demand per model
(vLLM's series in Prometheus, or a demand file re-read every round), solves with the same planner `gpu-extender
plan` uses, and publishes the plan three ways: its slots in the model view (serving pods score their model's open
slots highest, `policies.scoring.plan_score`), a ConfigMap a person or a tool can read, and metrics. A round
that fails (Prometheus down, a catalog without the model, an infeasible fleet) keeps the last plan and says why:
the scheduler never waits on the planner.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from policies.catalog import ModelCatalog
from policies.colocation import CurrentReplica, Plan, PlanError, PlannedReplica, PlannerOptions, solve
from policies.colocation.baselines import one_replica_per_gpu
from policies.colocation.problem import build_problem
from policies.inventory import Assignment
from policies.model_load import ModelLoad
from policies.plan_targets import PlannedSlot, PlanTargets
from scheduler.model import ClusterModel
from scheduler.periodic import Periodic
from scheduler.planner.fleet import fleet_gpus
from scheduler.planner.served import served_models

log = logging.getLogger("gpu_extender.planner")

# Each model's demand by the name it is served under, and replica floors a person set (by any name of a model).
_Replica = TypeVar("_Replica", CurrentReplica, PlannedReplica)
DemandSource = Callable[[], tuple[Mapping[str, ModelLoad], Mapping[str, int]]]
PlanPublisher = Callable[[dict[str, Any]], None]


class PlannerMetrics:
    """What the planner did and how good its answer is, next to the extender's own metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds = Counter(
            "gpu_extender_plan_rounds",
            "Planning rounds by outcome (planned, failed, skipped)",
            ["outcome"],
            registry=registry,
        )
        self.gpus = Gauge(
            "gpu_extender_plan_gpus",
            "GPUs serving replicas: as planned, as used now, and with one replica per GPU",
            ["kind"],
            registry=registry,
        )
        self.gap = Gauge("gpu_extender_plan_gap", "1 - proven lower bound / plan cost", registry=registry)
        self.solve_seconds = Gauge("gpu_extender_plan_solve_seconds", "Time the last plan took", registry=registry)
        self.cost = Gauge("gpu_extender_plan_cost_per_hour", "The plan's GPU cost per hour", registry=registry)
        self.replicas = Gauge("gpu_extender_plan_replicas", "Planned replicas per model", ["model"], registry=registry)
        self.moves = Gauge(
            "gpu_extender_plan_moves", "Running replicas the last plan stops or moves", registry=registry
        )


@dataclass
class PlannerLoop:
    """Plans every `interval_s` on its own thread; `plan_once` is one round (tests call it directly)."""

    model: ClusterModel
    catalog: ModelCatalog
    demand: DemandSource
    options: PlannerOptions = field(default_factory=PlannerOptions)
    prices: Mapping[str, float] = field(default_factory=dict)
    allow_mig: bool = False
    interval_s: float = 60.0
    node_selector: Mapping[str, str] = field(default_factory=dict)  # plan only the nodes with all these labels
    publish: PlanPublisher | None = None
    metrics: PlannerMetrics | None = None
    # Whether this process may plan now: with leader election, only the leader does (followers skip their rounds).
    active: Callable[[], bool] = lambda: True
    last_plan: Plan | None = None
    last_error: str | None = None
    _version: int = 0
    _runner: Periodic | None = None

    def start(self) -> PlannerLoop:
        self._runner = Periodic("planner", self.plan_once, self.interval_s).start()
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.stop()

    def plan_once(self) -> Plan | None:
        """One round: the new plan, published, or None (the last plan stays) with the reason in `last_error`."""
        if not self.model.ready or not self.active():
            self._count("skipped")
            return None
        try:
            plan, report = self._plan()
        except Exception as exc:  # a failed round must not end the loop: the last plan stays in force
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("planning round failed; the last plan stays", extra={"error": self.last_error})
            self._count("failed")
            return None
        self._version += 1
        replicas = self.model.assignments().values()
        slots = [PlannedSlot(r.model, r.node, r.gpu) for r in plan.replicas]
        self.model.set_plan(PlanTargets.of(slots, self._version))
        self.last_plan, self.last_error = plan, None
        report["version"] = self._version
        self._observe(plan, report, replicas)
        if self.publish is not None:
            try:
                self.publish(report)
            except Exception as exc:  # the plan is in force in this process even if it cannot be shown
                log.warning("cannot publish the plan", extra={"error": f"{type(exc).__name__}: {exc}"})
        log.info(
            "planned",
            extra={
                "version": self._version,
                "gpus": plan.gpus_used,
                "replicas": len(plan.replicas),
                "gap": round(plan.gap, 4),
                "seconds": round(plan.solve_seconds, 3),
                "method": plan.method,
            },
        )
        return plan

    def _plan(self) -> tuple[Plan, dict[str, Any]]:
        loads, floors = self.demand()
        models, histories, unknown = served_models(loads, self.catalog, floors)
        if unknown:
            log.warning("demand for models the catalog does not know is not planned", extra={"models": unknown})
        if not models:
            raise PlanError("no demand for any model of the catalog")
        held = self.model.assignments().values()
        nodes = [n for n in self.model.snapshot().inventories if _selected(n.labels, self.node_selector)]
        taken = {_gpu_of(a) for a in held if a.model is None and (a.gpus or a.mig is not None)}
        fleet = [g for g in fleet_gpus(nodes, self.prices, self.allow_mig) if (g.node, g.index) not in taken]
        problem = build_problem(models, fleet, self.options, histories)
        current = current_replicas(held, self.catalog)
        plan = solve(problem, [*current, *_not_yet_running(self.last_plan, current)])
        one_per_gpu, _ = one_replica_per_gpu(problem)
        moves = len(_unmatched(current, plan.replicas))  # running replicas the plan stops or moves
        return plan, plan_document(plan, one_per_gpu, unknown, moves)

    def _observe(self, plan: Plan, report: dict[str, Any], running: Any) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        self._count("planned")
        m.gpus.labels("planned").set(plan.gpus_used)
        m.gpus.labels("one_per_gpu").set(report["one_replica_per_gpu"])
        m.gpus.labels("used").set(len({_gpu_of(a) for a in running if a.model}))
        m.gap.set(plan.gap)
        m.solve_seconds.set(plan.solve_seconds)
        m.cost.set(plan.cost_per_hour)
        m.moves.set(report["moves"])
        m.replicas.clear()
        for model, count in report["replicas_per_model"].items():
            m.replicas.labels(model).set(count)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.rounds.labels(outcome).inc()


def _selected(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _gpu_of(a: Assignment) -> tuple[str, int]:
    return a.node, a.mig.gpu if a.mig is not None else (a.gpus[0] if a.gpus else -1)


def current_replicas(assignments: Any, catalog: ModelCatalog) -> list[CurrentReplica]:
    """The serving replicas that hold GPUs now, under their catalog names (a pod may name an alias)."""
    out = []
    for a in assignments:
        spec = catalog.model(a.model) if a.model else None
        if spec is None or (not a.gpus and a.mig is None):
            continue
        _, gpu = _gpu_of(a)
        out.append(CurrentReplica(spec.name, a.node, gpu, a.mig.profile if a.mig is not None else None))
    return out


def _slot(r: CurrentReplica | PlannedReplica) -> tuple[str, str, int]:
    return r.model, r.node, r.gpu


def _unmatched(replicas: Sequence[_Replica], others: Sequence[CurrentReplica | PlannedReplica]) -> list[_Replica]:
    """The replicas of `replicas` that no replica of `others` on the same slot matches, one for one."""
    left = Tally(map(_slot, others))
    out = []
    for r in replicas:
        if left[_slot(r)]:
            left[_slot(r)] -= 1
        else:
            out.append(r)
    return out


def _not_yet_running(plan: Plan | None, running: list[CurrentReplica]) -> list[CurrentReplica]:
    """The last plan's replicas that no running replica fills yet: pods may be on their way to them, so the next
    plan keeps them where it can (a plan that moves its slots every round would send scale-ups to stale ones)."""
    if plan is None:
        return []
    return [CurrentReplica(r.model, r.node, r.gpu, r.mig_profile) for r in _unmatched(plan.replicas, running)]


def plan_document(plan: Plan, one_per_gpu: int, unknown: list[str], moves: int) -> dict[str, Any]:
    """The plan as the ConfigMap shows it: totals, quality, and every replica's slot."""
    per_model: dict[str, int] = {}
    for r in plan.replicas:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": plan.method,
        "gpus": plan.gpus_used,
        "one_replica_per_gpu": one_per_gpu,
        "cost_per_hour": round(plan.cost_per_hour, 4),
        "lower_bound_per_hour": round(plan.lower_bound_per_hour, 4),
        "gap": round(plan.gap, 4),
        "solve_seconds": round(plan.solve_seconds, 3),
        "moves": moves,
        "min_headroom": round(plan.min_headroom, 4),
        "notes": list(plan.notes),
        "not_in_catalog": unknown,
        "replicas_per_model": per_model,
        "replicas": [
            {
                "model": r.model,
                "node": r.node,
                "gpu": r.gpu,
                "mig": None if r.mig_profile is None else {"profile": r.mig_profile, "start": r.mig_start},
                "memory_fraction": round(r.memory_fraction, 4),
                "load": round(r.load_milli / 1000, 3),
            }
            for r in plan.replicas
        ],
    }


PLAN_CONFIGMAP = "gpu-extender-plan"


def configmap_publisher(api_client: Any, namespace: str, name: str = PLAN_CONFIGMAP) -> PlanPublisher:
    """Write each plan into a ConfigMap (`plan.json`), created on first use and replaced after."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)

    def publish(report: dict[str, Any]) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name, labels={"app.kubernetes.io/name": "gpu-extender"}),
            data={"plan.json": json.dumps(report, indent=1, sort_keys=True)},
        )
        try:
            core.replace_namespaced_config_map(name, namespace, body, _request_timeout=10)
        except ApiException as exc:
            if exc.status != 404:
                raise
            core.create_namespaced_config_map(namespace, body, _request_timeout=10)

    return publish
