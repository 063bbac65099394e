"""Reading what the cold-start replay needs: per-model request arrivals from a CSV, and measured load times.

The request CSV is generic: a header naming `timestamp` (unix seconds or ISO 8601, UTC unless it says), `model`
and optionally `service_time` (seconds). Other layouts map their columns onto these names; the genai-serving
request trace (`gmt_create`, `checkpoint_model_version_id`, `exec_time_seconds`) is recognised by its header.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from scheduler.agent.traces import load_trace
from scheduler.datasets import shared_data
from scheduler.planner.demand import parse_timestamp
from scheduler.simulator.coldstart import Request

GENAI_COLUMNS = {"timestamp": "gmt_create", "model": "checkpoint_model_version_id", "service_time": "exec_time_seconds"}
LOAD_LATENCY_CSV = "genai-serving/basemodel_update_latency_anon.csv"


@dataclass(frozen=True)
class RequestTrace:
    """Requests per model, each list ascending by arrival; `unnamed`: rows without a model, left out."""

    by_model: dict[str, list[Request]]
    unnamed: int

    @property
    def first(self) -> float:
        return min(rs[0].arrival for rs in self.by_model.values())

    @property
    def last(self) -> float:
        return max(rs[-1].arrival for rs in self.by_model.values())

    @property
    def requests(self) -> int:
        return sum(len(rs) for rs in self.by_model.values())


def parse_columns(text: str) -> dict[str, str]:
    """`timestamp=gmt_create,model=...` -> {"timestamp": "gmt_create", ...}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or ours not in ("timestamp", "model", "service_time") or not theirs:
            raise ValueError(f"column mapping {part!r}: expected timestamp=, model= or service_time=COLUMN")
        out[ours] = theirs
    return out


def read_requests(path: str | os.PathLike[str], columns: Mapping[str, str] | None = None) -> RequestTrace:
    """Requests per model from a CSV; a malformed row raises `ValueError` naming its line."""
    by_model: dict[str, list[Request]] = {}
    unnamed = 0
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [c.strip() for c in reader.fieldnames or () if c]
        if columns is None:
            columns = GENAI_COLUMNS if set(GENAI_COLUMNS.values()) <= set(header) else {}
        names = {ours: columns.get(ours, ours) for ours in ("timestamp", "model", "service_time")}
        missing = [names[c] for c in ("timestamp", "model") if names[c] not in header]
        if missing:
            raise ValueError(f"{path}:1: the header lacks the column(s) {', '.join(missing)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            model = (row.get(names["model"]) or "").strip()
            try:
                at = parse_timestamp((row.get(names["timestamp"]) or "").strip())
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            text = (row.get(names["service_time"]) or "").strip()
            service = _seconds(text, where) if text else 0.0
            if not model:
                unnamed += 1
                continue
            by_model.setdefault(model, []).append(Request(at, service))
    for requests in by_model.values():
        requests.sort(key=lambda r: r.arrival)
    if not by_model:
        raise ValueError(f"{path}: no request names a model")
    return RequestTrace(by_model, unnamed)


def _seconds(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: service_time {text!r} is not a number of seconds >= 0")
    return value


def read_load_times(path: str | os.PathLike[str] | None = None) -> tuple[float, ...]:
    """Measured full-load durations in seconds (the genai-serving base-model loads, recorded in milliseconds)."""
    source = Path(path) if path else shared_data() / LOAD_LATENCY_CSV
    return tuple(v / 1000.0 for series in load_trace(source) for v in series.values)


def window(trace: RequestTrace, start: float, end: float) -> dict[str, list[Request]]:
    """The requests arriving in [start, end), per model (models without one left out)."""
    out = {}
    for model, requests in trace.by_model.items():
        kept = [r for r in requests if start <= r.arrival < end]
        if kept:
            out[model] = kept
    return out
