"""`VllmClient` against the fake vLLM server, and against servers that fail: a closed port, HTTP 500, a body that is
not what vLLM sends, bytes that are not HTTP, no answer in time. Every failure is a `VllmError`."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scheduler.vllm.client import ModelMetrics, VllmClient, VllmError, parse_metrics
from scheduler.vllm.fake import FakeVllm


@pytest.fixture
def fake() -> Iterator[FakeVllm]:
    with FakeVllm("qwen-7b", service_time_s=0.0) as server:
        yield server


def test_health_models_and_metrics(fake: FakeVllm) -> None:
    client = VllmClient(fake.url + "/", timeout_s=5)
    assert client.health() is True
    assert client.models() == ["qwen-7b"]
    fake.record(requests=4, prompt_tokens=40, generation_tokens=80)
    fake.set_waiting(2)
    fake.set_kv_cache_usage(0.25)
    assert client.metrics() == {
        "qwen-7b": ModelMetrics(
            model="qwen-7b",
            requests_success=4,
            prompt_tokens=40,
            generation_tokens=80,
            requests_running=0,
            requests_waiting=2,
            kv_cache_usage=0.25,
            engines=1,
            sleep_state="awake",
        )
    }
    fake.kill()
    assert client.health() is False  # 503: the server answers, its engine is dead


def test_sleep_and_wake_up(fake: FakeVllm) -> None:
    client = VllmClient(fake.url)
    assert client.is_sleeping() is False
    client.sleep()
    assert client.is_sleeping() is True and fake.sleep_level == 1
    assert client.metrics()["qwen-7b"].sleep_state == "weights_offloaded"
    assert client.wake_up(["weights"]) is False  # the KV cache still sleeps
    assert client.wake_up(["kv_cache"]) is True and client.is_sleeping() is False

    client.sleep(2)
    assert client.metrics()["qwen-7b"].sleep_state == "discard_all"
    assert client.wake_up() is True
    client.sleep(0, mode="keep")
    assert client.metrics()["qwen-7b"].sleep_state == "paused" and client.is_sleeping()
    assert client.wake_up(["scheduling"]) is True
    with pytest.raises(ValueError):
        client.sleep(3)


def test_the_old_kv_cache_name_is_read() -> None:
    with FakeVllm("old", legacy_kv_metric=True) as fake:
        fake.set_kv_cache_usage(0.7)
        assert VllmClient(fake.url).metrics()["old"].kv_cache_usage == pytest.approx(0.7)


def test_parse_metrics_sums_engines_and_prefers_the_new_kv_name() -> None:
    text = "\n".join(
        [
            "# TYPE vllm:request_success counter",
            'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3',
            'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2',
            'vllm:request_success_total{engine="1",finished_reason="length",model_name="m"} 5',
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="m"} 1',
            'vllm:num_requests_running{engine="1",model_name="m"} 2',
            'vllm:num_requests_running{engine="0",model_name="n"} 4',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2',
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4',
            "# TYPE vllm:gpu_cache_usage_perc gauge",
            'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9',
            'vllm:gpu_cache_usage_perc{engine="0",model_name="n"} 0.5',
            "# TYPE process_open_fds gauge",
            "process_open_fds 12",
            "",
        ]
    )
    metrics = parse_metrics(text)
    assert set(metrics) == {"m", "n"}
    m, n = metrics["m"], metrics["n"]
    assert (m.requests_success, m.requests_running, m.engines) == (10, 3, 2)
    assert m.kv_cache_usage == pytest.approx(0.3) and n.kv_cache_usage == pytest.approx(0.5)
    assert m.sleep_state is None, "a vLLM without the sleep gauge"


def test_a_closed_port_is_a_vllm_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = VllmClient(f"http://127.0.0.1:{port}", timeout_s=2)
    for call in (client.health, client.models, client.is_sleeping, client.metrics, client.wake_up, client.sleep):
        with pytest.raises(VllmError, match="refused") as caught:
            call()
        assert caught.value.status is None


class _Server:
    """A loopback HTTP server whose every answer is `status` with `body`."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server_500() -> Iterator[_Server]:
    server = _Server(500, b'{"error": {"message": "boom inside", "type": "InternalServerError", "code": 500}}')
    yield server
    server.close()


def test_http_500_is_a_vllm_error_with_vllms_message(server_500: _Server) -> None:
    client = VllmClient(server_500.url)
    with pytest.raises(VllmError, match="HTTP 500: boom inside") as caught:
        client.models()
    assert caught.value.status == 500
    with pytest.raises(VllmError):
        client.sleep()
    assert client.health() is False


def test_bodies_that_are_not_vllms_are_vllm_errors() -> None:
    html = _Server(200, b"<html>a proxy page</html>", "text/html")
    odd = _Server(200, b'{"data": [{"name": "no id"}], "is_sleeping": "yes", "status": "dozing"}')
    try:
        for call in (VllmClient(html.url).models, VllmClient(html.url).is_sleeping, VllmClient(html.url).wake_up):
            with pytest.raises(VllmError, match="not JSON"):
                call()
        with pytest.raises(VllmError, match="Prometheus text format"):
            VllmClient(html.url).metrics()
        for call in (VllmClient(odd.url).models, VllmClient(odd.url).is_sleeping, VllmClient(odd.url).wake_up):
            with pytest.raises(VllmError, match=r"not a model list|unexpected reply"):
                call()
    finally:
        html.close()
        odd.close()


@pytest.fixture
def raw_server() -> Iterator[tuple[str, threading.Event]]:
    """Answers bytes that are not HTTP, or nothing at all while `silent` is set."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    silent = threading.Event()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                if silent.is_set():
                    stop.wait(3)
                else:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2 garbage\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", silent
    stop.set()
    listener.close()


def test_garbage_and_silence_are_vllm_errors(raw_server: tuple[str, threading.Event]) -> None:
    url, silent = raw_server
    with pytest.raises(VllmError) as caught:
        VllmClient(url).models()
    assert caught.value.status is None and "Traceback" not in str(caught.value)
    silent.set()
    with pytest.raises(VllmError, match=r"timed out|within"):
        VllmClient(url, timeout_s=0.3).health()


def test_sleep_routes_missing_without_dev_mode() -> None:
    with FakeVllm("m", sleep_endpoints=False) as fake:
        with pytest.raises(VllmError) as caught:
            VllmClient(fake.url).sleep()
        assert caught.value.status == 404


def test_urls_are_checked() -> None:
    with pytest.raises(ValueError):
        VllmClient("127.0.0.1:8000")
    with pytest.raises(VllmError):
        VllmClient("http://127.0.0.1:notaport").health()
