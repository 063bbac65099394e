"""The telemetry store against a small fake Prometheus on loopback (real HTTP): one query per interval, smoothing,
expiry, fallback to unknown, recovery, estimated load of fresh bindings, and the agent's series end to end."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from policies.config import PlacementPolicy
from policies.inventory import Assignment
from scheduler.agent.agent import Agent
from scheduler.agent.exporter import MetricsServer
from scheduler.agent.fake_nvml import FakeNvml
from scheduler.model import ClusterModel
from scheduler.promql import PrometheusClient, PrometheusError, parse_result
from scheduler.telemetry import RecentBindings, TelemetryConfig, TelemetryStore
from tests.helpers import mig_node, node

_SELECTOR = re.compile(r'^\{__name__=~"(?P<names>[^"]+)"(?P<rest>[^}]*)\}\[(?P<range>\d+)s\]$')


class FakePrometheus:
    """Stores samples and answers `{__name__=~"A|B",k="v"}[Ns]` instant queries with matrices, as Prometheus does.

    `mode`: "ok", "error" (HTTP 503 with an error body), "slow" (answers after `delay_s`) or "garbage".
    """

    def __init__(self) -> None:
        self.samples: dict[tuple[tuple[str, str], ...], dict[float, float]] = {}
        self.queries: list[dict[str, str]] = []
        self.mode = "ok"
        self.delay_s = 0.0
        self.lock = threading.Lock()
        prom = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                status, body = prom.answer(self.path, form)
                if prom.mode == "slow":
                    time.sleep(prom.delay_s)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, name: str, labels: dict[str, str], ts: float, value: float) -> None:
        key = tuple(sorted({"__name__": name, "job": "dcgm", **labels}.items()))
        with self.lock:
            self.samples.setdefault(key, {})[ts] = value

    def answer(self, path: str, form: dict[str, str]) -> tuple[int, Any]:
        with self.lock:
            self.queries.append(form)
            if self.mode == "error":
                return 503, {"status": "error", "errorType": "unavailable", "error": "TSDB not ready"}
            if self.mode == "garbage":
                return 200, b"<html>proxy error</html>"
            assert path == "/api/v1/query"
            m = _SELECTOR.match(form["query"])
            assert m, form["query"]
            names = set(m["names"].split("|"))
            matchers = dict(re.findall(r'(\w+)="([^"]*)"', m["rest"]))
            at = float(form["time"])
            lo = at - float(m["range"])
            result = []
            for key, points in self.samples.items():
                labels = dict(key)
                if labels["__name__"] not in names or any(labels.get(k) != v for k, v in matchers.items()):
                    continue
                values = [[ts, repr(v)] for ts, v in sorted(points.items()) if lo < ts <= at]
                if values:
                    result.append({"metric": labels, "values": values})
            return 200, {"status": "success", "data": {"resultType": "matrix", "result": result}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def prom() -> Iterator[FakePrometheus]:
    server = FakePrometheus()
    yield server
    server.close()


def cluster() -> ClusterModel:
    model = ClusterModel(PlacementPolicy())
    model.replace_nodes([node("a", 2), node("b", 2), node("c", 1), mig_node("m", 1)])
    return model


def dcgm(gpu: int, host: str, **extra: str) -> dict[str, str]:
    return {
        "gpu": str(gpu),
        "UUID": f"GPU-{host}-{gpu}",
        "device": f"nvidia{gpu}",
        "modelName": "Tesla T4",
        "Hostname": host,
        **extra,
    }


def store_for(prom: FakePrometheus, model: ClusterModel, clock: Clock, **config: Any) -> TelemetryStore:
    return TelemetryStore(TelemetryConfig(url=prom.url, **config), model, clock=clock)


def util_of(model: ClusterModel) -> dict[str, list[float]]:
    snap = model.snapshot()
    return {name: [round(float(v), 4) for v in snap.gpu_util[i, :2]] for i, name in enumerate(snap.names)}


def test_one_query_maps_series_to_node_rows_and_gpus(prom: FakePrometheus) -> None:
    clock = Clock()
    now = clock.t
    for dt in (45, 30, 15, 0):
        prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), now - dt, 40.0)
        prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(1, "a"), now - dt, 80.0)
        prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "b"), now - dt, 10.0)
        prom.add("DCGM_FI_DEV_FB_USED", dcgm(0, "a"), now - dt, 4096.0)
        prom.add("DCGM_FI_DEV_FB_FREE", dcgm(0, "a"), now - dt, 12288.0)
    prom.add("DCGM_FI_DEV_GPU_UTIL", {"gpu": "0", "kubernetes_node": "c"}, now, 55.0)  # another exporter's labels
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "ghost"), now, 99.0)  # not a node of the model
    prom.add("DCGM_FI_PROF_GR_ENGINE_ACTIVE", dcgm(0, "m", GPU_I_PROFILE="7g.80gb", GPU_I_ID="0"), now, 0.9)
    model = cluster()
    store = store_for(prom, model, clock)
    view = store.poll_once()
    assert len(prom.queries) == 1
    assert util_of(model)["a"] == [0.4, 0.8]
    assert util_of(model)["b"][0] == 0.1 and np.isnan(util_of(model)["b"][1])
    assert util_of(model)["c"][0] == 0.55
    assert np.isnan(model.snapshot().gpu_util[model.snapshot().index["m"]]).all()  # MIG instances are not GPU load
    assert view.memory_used_mib[("a", 0)] == 4096.0 and view.memory_total_mib[("a", 0)] == 16384.0
    free = model.snapshot().gpu_mem_free_measured[model.snapshot().index["a"]]
    assert free[0] == 12288.0 and np.isnan(free[1])  # GPU 1 reports no memory: unknown, not full or empty
    assert (view.fresh_nodes, view.stale_nodes) == (3, 0)  # b is fresh through one GPU; m has no shareable GPU
    text = _metrics_text(store)
    assert 'gpu_extender_telemetry_nodes{state="fresh"} 3.0' in text
    assert 'gpu_extender_telemetry_queries_total{result="ok"} 1.0' in text


def _metrics_text(store: TelemetryStore) -> str:
    from prometheus_client import generate_latest

    return generate_latest(store.registry).decode()


def test_stale_memory_readings_are_unknown(prom: FakePrometheus) -> None:
    clock = Clock()
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), clock.t, 40.0)  # utilization fresh, memory last seen long ago
    prom.add("DCGM_FI_DEV_FB_USED", dcgm(0, "a"), clock.t - 60, 4096.0)
    prom.add("DCGM_FI_DEV_FB_FREE", dcgm(0, "a"), clock.t - 60, 12288.0)
    model = cluster()
    view = store_for(prom, model, clock, window_s=120.0, max_age_s=30.0).poll_once()  # read, but too old
    assert util_of(model)["a"][0] == 0.4
    assert ("a", 0) not in view.memory_used_mib
    assert np.isnan(model.snapshot().gpu_mem_free_measured).all()


def test_engine_activity_is_preferred_over_gpu_util(prom: FakePrometheus) -> None:
    clock = Clock()
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), clock.t, 100.0)  # kernels resident, engines mostly idle
    prom.add("DCGM_FI_PROF_GR_ENGINE_ACTIVE", dcgm(0, "a"), clock.t, 0.35)
    model = cluster()
    store_for(prom, model, clock).poll_once()
    assert util_of(model)["a"][0] == 0.35


@pytest.mark.parametrize(("smoothing", "expected"), [("mean", 0.325), ("p90", 0.65)])
def test_smoothing_over_the_window(prom: FakePrometheus, smoothing: str, expected: float) -> None:
    clock = Clock()
    for dt, v in ((75, 100.0), (45, 10.0), (30, 10.0), (15, 80.0), (0, 30.0)):  # the first is outside the window
        prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), clock.t - dt, v)
    model = cluster()
    store_for(prom, model, clock, window_s=60.0, max_age_s=90.0, smoothing=smoothing).poll_once()
    assert util_of(model)["a"][0] == pytest.approx(expected, abs=1e-4)


def test_samples_expire_and_the_gpu_falls_back_to_unknown(prom: FakePrometheus, caplog) -> None:
    clock = Clock()
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), clock.t, 50.0)
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "b"), clock.t, 20.0)
    model = cluster()
    store = store_for(prom, model, clock, interval_s=15.0, window_s=30.0, max_age_s=45.0)
    store.poll_once()
    assert util_of(model)["a"][0] == 0.5
    for t in range(15, 61, 15):  # node b keeps reporting, node a went silent
        clock.t += 15.0
        prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "b"), clock.t, 20.0)
        with caplog.at_level(logging.INFO, logger="gpu_extender.telemetry"):
            view = store.poll_once()
        if t <= 45:
            assert util_of(model)["a"][0] == 0.5, t  # the old sample holds until it is max_age_s old
    assert np.isnan(util_of(model)["a"][0])
    assert util_of(model)["b"][0] == 0.2
    assert (view.fresh_nodes, view.stale_nodes) == (1, 2)
    fallbacks = [r for r in caplog.records if "allocation only" in r.getMessage()]
    assert [r.examples for r in fallbacks] == [["c"], ["a", "c"]]  # logged when the set changes, not every poll


def test_prometheus_errors_keep_the_window_until_it_expires_then_recover(prom: FakePrometheus, caplog) -> None:
    clock = Clock()
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), clock.t, 70.0)
    model = cluster()
    store = store_for(prom, model, clock, interval_s=10.0, max_age_s=30.0, window_s=30.0, timeout_s=0.5)
    store.poll_once()
    with caplog.at_level(logging.INFO, logger="gpu_extender.telemetry"):
        for mode in ("error", "garbage", "slow", "error"):
            prom.mode, prom.delay_s = mode, 1.0
            clock.t += 10.0
            store.poll_once()  # never raises
            if clock.t - 1_700_000_000.0 <= 30.0:
                assert util_of(model)["a"][0] == 0.7
        assert np.isnan(util_of(model)["a"][0])  # 40 s without an answer: expired
        warnings = [r for r in caplog.records if "cannot read utilization" in r.getMessage()]
        assert len(warnings) == 1  # logged once per outage
        prom.mode = "ok"
        clock.t += 10.0
        prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), clock.t, 30.0)
        store.poll_once()
    assert util_of(model)["a"][0] == 0.3
    assert any("answers again" in r.getMessage() for r in caplog.records)
    text = _metrics_text(store)
    assert 'gpu_extender_telemetry_queries_total{result="error"} 4.0' in text


def test_unreachable_prometheus_is_an_error_not_an_exception() -> None:
    model = cluster()
    store = TelemetryStore(TelemetryConfig(url="http://127.0.0.1:9", timeout_s=0.5), model)
    view = store.poll_once()
    assert view.busy == {} and np.isnan(model.snapshot().gpu_util).all()
    with pytest.raises(PrometheusError):
        PrometheusClient("http://127.0.0.1:9", timeout_s=0.5).query("up")


def test_fresh_bindings_count_as_estimated_load_until_a_sample_shows_them(prom: FakePrometheus) -> None:
    clock = Clock()
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), clock.t - 5, 20.0)
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(1, "a"), clock.t - 5, 20.0)
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "b"), clock.t - 5, 90.0)
    bindings = RecentBindings(clock=clock)
    bindings.record(Assignment("a", gpus=(0,), milli=300), at=clock.t - 1)  # after the newest sample
    bindings.record(Assignment("a", gpus=(1,), milli=300), at=clock.t - 60)  # before it: already in the samples
    bindings.record(Assignment("b", gpus=(0,), milli=1000), at=clock.t - 1)
    bindings.record(Assignment("c", gpus=(0,), milli=500), at=clock.t - 1)  # no data for c: stays unknown
    model = cluster()
    store = TelemetryStore(TelemetryConfig(url=prom.url), model, estimates=bindings, clock=clock)
    store.poll_once()
    assert util_of(model)["a"] == [0.5, 0.2]
    assert util_of(model)["b"][0] == 1.0  # capped
    assert np.isnan(util_of(model)["c"][0])
    clock.t += 15.0
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), clock.t - 1, 50.0)  # the pod shows up in the samples
    store.poll_once()
    assert util_of(model)["a"][0] == pytest.approx(0.35)  # mean of 20 and 50, no estimate on top


def test_node_set_changes_between_polls(prom: FakePrometheus) -> None:
    clock = Clock()
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "z"), clock.t, 60.0)
    model = cluster()
    store = store_for(prom, model, clock)
    store.poll_once()
    model.replace_nodes([node("z", 1), node("a", 2)])
    clock.t += 1.0
    store.poll_once()
    snap = model.snapshot()
    assert snap.gpu_util.shape == snap.gpu_present.shape
    assert float(snap.gpu_util[snap.index["z"], 0]) == pytest.approx(0.6)


def test_selector_and_label_options(prom: FakePrometheus) -> None:
    clock = Clock()
    prom.add("DCGM_FI_DEV_GPU_UTIL", {"gpu": "1", "node": "a", "job": "agent"}, clock.t, 25.0)
    model = cluster()
    store = store_for(prom, model, clock, selector='job="agent"')
    store.poll_once()
    assert prom.queries[-1]["query"].startswith('{__name__=~"DCGM_FI_PROF_GR_ENGINE_ACTIVE|DCGM_FI_DEV_GPU_UTIL|')
    assert util_of(model)["a"][1] == 0.25


def test_background_thread_polls_every_interval(prom: FakePrometheus) -> None:
    prom.add("DCGM_FI_DEV_GPU_UTIL", dcgm(0, "a"), time.time(), 45.0)
    model = cluster()
    with TelemetryStore(TelemetryConfig(url=prom.url, interval_s=0.1), model) as store:
        deadline = time.monotonic() + 5
        while store.polls < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    polls = store.polls
    assert polls >= 3 and util_of(model)["a"][0] == 0.45
    time.sleep(0.3)
    assert store.polls == polls  # stopped


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        TelemetryConfig(url="http://x", smoothing="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TelemetryConfig(url="http://x", interval_s=0)


def test_parse_result_reads_vectors_and_drops_nan() -> None:
    body = json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [
                    {"metric": {"__name__": "up", "gpu": "0"}, "value": [1.5, "1"]},
                    {"metric": {"__name__": "up", "gpu": "1"}, "value": [1.5, "NaN"]},
                ],
            },
        }
    ).encode()
    series = parse_result(body)
    assert [s.samples for s in series] == [((1.5, 1.0),), ()]
    with pytest.raises(PrometheusError, match="bad_data"):
        parse_result(b'{"status": "error", "errorType": "bad_data", "error": "parse error"}')
    with pytest.raises(PrometheusError):
        parse_result(b'{"status": "success", "data": {"resultType": "scalar", "result": [1, "2"]}}')


# -- the agent's own series, scraped as Prometheus would --------------------------------------------------
def scrape_into(prom: FakePrometheus, port: int, at: float) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("DCGM_"):
                prom.add(sample.name, {**sample.labels, "instance": f"127.0.0.1:{port}"}, at, sample.value)


def test_agents_series_feed_the_store(prom: FakePrometheus) -> None:
    clock = Clock()
    servers = []
    try:
        for host, spec in (("a", "h100x2;util=const:40"), ("b", "t4,t4;util=step:10@0"), ("m", "h100/mig=7g.80gb@0")):
            agent = Agent(FakeNvml.from_spec(spec, hostname=host), host)
            agent.step()
            agent.step()
            server = MetricsServer(agent.registry, agent.health, "127.0.0.1", 0).start()
            servers.append(server)
            scrape_into(prom, server.port, clock.t)
        model = cluster()
        view = store_for(prom, model, clock).poll_once()
    finally:
        for server in servers:
            server.stop()
    assert util_of(model)["a"] == [0.4, 0.4]  # engine activity (H100)
    assert util_of(model)["b"] == [0.1, 0.1]  # GPU_UTIL / 100 (T4)
    assert view.memory_total_mib[("a", 0)] == 81_559
    assert view.stale_nodes == 1  # c has no agent


def test_command_line_flags() -> None:
    import argparse

    from scheduler.telemetry import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])) is None
    config = config_from_args(
        parser.parse_args(
            ["--prometheus-url", "http://prom:9090", "--telemetry-smoothing", "p90", "--telemetry-selector", 'job="a"']
        )
    )
    assert config == TelemetryConfig(url="http://prom:9090", smoothing="p90", selector='job="a"')
