"""Demand per served model, as `policies.model_load.ModelLoad` records: live from vLLM's series in Prometheus, or
offline from a request trace. The planner reads the same record from either, so a plan made on a trace and one made
on a running cluster differ only in their data.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import numpy as np

from policies.model_load import ModelLoad
from scheduler.promql import PrometheusClient, Series

__all__ = ["PrometheusDemandReader", "read_trace_demand"]


def _duration(seconds: float) -> str:
    """A PromQL duration: whole seconds where possible (`300s`), else milliseconds (`1500ms`)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class PrometheusDemandReader:
    """Each model's demand from the vLLM series Prometheus scraped, grouped by their `model_name` label (vLLM's
    `--served-model-name`), with seven queries whatever the number of models and servers.

    - `requests_per_second`: `sum by (model_name) (rate(vllm:request_success_total[window]))` (every finished
      request, whatever its `finished_reason`) plus the requests waiting now spread over one window,
      `vllm:num_requests_waiting / window_s`: a queue is demand the servers did not carry, and must be cleared
      within a window on top of the arrivals.
    - token rates: the same `rate` of `vllm:prompt_tokens_total` and `vllm:generation_tokens_total`.
    - `requests_waiting`: `sum by (model_name) (vllm:num_requests_waiting)`.
    - `kv_cache_usage`: the mean over a model's engines of `vllm:kv_cache_usage_perc`, or of the name vLLM used
      before 0.9, `vllm:gpu_cache_usage_perc`, where a model has only that (PromQL `or`: the new name wins).
    - `replicas_running`: the servers (`instance`s) exporting `vllm:num_requests_running` for the model, less those
      whose `vllm:engine_sleep_state{sleep_state="awake"}` is 0: a sleeping replica carries nothing.
    - `history`: `rate(vllm:request_success_total[window])` every `step_s` over the last `history_s` (a PromQL
      subquery evaluated as an instant query, which answers a matrix), on one grid of equal steps for all models
      from the first step any of them has data, 0 where a model had no series; empty when `history_s` is 0.

    A model appears as soon as any of these has a series for it (a server with no traffic yet is a demand of 0);
    a model without any is absent. `read()` raises `scheduler.promql.PrometheusError` when any query fails
    (Prometheus unreachable, slow or answering an error): half a reading is never returned.
    """

    def __init__(
        self, client: PrometheusClient, window_s: float = 300.0, history_s: float = 86_400.0, step_s: float = 300.0
    ) -> None:
        if not window_s > 0 or not step_s > 0 or not history_s >= 0:
            raise ValueError("window_s and step_s must be > 0 and history_s >= 0")
        self.client = client
        self.window_s = window_s
        self.history_s = history_s
        self.step_s = step_s

    def queries(self) -> dict[str, str]:
        """The PromQL of each part of a reading, by the `ModelLoad` field it fills."""
        window = _duration(self.window_s)

        def rate(counter: str) -> str:
            return f"sum by (model_name) (rate({counter}[{window}]))"

        awake = 'vllm:engine_sleep_state{sleep_state="awake"} == 0'
        out = {
            "requests_per_second": rate("vllm:request_success_total"),
            "prompt_tokens_per_second": rate("vllm:prompt_tokens_total"),
            "generation_tokens_per_second": rate("vllm:generation_tokens_total"),
            "requests_waiting": "sum by (model_name) (vllm:num_requests_waiting)",
            "kv_cache_usage": (
                "avg by (model_name) (vllm:kv_cache_usage_perc) or avg by (model_name) (vllm:gpu_cache_usage_perc)"
            ),
            "replicas_running": (
                "count by (model_name) (count by (model_name, instance) (vllm:num_requests_running"
                f" unless on (model_name, instance, engine) ({awake})))"
            ),
        }
        if self.history_s > 0:
            span = f"[{_duration(self.history_s)}:{_duration(self.step_s)}]"
            out["history"] = f"({rate('vllm:request_success_total')}){span}"
        return out

    def read(self, at: float | None = None) -> dict[str, ModelLoad]:
        """Every model's demand now (or at unix time `at`)."""
        results = {field: self.client.query(promql, at) for field, promql in self.queries().items()}
        latest = {field: _latest_by_model(series) for field, series in results.items() if field != "history"}
        history = _history_by_model(results.get("history", []), self.step_s)
        models = set(history).union(*latest.values())
        loads = {}
        for model in sorted(models):
            values = {field: by_model.get(model, 0.0) for field, by_model in latest.items()}
            waiting = values["requests_waiting"]
            loads[model] = ModelLoad(
                model=model,
                requests_per_second=values["requests_per_second"] + waiting / self.window_s,
                prompt_tokens_per_second=values["prompt_tokens_per_second"],
                generation_tokens_per_second=values["generation_tokens_per_second"],
                requests_waiting=waiting,
                kv_cache_usage=values["kv_cache_usage"],
                replicas_running=round(values["replicas_running"]),
                history=history.get(model, np.zeros(0)),
            )
        return loads


def _latest_by_model(series: Iterable[Series]) -> dict[str, float]:
    """model_name -> the newest finite, non-negative value (a series without the label is not a model's)."""
    out: dict[str, float] = {}
    for s in series:
        model = s.labels.get("model_name")
        if model and s.samples:
            value = s.samples[-1][1]
            if math.isfinite(value):
                out[model] = max(0.0, value)
    return out


def _history_by_model(series: Iterable[Series], step_s: float) -> dict[str, np.ndarray]:
    """model_name -> its values every `step_s` from the first timestamp any model has to the last (subquery steps
    are aligned to multiples of the step, so all models share one grid), 0 where it has none."""
    by_model: dict[str, list[tuple[float, float]]] = {}
    for s in series:
        model = s.labels.get("model_name")
        if model:
            by_model.setdefault(model, []).extend((ts, v) for ts, v in s.samples if math.isfinite(v))
    stamps = [ts for points in by_model.values() for ts, _ in points]
    if not stamps:
        return {}
    first = min(stamps)
    steps = round((max(stamps) - first) / step_s) + 1
    out = {}
    for model, points in by_model.items():
        values = np.zeros(steps)
        for ts, value in points:
            values[round((ts - first) / step_s)] += max(0.0, value)
        out[model] = values
    return out


# --- request traces ----------------------------------------------------------------------------------------------


def parse_timestamp(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC when it names no zone)."""
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"timestamp {text!r} is neither unix seconds nor an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"timestamp {text!r} is not a finite number")
    return value


def _read_arrivals(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """model -> arrival times, with every row checked; a bad row raises `ValueError` naming its line."""
    arrivals: dict[str, list[float]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        columns = {c.strip() for c in reader.fieldnames or () if c}
        missing = {"timestamp", "model"} - columns
        if missing:
            raise ValueError(f"{path}:1: the header lacks the column(s) {', '.join(sorted(missing))}")
        for row in reader:
            cells: Mapping[str, str] = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise ValueError(f"{where}: more cells than the header has columns")
            model = cells.get("model", "")
            if not model:
                raise ValueError(f"{where}: the model is empty")
            try:
                ts = parse_timestamp(cells.get("timestamp", ""))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            service = cells.get("service_time", "")
            if service:
                try:
                    seconds = float(service)
                except ValueError:
                    seconds = math.nan
                if not math.isfinite(seconds) or seconds < 0:
                    raise ValueError(f"{where}: service_time {service!r} is not a number of seconds >= 0")
            arrivals.setdefault(model, []).append(ts)
    return arrivals


def read_trace_demand(
    path: str | os.PathLike[str], step_s: float = 60.0, percentile: float = 95.0
) -> dict[str, ModelLoad]:
    """Each model's demand in a request trace: a CSV with a header naming `timestamp` (unix seconds or ISO 8601),
    `model` and optionally `service_time` (seconds, checked; the load record carries rates, a model's service time
    belongs to its catalog entry).

    Arrivals are counted per `step_s` from the trace's first to its last arrival, on one grid for all models (so
    their histories line up, a model absent from a step counting 0); `history` is each step's rate and
    `requests_per_second` its `percentile` (the plan must carry the peaks, not the mean). A malformed row raises
    `ValueError` with its line number.
    """
    if not step_s > 0:
        raise ValueError("step_s must be > 0")
    if not 0 <= percentile <= 100:
        raise ValueError("percentile must be within 0..100")
    arrivals = _read_arrivals(path)
    if not arrivals:
        return {}
    start = min(min(times) for times in arrivals.values())
    end = max(max(times) for times in arrivals.values())
    steps = int((end - start) // step_s) + 1
    loads = {}
    for model in sorted(arrivals):
        index = ((np.asarray(arrivals[model]) - start) // step_s).astype(np.int64)
        rates = np.bincount(index, minlength=steps).astype(float) / step_s
        loads[model] = ModelLoad(
            model=model, requests_per_second=float(np.percentile(rates, percentile)), history=rates
        )
    return loads
