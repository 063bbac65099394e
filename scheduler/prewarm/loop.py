"""The pre-warmer: every round, for each opted-in serving Deployment, ask whether its model should be warm now
(`policies.prewarm.warm_decision` on the forecaster's plan for the model's current idle spell) and act on it.

- warm wanted: wake the replicas that sleep (vLLM sleep mode), and raise the replica floor to `floor` where the
  Deployment has fewer (from zero, usually);
- not wanted: with sleep mode, put the idle awake replicas to sleep (they keep their GPU memory and wake in
  seconds); without it, give back the floor this pre-warmer raised;
- either way, where the Deployment asks for placeholders, hold (or free) room for its next replicas with pods that
  real ones preempt (`scheduler.prewarm.placeholders`).

Every action is a metric and a log line with its reason. A round that cannot read the cluster or the traffic acts
on nothing and says why; a replica that cannot be reached is skipped. Runs outside the request path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from policies.forecast import Forecaster, WarmPlan
from policies.prewarm import WarmDecision, next_plan, warm_decision
from scheduler.periodic import Periodic
from scheduler.prewarm.activity import ModelActivity
from scheduler.prewarm.cluster import ServingDeployment, list_serving, raise_floor, release_floor
from scheduler.prewarm.placeholders import set_placeholders
from scheduler.vllm.client import VllmClient, VllmError

log = logging.getLogger("gpu_extender.prewarm")

ActivitySource = Callable[[float], Mapping[str, ModelActivity]]


class PrewarmMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.actions = Counter(
            "gpu_extender_prewarm_actions",
            "Pre-warmer actions (raise_floor, release_floor, wake, sleep, hold_room, free_room) by reason",
            ["action", "reason"],
            registry=registry,
        )
        self.warm = Gauge(
            "gpu_extender_prewarm_warm", "1 while the pre-warmer wants a model warm", ["model"], registry=registry
        )
        self.rounds = Counter(
            "gpu_extender_prewarm_rounds", "Pre-warmer rounds by outcome", ["outcome"], registry=registry
        )


@dataclass(frozen=True)
class Action:
    action: str
    deployment: str
    model: str
    reason: str


@dataclass
class PrewarmLoop:
    """`start_s`: how long a replica takes to become ready from nothing (a full load); `wake_s`: from sleep. The
    forecaster's windows open that much ahead."""

    api_client: Any
    forecaster: Forecaster
    activity: ActivitySource
    start_s: float = 25.0
    wake_s: float = 6.0
    floor: int = 1
    interval_s: float = 5.0
    namespace: str | None = None
    metrics: PrewarmMetrics | None = None
    clock: Callable[[], float] = time.time
    client_for: Callable[[str], VllmClient] = VllmClient
    # Whether this process may act now: with leader election, only the leader does (followers skip their rounds).
    active: Callable[[], bool] = lambda: True
    # Cold starts (floors raised) per round, soonest windows first, so that many models' windows opening together
    # do not start all their replicas at once (0: no limit); wakes and placeholders start nothing and are not counted.
    max_starts_per_round: int = 2
    _starts_left: int | None = None  # this round's starts still allowed (None: no limit)
    _plans: dict[str, tuple[float, WarmPlan]] = field(default_factory=dict)
    _runner: Periodic | None = None

    def start(self) -> PrewarmLoop:
        self._runner = Periodic("prewarm", self.round, self.interval_s).start()
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.stop()

    def round(self) -> list[Action]:
        """One pass over the opted-in Deployments; the actions taken."""
        if not self.active():
            self._count_round("skipped")
            return []
        now = self.clock()
        try:
            activity = self.activity(now)
            deployments = list_serving(self.api_client, self.namespace)
        except Exception as exc:  # no reading this round: act on nothing, keep going
            log.warning("pre-warm round skipped", extra={"error": f"{type(exc).__name__}: {exc}"})
            self._count_round("failed")
            return []
        decided = []
        for d in deployments:
            try:
                decided.append((d, self.decide(d, activity.get(d.model), now)))
            except Exception as exc:  # a forecaster's failure on one model must not stop the others
                log.warning("pre-warm decision failed", extra={"deployment": _name(d), "error": f"{exc!r}"})
        # Staggered: the windows that close first get this round's starts; the rest start in later rounds.
        decided.sort(key=lambda pair: (not pair[1].warm, pair[1].until if pair[1].until is not None else float("inf")))
        actions: list[Action] = []
        self._starts_left = self.max_starts_per_round or None
        for deployment, decision in decided:
            if self.metrics is not None:
                self.metrics.warm.labels(deployment.model).set(1 if decision.warm else 0)
            try:
                actions += self._act(deployment, decision)
            except Exception as exc:  # one Deployment's failure must not stop the others
                log.warning(
                    "pre-warm action failed",
                    extra={"deployment": _name(deployment), "error": f"{type(exc).__name__}: {exc}"},
                )
        self._count_round("ok")
        return actions

    def decide(self, deployment: ServingDeployment, activity: ModelActivity | None, now: float) -> WarmDecision:
        """The decision for a model now; the forecaster is asked once per idle spell, and again when its plan
        lapses."""
        model = deployment.model
        if activity is None or (not activity.busy and activity.idle_since is None):
            return warm_decision(None, False, now, self.start_s)
        if activity.busy or activity.idle_since is None:
            self._plans.pop(model, None)
            return warm_decision(None, True, now, self.start_s)
        start_s = self.wake_s if deployment.sleep_level else self.start_s
        held = self._plans.get(model)
        current = held[1] if held is not None and held[0] == activity.idle_since else None
        plan = next_plan(self.forecaster, activity.history, activity.idle_since, now, start_s, current)
        self._plans[model] = (activity.idle_since, plan)
        return warm_decision(plan, False, now, start_s)

    def _act(self, d: ServingDeployment, decision: WarmDecision) -> list[Action]:
        done: list[Action] = []
        if d.placeholders and set_placeholders(self.api_client, d, d.placeholders if decision.warm else 0):
            done.append(self._did("hold_room" if decision.warm else "free_room", d, decision))
        if decision.warm:
            if d.sleep_level:
                done += [self._did("wake", d, decision) for r in d.pods if r.url and self._wake(r.url)]
            if d.replicas < self.floor and self._starts_left is not None and self._starts_left <= 0:
                log.info("pre-warm deferred to the next round", extra={"deployment": _name(d), "model": d.model})
            elif raise_floor(self.api_client, d, self.floor):
                if self._starts_left is not None:
                    self._starts_left -= 1
                done.append(self._did("raise_floor", d, decision))
        elif d.sleep_level:
            done += [self._did("sleep", d, decision) for r in d.pods if r.ready and r.url and self._sleep(r.url, d)]
        elif release_floor(self.api_client, d, self.floor):
            done.append(self._did("release_floor", d, decision))
        return done

    def _wake(self, url: str) -> bool:
        client = self.client_for(url)
        try:
            return client.is_sleeping() and client.wake_up()
        except VllmError as exc:
            log.info("cannot wake a replica", extra={"url": url, "error": str(exc)})
            return False

    def _sleep(self, url: str, d: ServingDeployment) -> bool:
        client = self.client_for(url)
        try:
            if client.is_sleeping():
                return False
            client.sleep(level=d.sleep_level or 1)
            return True
        except VllmError as exc:
            log.info("cannot put a replica to sleep", extra={"url": url, "error": str(exc)})
            return False

    def _did(self, action: str, d: ServingDeployment, decision: WarmDecision) -> Action:
        if self.metrics is not None:
            self.metrics.actions.labels(action, decision.reason).inc()
        log.info(
            "pre-warm",
            extra={"action": action, "deployment": _name(d), "model": d.model, "reason": decision.reason},
        )
        return Action(action, _name(d), d.model, decision.reason)

    def _count_round(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.rounds.labels(outcome).inc()


def _name(d: ServingDeployment) -> str:
    return f"{d.namespace}/{d.name}"
