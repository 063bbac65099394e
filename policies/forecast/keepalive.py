"""The fixed keep-alive (Knative's scale-to-zero grace, KServe's default): the baseline every policy is measured
against."""

from __future__ import annotations

from dataclasses import dataclass

from policies.forecast.base import ModelHistory, WarmPlan


@dataclass(frozen=True)
class FixedKeepAlive:
    """Keep an idle replica `keep_s` seconds after its last request ends, then let it go; never pre-warm."""

    keep_s: float = 600.0

    @property
    def name(self) -> str:
        return f"keep-alive {self.keep_s / 60:g} min"

    def plan(self, history: ModelHistory, idle_since: float, now: float, start_s: float) -> WarmPlan:
        return WarmPlan(keep_until=idle_since + self.keep_s)
