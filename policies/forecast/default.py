"""The forecasters the pre-warmer uses unless told otherwise, as chosen on the first 14 days of the genai-serving
request trace by `gpu-extender simulate --cold-starts` (the same choice with one replica per model and fixed loads,
and with one request per replica and drawn loads): the fewest cold starts at no more GPU-hours than a 10-minute
keep-alive; with vLLM sleep mode, the least added wait among those with 80 % fewer full loads at no more than
1.1× its GPU-hours."""

from __future__ import annotations

from policies.forecast.costaware import CostAwarePolicy
from policies.forecast.seasonal import SeasonalPolicy

SLEEP_TTL_S = 24 * 3600.0  # with sleep mode, a replica asleep this long unloads


def default_forecaster() -> SeasonalPolicy:
    return SeasonalPolicy(bin_s=1800.0, threshold=0.9)


def default_sleep_forecaster() -> CostAwarePolicy:
    """With sleep mode a start is a wake of seconds, which the cost-aware policy prices as such."""
    return CostAwarePolicy(cold_cost_s=1200.0)
