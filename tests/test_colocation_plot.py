"""`plan.png`: drawn beside plan.json when matplotlib is there; the plan command works the same without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import scheduler.planner.plot as plot
from extender.cli import main
from scheduler.planner.plot import _bars, _title, draw_plan
from tests.test_plan_cli import FAST, LLAMA, QWEN, SMALL, _demand, fleet  # noqa: F401 (fleet is a fixture)

PNG = b"\x89PNG\r\n\x1a\n"


def _plan(tmp_path: Path, fleet_path: Path, *extra: str) -> Path:
    demand = _demand(tmp_path, {SMALL: 20, QWEN: 6, LLAMA: 3})
    out = tmp_path / "out"
    assert main(["plan", "--fleet", str(fleet_path), "--demand", str(demand), "--out", str(out), *extra, *FAST]) == 0
    return out


def test_the_plan_command_draws_its_gpus(tmp_path: Path, fleet: Path, capsys) -> None:  # noqa: F811
    pytest.importorskip("matplotlib")
    out = _plan(tmp_path, fleet)
    assert (out / "plan.png").read_bytes().startswith(PNG)
    assert "plan.png" in capsys.readouterr().out
    report = json.loads((out / "plan.json").read_text())
    bars = _bars(report)
    assert len(bars) == report["gpus_used"]  # no MIG here: one bar per used GPU
    assert all(capacity == 81559 for _, _, capacity in bars)
    title = _title(report, len(bars), len(bars))
    assert f"{report['gpus_used']} GPUs used vs {report['baselines']['one_replica_per_gpu']['gpus']}" in title
    assert f"{report['gap_percent']:.1f}%" in title


def test_mig_slices_get_a_bar_each(tmp_path: Path, fleet: Path) -> None:  # noqa: F811
    out = _plan(tmp_path, fleet, "--allow-mig")
    report = json.loads((out / "plan.json").read_text())
    slices = sum(1 for gpu in report["gpus"] for r in gpu["replicas"] if r["mig_profile"])
    shared = sum(1 for gpu in report["gpus"] if any(r["mig_profile"] is None for r in gpu["replicas"]))
    bars = _bars(report)
    assert len(bars) == slices + shared
    for label, replicas, capacity in bars:
        if "@" in label:  # a slice: its memory is its memory slices' share of the GPU's
            assert capacity < 81559 and replicas[0]["memory_mib"] <= capacity


def test_without_matplotlib_the_plan_is_still_written(tmp_path: Path, fleet: Path, monkeypatch, capsys) -> None:  # noqa: F811
    monkeypatch.setattr(plot, "pyplot", lambda what: None)
    out = _plan(tmp_path, fleet)
    assert (out / "plan.json").exists() and (out / "deployments.yaml").exists()
    assert not (out / "plan.png").exists()
    assert "plan.png" not in capsys.readouterr().out


def test_an_empty_plan_draws_nothing(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert draw_plan({"gpus": []}, tmp_path / "plan.png") is None
