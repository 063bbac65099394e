"""The Prometheus rules: valid for promtool, their unit tests pass, every rule is tested, every series they read
exists, and the latency alert follows kube-scheduler's timeout for the extender."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.promql_names import REPO, RULES, PromQLError, exported_series, recorded_series, series_names

RULES_TEST = RULES.with_name("gpu-extender-rules_test.yaml")
SCHEDULER_CONFIG = REPO / "manifests" / "base" / "kube-scheduler-config.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package; e2e/setup.sh installs it)"
)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent)


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_is_unit_tested() -> None:
    """Each recording rule is queried by a unit test, and each alert is seen both firing and held back."""
    document = yaml.safe_load(RULES_TEST.read_text())
    assert document["rule_files"] == [RULES.name]
    tests = document["tests"]
    queried = " ".join(t["expr"] for case in tests for t in case.get("promql_expr_test", []))
    alert_tests = [t for case in tests for t in case.get("alert_rule_test", [])]
    for rule in rules():
        if "record" in rule:
            assert re.search(rf"(?<![\w:]){re.escape(rule['record'])}(?![\w:])", queried), rule["record"]
        else:
            outcomes = {bool(t["exp_alerts"]) for t in alert_tests if t["alertname"] == rule["alert"]}
            assert outcomes == {True, False}, rule["alert"]


def test_every_series_the_rules_read_exists() -> None:
    known = exported_series() | recorded_series()
    for rule in rules():
        names = series_names(rule["expr"])
        assert names, rule
        assert names <= known, (rule.get("record") or rule.get("alert"), names - known)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2)]


def test_latency_alert_is_half_of_the_schedulers_timeout_and_a_bucket_bound() -> None:
    """kube-scheduler fails a pod's attempt when the extender takes longer than httpTimeout: the alert fires at
    half of it, on a bucket bound of the latency histogram so the quantile is not an interpolation artefact."""
    from extender.metrics import LATENCY_BUCKETS

    (extender,) = yaml.safe_load(SCHEDULER_CONFIG.read_text())["extenders"]
    timeout = _seconds(extender["httpTimeout"])
    (alert,) = [r for r in rules() if r.get("alert") == "GpuExtenderLatencyNearTimeout"]
    threshold = float(re.search(r">\s*([\d.]+)\s*$", alert["expr"]).group(1))  # type: ignore[union-attr]
    assert threshold == timeout / 2
    assert threshold in LATENCY_BUCKETS and timeout in LATENCY_BUCKETS
    assert f"{timeout:g} s" in alert["annotations"]["description"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (gpu_type) (rate(a_total{state=~"x|y"}[5m])) / on (gpu_type) b', {"a_total", "b"}),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval])))", {"h_bucket"}),
        ("1e6 * x:y:rate5m / (z > 0) and on () vllm:t offset 1h", {"x:y:rate5m", "z", "vllm:t"}),
        ('label_replace(m, "model", "$1", "model_name", "(.+)")', {"m"}),
        ("time() - ts > 120", {"ts"}),
        ('{__name__="x"} + y', {"y"}),
    ],
)
def test_series_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert series_names(expr) == names


def test_an_unknown_function_is_an_error() -> None:
    with pytest.raises(PromQLError, match="rates"):
        series_names("rates(x[5m])")
