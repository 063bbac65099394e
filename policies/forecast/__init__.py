"""Per-model demand forecasters for pre-warming: given a model's arrivals so far, how long to keep an idle replica
warm and when to have one ready again (fixed keep-alive, the histogram policy of Serverless in the Wild, daily
seasonality). Pure: no clock, no I/O; the cold-start simulator and the pre-warmer call the same functions."""

from policies.forecast.base import Forecaster, ModelHistory, WarmPlan
from policies.forecast.costaware import CostAwarePolicy
from policies.forecast.default import SLEEP_TTL_S, default_forecaster, default_sleep_forecaster
from policies.forecast.histogram import HistogramPolicy
from policies.forecast.keepalive import FixedKeepAlive
from policies.forecast.seasonal import SeasonalPolicy

__all__ = [
    "SLEEP_TTL_S",
    "CostAwarePolicy",
    "FixedKeepAlive",
    "Forecaster",
    "HistogramPolicy",
    "ModelHistory",
    "SeasonalPolicy",
    "WarmPlan",
    "default_forecaster",
    "default_sleep_forecaster",
]
