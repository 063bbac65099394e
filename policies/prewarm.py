"""Whether a model should have a warm replica now: the pre-warmer's decision, from its forecaster's plan.

A forecaster (`policies.forecast`) answers once per idle spell of a model: keep the idle replica until some time,
then have one ready again for a window. A replica takes `start_s` to be ready (a full load, or a wake from sleep),
so a window that opens at `prewarm_at` asks for a start at `prewarm_at - start_s`. The cold-start simulator
replays the same plans; the live pre-warmer calls `warm_decision` every round with the plan it got when the model
went idle, and asks again when that plan lapses.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.forecast import Forecaster, ModelHistory, WarmPlan

__all__ = ["WarmDecision", "lapsed", "next_plan", "warm_decision"]


@dataclass(frozen=True)
class WarmDecision:
    """`warm`: the model should have a replica ready (or starting) now; `reason` says why, for logs and metrics;
    `until`: when this decision may next change (None: not before the model's state changes)."""

    warm: bool
    reason: str
    until: float | None = None


def warm_decision(plan: WarmPlan | None, busy: bool, now: float, start_s: float) -> WarmDecision:
    """Busy models are warm (their autoscaler sizes them); idle ones follow their plan."""
    if busy:
        return WarmDecision(True, "serving")
    if plan is None:
        return WarmDecision(False, "no plan")
    if now < plan.keep_until:
        return WarmDecision(True, "keep-alive", plan.keep_until)
    if plan.prewarm_at is not None and plan.prewarm_until is not None:
        start = plan.prewarm_at - start_s
        if now < start:
            return WarmDecision(False, "idle until the forecast window", start)
        if now < plan.prewarm_until:
            return WarmDecision(True, "forecast window", plan.prewarm_until)
    return WarmDecision(False, "idle")


def lapsed(plan: WarmPlan, now: float) -> bool:
    """The plan has nothing left to say: its keep-alive and any window are over."""
    end = plan.prewarm_until if plan.prewarm_until is not None else plan.keep_until
    return now >= max(end, plan.keep_until)


def next_plan(
    forecaster: Forecaster,
    history: ModelHistory,
    idle_since: float,
    now: float,
    start_s: float,
    current: WarmPlan | None,
) -> WarmPlan:
    """The plan in force: `current` while it has something to say, else the forecaster's answer now (the first
    ask of an idle spell is at `idle_since`; a window that lapsed unused is asked about again)."""
    if current is not None and not lapsed(current, now):
        return current
    return forecaster.plan(history, idle_since, max(now, idle_since) if current is not None else idle_since, start_s)
