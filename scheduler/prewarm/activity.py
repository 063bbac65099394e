"""What the pre-warmer knows of a model's traffic: its arrival history, whether requests run now, and since when
it is idle; read from a request log (a CSV that grows, as in the cold-start replay) or from vLLM's series."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from policies.forecast import ModelHistory

__all__ = ["ModelActivity", "PrometheusActivity", "RequestLogActivity", "activity_until"]


@dataclass
class ModelActivity:
    history: ModelHistory = field(default_factory=ModelHistory)
    busy: bool = False
    idle_since: float | None = None  # None while busy, or before the first request


def activity_until(requests: Iterable[tuple[float, float]], now: float) -> ModelActivity:
    """The activity of one model at `now` from its requests `(arrival, service seconds)` in arrival order: a
    request runs from its arrival for its service time; the model is idle between the end of the last request that
    ran and the next arrival (the idle times the histogram policy learns)."""
    activity = ModelActivity()
    busy_until: float | None = None
    for arrival, service in requests:
        if arrival > now:
            break
        idle_since = busy_until if busy_until is not None and busy_until <= arrival else None
        activity.history.arrive(arrival, idle_since)
        end = arrival + service
        busy_until = end if busy_until is None else max(busy_until, end)
    if busy_until is not None:
        activity.busy = busy_until > now
        activity.idle_since = None if activity.busy else busy_until
    return activity


class PrometheusActivity:
    """Each model's activity from vLLM's series: the steps of `step_s` in the last `history_s` in which it finished
    requests (`increase(vllm:request_success_total)`), each read as one request spanning its step, and whether
    requests run or wait now. Coarser than a request log (idle times in whole steps), two queries a round."""

    def __init__(self, client: Any, history_s: float = 7 * 86_400.0, step_s: float = 60.0) -> None:
        self.client = client
        self.history_s = history_s
        self.step_s = step_s

    def __call__(self, now: float) -> dict[str, ModelActivity]:
        step, span = _duration(self.step_s), _duration(self.history_s)
        done = f"(sum by (model_name) (increase(vllm:request_success_total[{step}])))[{span}:{step}]"
        active = "sum by (model_name) (vllm:num_requests_running + vllm:num_requests_waiting) > 0"
        busy_now = {s.labels.get("model_name") for s in self.client.query(active, now)}
        out: dict[str, ModelActivity] = {}
        for series in self.client.query(done, now):
            model = series.labels.get("model_name")
            if not model:
                continue
            spans = [(t - self.step_s, self.step_s) for t, count in series.samples if count > 0]
            activity = activity_until(spans, now)
            if model in busy_now:
                activity.busy, activity.idle_since = True, None
            out[model] = activity
        return out


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


class RequestLogActivity:
    """Each model's activity from a request log (`timestamp,model[,service_time]` CSV, or the genai-serving trace's
    columns), read again every round: a log that grows is followed as it grows."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, now: float) -> dict[str, ModelActivity]:
        from scheduler.simulator.coldstart_trace import read_requests

        trace = read_requests(self.path)
        return {
            model: activity_until(((r.arrival, r.service_s) for r in requests), now)
            for model, requests in trace.by_model.items()
        }
