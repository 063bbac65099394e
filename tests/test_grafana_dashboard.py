"""The Grafana dashboard: a minimal schema Grafana imports, and queries that name only series that exist (the
extender's, its loops', the node agent's, vLLM's or a recording rule's), with every recording rule on a panel."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promql_names import REPO, exported_series, recorded_series, series_names

DASHBOARD = REPO / "manifests" / "grafana" / "gpu-extender-dashboard.json"
GRID_WIDTH = 24
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "gauge", "table", "text"}
GRAFANA_VARIABLES = {"__rate_interval", "__range", "__interval", "__all"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows too."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query a panel or a template variable runs."""
    found = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            assert match, variable["name"]
            found.append((f"${variable['name']}", match.group(1)))
    return found


def test_the_dashboard_has_the_shape_grafana_imports(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), "panel ids must be unique integers"
    for panel in panels(dashboard):
        assert panel["type"] in PANEL_TYPES and panel["title"], panel
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= grid.keys() and grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        targets = panel["targets"]
        assert targets and all(isinstance(t["expr"], str) and t["expr"].strip() for t in targets), panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]


def test_datasource_and_every_variable_used_are_defined(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    used = set()
    for _, expr in queries(dashboard):
        used |= set(re.findall(r"\$\{?(\w+)", expr))
    assert used - GRAFANA_VARIABLES <= variables.keys()
    assert {"gpu_type", "pool"} <= used


def test_every_query_names_series_that_exist(dashboard: dict[str, Any]) -> None:
    known = exported_series() | recorded_series()
    for title, expr in queries(dashboard):
        names = series_names(expr)
        assert names, (title, expr)
        assert names <= known, (title, sorted(names - known))


def test_every_recording_rule_and_topic_has_a_panel(dashboard: dict[str, Any]) -> None:
    """The dashboard shows what the rules compute: waste, cost, fragmentation, decisions, telemetry, the plan."""
    named = set().union(*(series_names(expr) for _, expr in queries(dashboard)))
    assert recorded_series() <= named, sorted(recorded_series() - named)
    for series in (
        "gpu_extender_request_duration_seconds_bucket",
        "gpu_extender_decisions_total",
        "gpu_extender_telemetry_last_success_timestamp_seconds",
        "gpu_extender_plan_gpus",
        "gpu_extender_borrowed_gpu_seconds_total",
    ):
        assert series in named, series
    rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    assert rows == {"Waste", "Cost", "Fragmentation", "Decisions", "Telemetry", "Plan"}


def test_latency_panel_marks_the_alert_threshold(dashboard: dict[str, Any]) -> None:
    """The line drawn on the latency panel is where the alert fires."""
    from tests.test_prometheus_rules import rules

    (alert,) = [r for r in rules() if r.get("alert") == "GpuExtenderLatencyNearTimeout"]
    threshold = float(re.search(r">\s*([\d.]+)\s*$", alert["expr"]).group(1))  # type: ignore[union-attr]
    (panel,) = [p for p in panels(dashboard) if p["title"].startswith("Latency by verb")]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps if s["color"] == "red"] == [threshold]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian's prometheus package)")
def test_every_query_parses_in_prometheus(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables replaced by what Grafana would put there)."""
    values = {"__rate_interval": "2m", "__range": "6h", "__interval": "1m", "gpu_type": ".*", "pool": ".*"}
    rules = []
    for i, (title, expr) in enumerate(queries(dashboard)):
        concrete = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete, "labels": {"panel": title}})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
