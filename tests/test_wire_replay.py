"""The request bodies captured from a real kube-scheduler v1.36, replayed against `gpu-extender serve --fleet`
over real HTTP: every reply must have the shape kube-scheduler accepted."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.procs import free_ports
from e2e.workload import shared_data

WIRE = shared_data().parent / "wire"
FLEET = Path(__file__).parent / "data" / "wire-fleet.yaml"


def captured(name: str) -> dict:
    return json.loads((WIRE / f"{name}.request.json").read_text())


def accepted_shape(name: str) -> object:
    return json.loads((WIRE / f"{name}.response.json").read_text())


@contextlib.contextmanager
def serving(*extra: str, scheme: str = "http", verify: ssl.SSLContext | bool = True) -> Iterator[httpx.Client]:
    """`gpu-extender serve --fleet` on a free port, and a client for it once it is ready."""
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "extender.cli", "serve", "--fleet", str(FLEET), "--port", str(port), *extra],
        stderr=subprocess.PIPE,
    )
    client = httpx.Client(base_url=f"{scheme}://127.0.0.1:{port}", timeout=10, verify=verify)
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)
    try:
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def server() -> Iterator[httpx.Client]:
    with serving() as client:
        yield client


@pytest.mark.parametrize("name", ["filter-001", "filter-002", "filter-nocache-001"])
def test_filter_replies(server: httpx.Client, name: str) -> None:
    request = captured(name)
    reply = server.post("/filter", json=request)
    assert reply.status_code == 200
    body = reply.json()
    assert set(accepted_shape(name)) <= set(body)  # every field kube-scheduler read in the accepted reply
    asked = set(request["NodeNames"] or [n["metadata"]["name"] for n in request["Nodes"]["items"]])
    assert isinstance(body["NodeNames"], list) and set(body["NodeNames"]) <= asked
    assert body["Error"] == ""
    decided = set(body["NodeNames"]) | set(body["FailedNodes"]) | set(body["FailedAndUnresolvableNodes"])
    assert decided == asked  # every node comes back, passed or with a reason


def test_prioritize_reply(server: httpx.Client) -> None:
    request = captured("prioritize-001")
    body = server.post("/prioritize", json=request).json()
    assert [h["Host"] for h in body] == request["NodeNames"]
    assert all(isinstance(h["Score"], int) and 0 <= h["Score"] <= 10 for h in body)
    assert [h["Score"] for h in body].count(10) == 1


def test_bind_reply_is_idempotent(server: httpx.Client) -> None:
    server.post("/filter", json=captured("filter-002"))  # the scheduler filtered this pod before binding it
    request = captured("bind-p3-001")
    first = server.post("/bind", json=request).json()
    assert first == accepted_shape("bind-p3-001")
    assert server.post("/bind", json=request).json() == {"Error": ""}
    other = server.post("/bind", json={**request, "Node": "gpu-b"}).json()
    assert "already holds GPUs on gpu-c" in other["Error"]


def test_preempt_reply(server: httpx.Client) -> None:
    body = server.post("/preempt", json=captured("preempt-p3-001")).json()
    assert list(body) == ["NodeNameToMetaVictims"]
    # The victim is unknown to the extender (it holds no GPU we track), so the scheduler's choice stands.
    assert body == accepted_shape("preempt-p3-001")


def test_the_same_replies_over_tls(server: httpx.Client, tmp_path: Path) -> None:
    """Served with a certificate, each reply still goes out whole (see `extender.transport`) and is the same."""
    from e2e import pki

    keys = pki.generate(tmp_path)
    tls = ("--tls-cert", str(keys.apiserver.cert), "--tls-key", str(keys.apiserver.key))
    with serving(*tls, scheme="https", verify=ssl.create_default_context(cafile=str(keys.ca.cert))) as secure:
        for name in ("filter-001", "filter-002", "filter-001"):  # one kept-alive connection
            request = captured(name)
            assert secure.post("/filter", json=request).json() == server.post("/filter", json=request).json()
        assert secure.get("/healthz").json() == {"status": "ok"}
