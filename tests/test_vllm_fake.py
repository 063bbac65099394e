"""The fake vLLM server over real HTTP: its routes, its series as Prometheus's own parser reads them (vLLM 0.33's
names, labels and buckets), request accounting and queueing, and the sleep-mode state machine."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from scheduler.vllm.fake import (
    FINISH_REASONS,
    GIB,
    REQUEST_LATENCY_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
    EngineDead,
    FakeVllm,
    Memory,
    build_1_2_5_buckets,
)

MODEL = "llama-8b"


def call(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """(status, parsed JSON body or raw bytes) of one request."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def complete(fake: FakeVllm, prompt: Any = "a b c d", max_tokens: int = 8, **extra: Any) -> tuple[int, Any]:
    return call(
        "POST", f"{fake.url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **extra}
    )


def samples(fake: FakeVllm) -> list[Sample]:
    with urllib.request.urlopen(f"{fake.url}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(fake: FakeVllm, name: str, **labels: str) -> float:
    found = [s.value for s in samples(fake) if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def in_background(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def wait_for(condition: Any, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s}s"
        time.sleep(0.01)


@pytest.fixture
def fake() -> Iterator[FakeVllm]:
    with FakeVllm(MODEL, root="meta-llama/Llama-3.1-8B-Instruct", max_model_len=4096) as server:
        yield server


def test_health_answers_200_with_an_empty_body_and_503_once_dead(fake: FakeVllm) -> None:
    assert call("GET", f"{fake.url}/health") == (200, b"")
    fake.kill()
    assert call("GET", f"{fake.url}/health")[0] == 503
    status, body = complete(fake)
    assert status == 500
    assert body["error"] == {
        "message": "The server had an error while processing your request.",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    with pytest.raises(EngineDead):
        fake.record()
    fake.revive()
    assert call("GET", f"{fake.url}/health")[0] == 200


def test_models_lists_the_served_name_as_vllm_does(fake: FakeVllm) -> None:
    status, body = call("GET", f"{fake.url}/v1/models")
    assert status == 200 and body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["root"] == "meta-llama/Llama-3.1-8B-Instruct" and card["parent"] is None
    assert card["max_model_len"] == 4096
    assert card["permission"][0]["object"] == "model_permission"


def test_metrics_carry_vllm_names_labels_and_buckets(fake: FakeVllm) -> None:
    with urllib.request.urlopen(f"{fake.url}/metrics", timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    # prometheus_client also writes each counter's and histogram's `_created`, read back as gauges, as from vLLM.
    types = {name: f.type for name, f in families.items() if not name.endswith("_created")}
    assert types == {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:num_requests_waiting_by_reason": "gauge",
        "vllm:engine_sleep_state": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:num_preemptions": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:request_prompt_tokens": "histogram",
        "vllm:request_generation_tokens": "histogram",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
    }
    for family in families.values():
        for sample in family.samples:
            assert sample.labels["model_name"] == MODEL and sample.labels["engine"] == "0", sample
    names = {s.name for f in families.values() for s in f.samples}
    assert {"vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"} <= names
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert reasons == set(FINISH_REASONS) == {"stop", "length", "abort", "error", "repetition"}
    states = {s.labels["sleep_state"]: s.value for s in families["vllm:engine_sleep_state"].samples}
    assert states == {"awake": 1, "weights_offloaded": 0, "discard_all": 0}

    def buckets(name: str) -> list[float]:
        return [float(s.labels["le"]) for s in families[name].samples if s.name == f"{name}_bucket"]

    assert buckets("vllm:time_to_first_token_seconds") == [*TIME_TO_FIRST_TOKEN_BUCKETS, float("inf")]
    assert buckets("vllm:e2e_request_latency_seconds") == [*REQUEST_LATENCY_BUCKETS, float("inf")]
    assert TIME_TO_FIRST_TOKEN_BUCKETS[:3] == (0.001, 0.005, 0.01) and TIME_TO_FIRST_TOKEN_BUCKETS[-1] == 2560.0
    assert REQUEST_LATENCY_BUCKETS[0] == 0.3 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0
    assert buckets("vllm:request_prompt_tokens") == [*build_1_2_5_buckets(4096), float("inf")]
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]  # vLLM's docstring example


def test_the_old_kv_cache_name_replaces_the_new_one() -> None:
    with FakeVllm(MODEL, legacy_kv_metric=True) as old:
        old.set_kv_cache_usage(0.4)
        names = {s.name for s in samples(old)}
        assert "vllm:gpu_cache_usage_perc" in names and "vllm:kv_cache_usage_perc" not in names
        assert value(old, "vllm:gpu_cache_usage_perc") == pytest.approx(0.4)


def test_completions_count_words_as_prompt_tokens_and_max_tokens_as_output(fake: FakeVllm) -> None:
    status, body = complete(fake, "the quick brown fox jumps", max_tokens=7)
    assert status == 200 and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["finish_reason"] == "length" and len(body["choices"][0]["text"].split()) == 7
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}

    status, body = complete(fake, ["one two", "three four five"], max_tokens=3)  # two prompts: two requests
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 6

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_completion_tokens": 4}
    status, body = call("POST", f"{fake.url}/v1/chat/completions", chat)
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] == 4

    assert value(fake, "vllm:request_success_total", finished_reason="length") == 4
    assert value(fake, "vllm:prompt_tokens_total") == 5 + 5 + 2
    assert value(fake, "vllm:generation_tokens_total") == 7 + 6 + 4
    assert value(fake, "vllm:e2e_request_latency_seconds_count") == 4
    assert value(fake, "vllm:request_prompt_tokens_sum") == 12


def test_bad_requests_get_vllm_error_bodies(fake: FakeVllm) -> None:
    status, body = call("POST", f"{fake.url}/v1/completions", {"model": "other", "prompt": "x"})
    assert status == 404 and body["error"]["type"] == "NotFoundError" and body["error"]["param"] == "model"
    assert body["error"]["message"].startswith("The model `other` does not exist.")
    assert complete(fake, "")[0] == 400
    assert complete(fake, "x", max_tokens=0)[0] == 400
    status, body = complete(fake, "x", max_tokens=4096)  # 1 prompt token + 4096 > max_model_len
    assert status == 400 and body["error"]["type"] == "BadRequestError" and body["error"]["code"] == 400
    assert value(fake, "vllm:request_success_total", finished_reason="length") == 0


def test_requests_queue_beyond_max_num_seqs_and_take_their_service_time() -> None:
    with FakeVllm(MODEL, max_num_seqs=1, service_time_s=0.3) as fake:
        started = time.monotonic()
        threads = [in_background(complete, fake)[0] for _ in range(3)]
        wait_for(lambda: value(fake, "vllm:num_requests_waiting") == 2, "two requests waiting")
        assert value(fake, "vllm:num_requests_running") == 1
        assert value(fake, "vllm:num_requests_waiting_by_reason", reason="capacity") == 2
        for thread in threads:
            thread.join(5)
        assert time.monotonic() - started >= 0.9 - 0.05  # one after another
        assert value(fake, "vllm:request_success_total", finished_reason="length") == 3
        assert value(fake, "vllm:num_requests_running") == value(fake, "vllm:num_requests_waiting") == 0
        assert value(fake, "vllm:request_queue_time_seconds_sum") >= 0.3 + 0.6 - 0.1


def test_demand_can_be_shaped_without_http(fake: FakeVllm) -> None:
    fake.record(requests=10, prompt_tokens=1000, generation_tokens=200, latency_s=1.2)
    fake.record(requests=2, finished_reason="stop")
    fake.set_waiting(7)
    fake.set_running(3)
    fake.set_kv_cache_usage(0.55)
    assert value(fake, "vllm:request_success_total", finished_reason="length") == 10
    assert value(fake, "vllm:request_success_total", finished_reason="stop") == 2
    assert value(fake, "vllm:prompt_tokens_total") == 1000 and value(fake, "vllm:generation_tokens_total") == 200
    assert value(fake, "vllm:num_requests_waiting") == 7 and value(fake, "vllm:num_requests_running") == 3
    assert value(fake, "vllm:kv_cache_usage_perc") == pytest.approx(0.55)
    assert value(fake, "vllm:e2e_request_latency_seconds_bucket", le="1.5") == 10
    assert value(fake, "vllm:request_prompt_tokens_sum") == pytest.approx(1000)
    with pytest.raises(ValueError):
        fake.record(finished_reason="done")
    with pytest.raises(ValueError):
        fake.set_kv_cache_usage(1.5)


def sleep(fake: FakeVllm, level: int, mode: str | None = None) -> tuple[int, Any]:
    query = f"?level={level}" + (f"&mode={mode}" if mode else "")
    return call("POST", f"{fake.url}/sleep{query}")


def wake(fake: FakeVllm, *tags: str) -> tuple[int, Any]:
    return call("POST", f"{fake.url}/wake_up" + ("?" + "&".join(f"tags={t}" for t in tags) if tags else ""))


def is_sleeping(fake: FakeVllm) -> bool:
    status, body = call("GET", f"{fake.url}/is_sleeping")
    assert status == 200
    return bool(body["is_sleeping"])


def sleep_states(fake: FakeVllm) -> dict[str, float]:
    return {s.labels["sleep_state"]: s.value for s in samples(fake) if s.name == "vllm:engine_sleep_state"}


def test_sleep_level_1_offloads_weights_and_a_partial_wake_keeps_it_asleep(fake: FakeVllm) -> None:
    awake = Memory(gpu_bytes=GIB // 2 + 16 * GIB + 48 * GIB, host_bytes=0)
    fake.set_kv_cache_usage(0.5)
    assert fake.memory() == awake and not is_sleeping(fake)
    assert sleep(fake, 1) == (200, {"status": "sleeping", "level": 1})
    assert is_sleeping(fake) and fake.sleep_level == 1
    assert sleep_states(fake) == {"awake": 0, "weights_offloaded": 1, "discard_all": 0}
    assert fake.memory() == Memory(gpu_bytes=GIB // 2, host_bytes=16 * GIB)
    assert value(fake, "vllm:kv_cache_usage_perc") == 0, "sleeping discards the KV cache"

    assert wake(fake, "weights") == (200, {"status": "sleeping", "tags": ["weights"]})
    assert is_sleeping(fake) and fake.sleeping_tags == {"kv_cache"}
    assert fake.memory() == Memory(gpu_bytes=GIB // 2 + 16 * GIB, host_bytes=0)
    assert sleep_states(fake)["awake"] == 0, "vLLM records the wake only once fully awake"
    assert wake(fake, "nonsense") == (200, {"status": "sleeping", "tags": ["nonsense"]})  # wakes nothing
    assert wake(fake, "kv_cache") == (200, {"status": "awake", "tags": ["kv_cache"]})
    assert not is_sleeping(fake) and fake.sleep_level is None and fake.memory() == awake
    assert sleep_states(fake) == {"awake": 1, "weights_offloaded": 0, "discard_all": 0}
    assert value(fake, "vllm:kv_cache_usage_perc") == pytest.approx(0.5)


def test_sleep_level_2_discards_everything_and_level_0_only_pauses(fake: FakeVllm) -> None:
    assert sleep(fake, 2)[0] == 200
    assert sleep_states(fake) == {"awake": 0, "weights_offloaded": 0, "discard_all": 1}
    assert fake.memory() == Memory(gpu_bytes=GIB // 2, host_bytes=0)
    assert wake(fake) == (200, {"status": "awake", "tags": None})

    assert sleep(fake, 0)[0] == 200
    assert is_sleeping(fake) and fake.sleep_level == 0 and fake.sleeping_tags == frozenset()
    assert sleep_states(fake) == {"awake": 0, "weights_offloaded": 0, "discard_all": 0}
    assert fake.memory().gpu_bytes == GIB // 2 + 64 * GIB, "level 0 frees no memory"
    assert wake(fake, "scheduling") == (200, {"status": "awake", "tags": ["scheduling"]})
    assert not is_sleeping(fake)

    assert sleep(fake, 3)[0] == 422 and sleep(fake, 1, "later")[0] == 422
    assert not is_sleeping(fake)


def test_requests_wait_while_asleep_and_run_after_wake_up(fake: FakeVllm) -> None:
    """vLLM pauses its scheduler to sleep: what arrives queues, nothing is served, nothing is refused."""
    sleep(fake, 1)
    thread, replies = in_background(complete, fake, "hello world", 5)
    wait_for(lambda: value(fake, "vllm:num_requests_waiting") == 1, "the request to wait")
    time.sleep(0.2)
    assert thread.is_alive() and value(fake, "vllm:request_success_total", finished_reason="length") == 0
    with pytest.raises(RuntimeError, match="asleep"):
        fake.record()
    assert wake(fake)[1]["status"] == "awake"
    thread.join(5)
    status, body = replies[0]
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert value(fake, "vllm:request_success_total", finished_reason="length") == 1


def test_sleep_aborts_requests_in_flight_by_default_and_keep_freezes_them() -> None:
    with FakeVllm(MODEL, service_time_s=0.5) as fake:
        thread, replies = in_background(complete, fake, "a b", 100)
        wait_for(lambda: value(fake, "vllm:num_requests_running") == 1, "the request to run")
        assert sleep(fake, 1)[0] == 200  # mode=abort
        thread.join(5)
        assert replies[0][0] == 200 and replies[0][1]["choices"][0]["finish_reason"] == "abort"
        assert replies[0][1]["usage"]["completion_tokens"] < 100
        assert value(fake, "vllm:request_success_total", finished_reason="abort") == 1
        wake(fake)

        thread, replies = in_background(complete, fake, "a b", 100)
        wait_for(lambda: value(fake, "vllm:num_requests_running") == 1, "the request to run")
        assert sleep(fake, 1, "keep")[0] == 200
        time.sleep(0.7)  # longer than its whole service time: frozen, it cannot finish
        assert thread.is_alive()
        wake(fake)
        thread.join(5)
        assert replies[0][1]["choices"][0]["finish_reason"] == "length"


def test_sleep_wait_mode_lets_requests_in_flight_finish_first() -> None:
    with FakeVllm(MODEL, service_time_s=0.3) as fake:
        thread, replies = in_background(complete, fake)
        wait_for(lambda: value(fake, "vllm:num_requests_running") == 1, "the request to run")
        started = time.monotonic()
        assert sleep(fake, 1, "wait")[0] == 200
        assert time.monotonic() - started >= 0.2
        thread.join(5)
        assert replies[0][1]["choices"][0]["finish_reason"] == "length" and is_sleeping(fake)


def test_without_dev_mode_the_sleep_routes_do_not_exist() -> None:
    with FakeVllm(MODEL, sleep_endpoints=False) as fake:
        assert sleep(fake, 1)[0] == 404 and wake(fake)[0] == 404
        assert call("GET", f"{fake.url}/is_sleeping")[0] == 404


def test_fakes_in_one_process_keep_their_own_series() -> None:
    with FakeVllm("model-a") as a, FakeVllm("model-b") as b:
        a.record(requests=3)
        assert a.port != b.port
        assert {s.labels["model_name"] for s in samples(a)} == {"model-a"}
        assert {s.labels["model_name"] for s in samples(b)} == {"model-b"}
        assert value(b, "vllm:request_success_total", finished_reason="length") == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{a.url}/health", timeout=2)
