"""Demand per model: from a request trace (CSV) and from vLLM's series in Prometheus (a stub client answering the
reader's queries with the series Prometheus would return)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import orjson
import pytest

from scheduler.planner.demand import PrometheusDemandReader, read_trace_demand
from scheduler.promql import PrometheusClient, PrometheusError, Series, parse_result

# --- traces --------------------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_trace_rates_per_step_and_their_percentile(tmp_path: Path) -> None:
    # chat: 1, 3, 0, 6 arrivals in four 10 s steps; code: 2 arrivals, both in the second step.
    rows = ["timestamp,model,service_time"]
    rows += ["1000.0,chat,0.5"]
    rows += [f"{t},chat,0.4" for t in (1010, 1012, 1019.9)]
    rows += [f"{t},chat," for t in (1030, 1031, 1032, 1033, 1034, 1039)]
    rows += ["1011,code,2.0", "1015,code,1.5"]
    path = write(tmp_path, "\n".join([rows[0], *reversed(rows[1:])]) + "\n")  # rows need no order
    loads = read_trace_demand(path, step_s=10)
    assert set(loads) == {"chat", "code"}
    np.testing.assert_allclose(loads["chat"].history, [0.1, 0.3, 0.0, 0.6])
    np.testing.assert_allclose(loads["code"].history, [0.0, 0.2, 0.0, 0.0])
    assert loads["chat"].requests_per_second == pytest.approx(np.percentile([0.1, 0.3, 0.0, 0.6], 95))
    assert read_trace_demand(path, step_s=10, percentile=100)["chat"].requests_per_second == pytest.approx(0.6)
    assert read_trace_demand(path, step_s=10, percentile=50)["code"].requests_per_second == 0.0
    assert read_trace_demand(path, step_s=40)["chat"].history.tolist() == [pytest.approx(10 / 40)]


def test_trace_timestamps_may_be_iso(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model,timestamp\n"
        "m,2024-05-01T00:00:00Z\n"
        "m,2024-05-01T00:00:30\n"  # no zone: UTC
        "m,2024-05-01T02:01:00+02:00\n"  # 00:01:00 UTC
        "m,1714521690\n",  # 00:01:30 UTC, unix seconds in the same file
    )
    (load,) = read_trace_demand(path, step_s=60).values()
    np.testing.assert_allclose(load.history, [2 / 60, 2 / 60])


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("timestamp,model\n1,a\nnoon,a\n", 3, "neither unix seconds nor an ISO 8601 time"),
        ("timestamp,model\n1,a\n2,\n", 3, "the model is empty"),
        ("timestamp,model\n1,a\n\n2,a,extra\n", 4, "more cells than the header"),
        ("timestamp,model,service_time\n1,a,0.2\n2,a,-1\n", 3, "service_time '-1'"),
        ("timestamp,model,service_time\n1,a,slow\n", 2, "service_time 'slow'"),
        ("timestamp,model\nnan,a\n", 2, "not a finite number"),
        ("time,model\n1,a\n", 1, "lacks the column(s) timestamp"),
        ("", 1, "lacks the column(s) model, timestamp"),
    ],
)
def test_malformed_traces_name_the_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as caught:
        read_trace_demand(path)
    assert f"trace.csv:{line}: " in str(caught.value) and what in str(caught.value)


def test_a_trace_without_rows_has_no_demand(tmp_path: Path) -> None:
    assert read_trace_demand(write(tmp_path, "timestamp,model,service_time\n")) == {}
    with pytest.raises(ValueError):
        read_trace_demand(write(tmp_path, "timestamp,model\n1,a\n"), percentile=101)


# --- Prometheus ----------------------------------------------------------------------------------------------------


class StubPrometheus(PrometheusClient):
    """Answers each query the reader sends with the series given for its field (matched on the exact PromQL)."""

    def __init__(self, answers: Mapping[str, list[Series]], reader_queries: Mapping[str, str]) -> None:
        super().__init__("http://prometheus.invalid")
        self.by_promql = {reader_queries[field]: series for field, series in answers.items()}
        self.asked: list[tuple[str, float | None]] = []

    def query(self, promql: str, at: float | None = None) -> list[Series]:
        self.asked.append((promql, at))
        return self.by_promql.get(promql, [])


def vector(**values: float) -> list[Series]:
    return [Series({"model_name": model}, ((1000.0, value),)) for model, value in values.items()]


def reader_with(answers: Mapping[str, list[Series]], **kw: float) -> tuple[PrometheusDemandReader, StubPrometheus]:
    reader = PrometheusDemandReader(PrometheusClient("http://unused"), **kw)
    stub = StubPrometheus(answers, reader.queries())
    reader.client = stub
    return reader, stub


def test_the_queries_group_vllm_series_by_model() -> None:
    queries = PrometheusDemandReader(PrometheusClient("http://unused"), window_s=120).queries()
    assert queries["requests_per_second"] == "sum by (model_name) (rate(vllm:request_success_total[120s]))"
    assert queries["prompt_tokens_per_second"] == "sum by (model_name) (rate(vllm:prompt_tokens_total[120s]))"
    assert "rate(vllm:generation_tokens_total[120s])" in queries["generation_tokens_per_second"]
    assert queries["requests_waiting"] == "sum by (model_name) (vllm:num_requests_waiting)"
    assert queries["kv_cache_usage"] == (
        "avg by (model_name) (vllm:kv_cache_usage_perc) or avg by (model_name) (vllm:gpu_cache_usage_perc)"
    )
    assert "count by (model_name, instance) (vllm:num_requests_running" in queries["replicas_running"]
    assert 'vllm:engine_sleep_state{sleep_state="awake"} == 0' in queries["replicas_running"]
    assert queries["history"] == "(sum by (model_name) (rate(vllm:request_success_total[120s])))[86400s:300s]"
    fractional = PrometheusDemandReader(PrometheusClient("http://unused"), window_s=1.5, history_s=0).queries()
    assert "[1500ms]" in fractional["requests_per_second"] and "history" not in fractional


def test_read_builds_one_load_per_model_from_a_few_queries() -> None:
    history = [
        Series({"model_name": "chat"}, ((600.0, 2.0), (900.0, 3.0), (1200.0, 4.0))),
        Series({"model_name": "code"}, ((300.0, 1.0), (1200.0, 1.5))),  # no series at 600 and 900
    ]
    reader, stub = reader_with(
        {
            "requests_per_second": vector(chat=4.0, code=1.5),
            "prompt_tokens_per_second": vector(chat=400.0, code=900.0),
            "generation_tokens_per_second": vector(chat=80.0),
            "requests_waiting": vector(chat=60.0, code=0.0),
            "kv_cache_usage": vector(chat=0.7, code=0.2),
            "replicas_running": vector(chat=3, code=1, idle=1),
            "history": history,
        },
        window_s=300,
    )
    loads = reader.read(at=1234.5)
    assert len(stub.asked) == 7 and all(at == 1234.5 for _, at in stub.asked)
    assert set(loads) == {"chat", "code", "idle"}
    chat, code, idle = loads["chat"], loads["code"], loads["idle"]
    assert chat.requests_per_second == pytest.approx(4.0 + 60.0 / 300)  # the queue, cleared within a window
    assert (chat.prompt_tokens_per_second, chat.generation_tokens_per_second) == (400.0, 80.0)
    assert (chat.requests_waiting, chat.kv_cache_usage, chat.replicas_running) == (60.0, 0.7, 3)
    assert code.requests_per_second == 1.5 and code.generation_tokens_per_second == 0.0
    np.testing.assert_allclose(chat.history, [0.0, 2.0, 3.0, 4.0])  # one grid of 300 s steps from 300 to 1200
    np.testing.assert_allclose(code.history, [1.0, 0.0, 0.0, 1.5])
    assert idle.requests_per_second == 0.0 and idle.replicas_running == 1 and len(idle.history) == 0


def test_series_without_a_model_and_models_without_series_are_left_out() -> None:
    reader, _ = reader_with(
        {
            "requests_per_second": [Series({}, ((1.0, 9.0),)), *vector(a=1.0)],
            "requests_waiting": [Series({"model_name": ""}, ((1.0, 5.0),))],
        }
    )
    loads = reader.read()
    assert set(loads) == {"a"} and loads["a"].requests_per_second == 1.0 and loads["a"].history.size == 0


def test_the_history_subquery_answers_a_matrix_that_parse_result_reads() -> None:
    """Prometheus answers an instant query of `(expr)[range:step]` with a matrix, as for a range selector."""
    body = orjson.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "matrix",
                "result": [
                    {"metric": {"model_name": "m"}, "values": [[600, "1.5"], [900, "NaN"], [1200, "2.5"]]},
                ],
            },
        }
    )
    (series,) = parse_result(body)
    reader, _ = reader_with({"requests_per_second": vector(m=2.5), "history": [series]}, step_s=300)
    np.testing.assert_allclose(reader.read()["m"].history, [1.5, 0.0, 2.5])


def test_a_failing_query_fails_the_whole_read() -> None:
    class Down(PrometheusClient):
        def query(self, promql: str, at: float | None = None) -> list[Series]:
            raise PrometheusError("URLError: connection refused")

    with pytest.raises(PrometheusError, match="refused"):
        PrometheusDemandReader(Down("http://unused")).read()
    with pytest.raises(ValueError):
        PrometheusDemandReader(Down("http://unused"), window_s=0)
