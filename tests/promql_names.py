"""Which series a PromQL expression names, and which series really exist: what the extender, its background loops
and the node agent export (collected from their registries, so a renamed metric is caught), the recording rules,
and vLLM's series (from the project's faithful fake server). The rules and dashboard tests check one against the
other."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "manifests" / "prometheus" / "gpu-extender-rules.yaml"

# Whitespace-separated words read better here than a hundred quoted items.
FUNCTIONS = frozenset(
    """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min count_over_time
    day_of_month day_of_week day_of_year days_in_month delta deriv exp floor group_over_time histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta
    increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time
    minute month predict_linear present_over_time quantile_over_time rate resets round scalar sgn sort sort_desc
    sqrt stddev_over_time stdvar_over_time sum_over_time time timestamp vector year acos acosh asin asinh atan
    atanh cos cosh sin sinh tan tanh deg rad pi""".split()  # noqa: SIM905
)
AGGREGATIONS = frozenset("sum avg min max count stddev stdvar topk bottomk quantile count_values group".split())  # noqa: SIM905
KEYWORDS = frozenset("by without on ignoring group_left group_right and or unless bool offset inf nan atan2".split())  # noqa: SIM905

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")  # Grafana's $__rate_interval, ${datasource}
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_DURATION = re.compile(r"(?<![\w:])\d+(?:ms|s|m|h|d|w|y)\b")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


class PromQLError(ValueError):
    """An expression calls something that is no PromQL function."""


def series_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left once strings, label matchers, ranges, grouping
    clauses, numbers and Grafana variables are taken out, that are neither functions nor keywords."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("5m", text)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    text = _DURATION.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        called = text[match.end() :].lstrip().startswith("(")
        if called:
            if name not in FUNCTIONS and name not in AGGREGATIONS:
                raise PromQLError(f"{name}( is no PromQL function in {expr!r}")
        elif name not in KEYWORDS:
            names.add(name)
    return names


def _family_series(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry exposes, also of labelled metrics with no child yet."""
    names = set()
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
        else:
            names.add(family.name)
    return names


def exported_series() -> set[str]:
    """The series the extender (with its telemetry, planner and pre-warmer), the node agent and vLLM export."""
    from extender.metrics import ExtenderMetrics, ReuseCollector
    from policies.config import PlacementPolicy
    from policies.inventory import GpuDevice, NodeInventory
    from scheduler.agent.exporter import DCGM_HELP, AgentCollector, Health
    from scheduler.agent.sampler import NodeSample
    from scheduler.binder import MemoryBinder
    from scheduler.model import ClusterModel
    from scheduler.planner.loop import PlannerMetrics
    from scheduler.prewarm.loop import PrewarmMetrics
    from scheduler.service import PlacementService
    from scheduler.telemetry import TelemetryConfig, TelemetryStore
    from scheduler.vllm.fake import _Metrics as VllmMetrics
    from scheduler.watch import WatchStats

    model = ClusterModel(PlacementPolicy())
    model.replace_nodes([NodeInventory("n0", 32_000, 131_072, (GpuDevice(0, "NVIDIA-H100-80GB-HBM3", 81_920),))])
    model.mark_ready()
    metrics = ExtenderMetrics(model, watch_stats=WatchStats())
    service = PlacementService(model, MemoryBinder())
    metrics.registry.register(ReuseCollector(service.score_cache, service.evaluations))
    TelemetryStore(TelemetryConfig(url="http://prometheus.invalid"), model, registry=metrics.registry)
    PlannerMetrics(metrics.registry)
    PrewarmMetrics(metrics.registry)
    names = _family_series(metrics.registry)

    agent = CollectorRegistry()
    collector: Collector = AgentCollector(lambda: (NodeSample(0.0, 0.0, (), ()), Health(True)), "n0")
    agent.register(collector)
    names |= _family_series(agent) | set(DCGM_HELP)
    for legacy in (False, True):
        names |= _family_series(VllmMetrics("m", 4096, legacy).registry)
    return names


def recorded_series(path: Path = RULES) -> set[str]:
    """The names the recording rules define."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
