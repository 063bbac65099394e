"""Per-model demand end to end: two fake vLLM servers, each serving its own model, a real Prometheus scraping them,
and `PrometheusDemandReader` reading each model's load back from it.

`model-a` is driven through `record()` at 20 requests/s and exports the current KV-cache gauge; `model-b` is driven
over HTTP (`/v1/completions`) at 5 requests/s and exports only the name vLLM used before 0.9,
`vllm:gpu_cache_usage_perc`. The reader must find each rate within 20 %, both KV-cache gauges, one replica each,
the queue a waiting backlog adds, and a history whose recent steps carry the driven rate; a sleeping replica stops
counting as running.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.prometheus import Prometheus
from scheduler.planner.demand import PrometheusDemandReader
from scheduler.promql import PrometheusClient
from scheduler.vllm.fake import FakeVllm

pytestmark = pytest.mark.slow

SCRAPE_S = 0.5
WINDOW_S = 4.0
"""The rate window: eight scrapes, so `rate()` has samples enough and the test stays short."""
RATE_A, RATE_B = 20.0, 5.0
PROMPT_A, OUTPUT_A = 100, 20
KV_A, KV_B = 0.6, 0.3
TOLERANCE = 0.2


class Driver:
    """Calls `send()` at `rate` per second on a schedule (not after each call), until stopped."""

    def __init__(self, rate: float, send: Callable[[], None]) -> None:
        self.rate, self.send = rate, send
        self.sent = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vllm-load")

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            due = start + self.sent / self.rate
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            try:
                self.send()
            except Exception as exc:  # the test reports it; the driver must not die silently
                self.errors.append(exc)
                return
            self.sent += 1

    def __enter__(self) -> Driver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def complete(url: str) -> None:
    body = json.dumps({"model": "model-b", "prompt": "one two three four five six seven eight", "max_tokens": 10})
    request = urllib.request.Request(
        f"{url}/v1/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


@pytest.fixture
def fakes() -> Iterator[tuple[FakeVllm, FakeVllm]]:
    with (
        FakeVllm("model-a", root="org/model-a-8b") as a,
        FakeVllm("model-b", legacy_kv_metric=True, service_time_s=0.01) as b,
    ):
        a.set_kv_cache_usage(KV_A)
        b.set_kv_cache_usage(KV_B)
        yield a, b


@pytest.fixture
def prometheus(tmp_path: Path, fakes: tuple[FakeVllm, FakeVllm]) -> Iterator[Prometheus]:
    with Prometheus(tmp_path, [fake.address for fake in fakes], scrape_interval_s=SCRAPE_S) as server:
        server.wait_targets_up(timeout_s=20)
        yield server


def within(value: float, expected: float) -> bool:
    return abs(value - expected) <= TOLERANCE * expected


def test_demand_per_model_from_a_real_prometheus(fakes: tuple[FakeVllm, FakeVllm], prometheus: Prometheus) -> None:
    a, b = fakes
    reader = PrometheusDemandReader(PrometheusClient(prometheus.url), window_s=WINDOW_S, history_s=20, step_s=1)

    def record_a() -> None:
        a.record(requests=1, prompt_tokens=PROMPT_A, generation_tokens=OUTPUT_A)

    with Driver(RATE_A, record_a) as drive_a, Driver(RATE_B, lambda: complete(b.url)) as drive_b:
        # A window and two scrapes after the load starts, the rate covers only loaded time.
        time.sleep(WINDOW_S + 2 * SCRAPE_S)
        deadline = time.monotonic() + 10
        while True:
            loads = reader.read()
            rates = {m: load.requests_per_second for m, load in loads.items()}
            if within(rates.get("model-a", 0), RATE_A) and within(rates.get("model-b", 0), RATE_B):
                break
            assert time.monotonic() < deadline, f"rates {rates}, driven a={RATE_A} b={RATE_B}\n{prometheus.log_tail()}"
            time.sleep(SCRAPE_S)
        assert not drive_a.errors and not drive_b.errors, (drive_a.errors, drive_b.errors)
        print(f"\nread {rates} for driven a={RATE_A} b={RATE_B} ({drive_a.sent} and {drive_b.sent} requests)")

        load_a, load_b = loads["model-a"], loads["model-b"]
        assert set(loads) == {"model-a", "model-b"}
        assert within(load_a.prompt_tokens_per_second, RATE_A * PROMPT_A), load_a
        assert within(load_a.generation_tokens_per_second, RATE_A * OUTPUT_A), load_a
        assert within(load_b.prompt_tokens_per_second, RATE_B * 8), load_b  # eight words
        assert within(load_b.generation_tokens_per_second, RATE_B * 10), load_b
        assert load_a.kv_cache_usage == pytest.approx(KV_A), "the current KV-cache name"
        assert load_b.kv_cache_usage == pytest.approx(KV_B), "the name before vLLM 0.9"
        assert (load_a.replicas_running, load_b.replicas_running) == (1, 1)
        assert load_a.requests_waiting == load_b.requests_waiting == 0
        # One step a second since Prometheus had two samples of each counter, rising to the driven rate.
        assert 3 <= len(load_a.history) <= 21 and len(load_a.history) == len(load_b.history)
        assert within(float(load_a.history[-1]), RATE_A), load_a.history
        assert within(float(load_b.history[-1]), RATE_B), load_b.history

        # A backlog raises the demand by what must be cleared within a window.
        b.set_waiting(40)
        time.sleep(2 * SCRAPE_S)
        load_b = reader.read()["model-b"]
        assert load_b.requests_waiting == 40
        assert within(load_b.requests_per_second, RATE_B + 40 / WINDOW_S), load_b
        b.set_waiting(0)

    # A sleeping replica still exports its series, but no longer counts as running.
    a.sleep(level=1)
    time.sleep(2 * SCRAPE_S)
    loads = reader.read()
    assert (loads["model-a"].replicas_running, loads["model-b"].replicas_running) == (0, 1)
    assert loads["model-a"].kv_cache_usage == 0, "sleeping at level 1 discards the KV cache"
