"""The agent's writes to its Node, against a small fake API server on loopback (real HTTP, the official client)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kubernetes.client
import pynvml
import pytest

from scheduler.agent.agent import Agent
from scheduler.agent.fake_nvml import FakeNvml
from scheduler.agent.publisher import GPU_MILLI_RESOURCE, NodePublisher
from scheduler.annotations import GPU_INVENTORY, parse_node_inventory
from scheduler.nodes import inventory_from_node


def _canonical(value: str) -> str:
    """The API server's canonical quantity form for whole thousands (`2000` -> `2k`)."""
    n = int(value)
    return f"{n // 1000}k" if n and n % 1000 == 0 else value


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            _merge(target.setdefault(key, {}), value)
        else:
            target[key] = value


class FakeNodeApi:
    """GET and merge-PATCH of Nodes (and their status). `fail` answers the next N requests with a 500."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail = 0
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.handle(self, "GET")

            def do_PATCH(self) -> None:
                api.handle(self, "PATCH")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, name: str, annotations: dict[str, str] | None = None) -> None:
        self.nodes[name] = {
            "metadata": {"name": name, "annotations": dict(annotations or {}), "labels": {}},
            "status": {"capacity": {"cpu": "64", "memory": "256Gi"}, "allocatable": {"cpu": "64", "memory": "256Gi"}},
        }

    def patches(self) -> list[str]:
        return [path for method, path in self.requests if method == "PATCH"]

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        with self.lock:
            self.requests.append((method, h.path))
            if self.fail:
                self.fail -= 1
                return self.reply(h, 500, {"kind": "Status", "message": "etcd is sad"})
            parts = h.path.split("?")[0].strip("/").split("/")  # api v1 nodes NAME [status]
            node = self.nodes.get(parts[3]) if len(parts) >= 4 else None
            if node is None:
                return self.reply(h, 404, {"kind": "Status", "message": "not found"})
            if method == "PATCH":
                assert h.headers["Content-Type"] == "application/merge-patch+json"
                patch = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
                if parts[4:] == ["status"]:
                    assert set(patch) == {"status"}
                    for kind in ("capacity", "allocatable"):
                        for k, v in patch["status"].get(kind, {}).items():
                            patch["status"][kind][k] = _canonical(v)
                else:
                    assert set(patch) == {"metadata"}
                _merge(node, patch)
            self.reply(h, 200, node)

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def client(self) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration()
        configuration.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return kubernetes.client.ApiClient(configuration)


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def api() -> Iterator[FakeNodeApi]:
    server = FakeNodeApi()
    server.add("gpu-1")
    yield server
    server.server.shutdown()
    server.server.server_close()


def agent_for(api: FakeNodeApi, spec: str, clock: Clock, resync_s: float = 300.0) -> tuple[Agent, FakeNvml]:
    fake = FakeNvml.from_spec(spec, hostname="gpu-1")
    publisher = NodePublisher(api.client(), "gpu-1", resync_s=resync_s, clock=clock)
    return Agent(fake, "gpu-1", publisher, monotonic=clock), fake


def test_inventory_and_gpu_milli_are_published_once(api: FakeNodeApi) -> None:
    clock = Clock()
    agent, _ = agent_for(api, "h100x2,h100/mig=3g.40gb@0+3g.40gb@4;util=step:0@0,90@1", clock)
    agent.step()
    assert api.patches() == ["/api/v1/nodes/gpu-1", "/api/v1/nodes/gpu-1/status"]
    node = api.nodes["gpu-1"]
    doc = parse_node_inventory(node["metadata"]["annotations"][GPU_INVENTORY])
    assert doc is not None and doc.observed_at is not None and len(doc.gpus) == 3
    assert node["status"]["capacity"][GPU_MILLI_RESOURCE] == "2k"  # stored in canonical form
    assert node["status"]["allocatable"][GPU_MILLI_RESOURCE] == "2k"

    inventory = inventory_from_node(node)  # what the scheduler's watch makes of it
    assert inventory is not None
    assert [g.mig_table for g in inventory.gpus] == [None, None, "H100-80GB"]
    assert [(i.profile, i.start) for i in inventory.gpus[2].mig_instances] == [("3g.40gb", 0), ("3g.40gb", 4)]

    for _ in range(20):  # utilization changes, the inventory does not
        clock.t += 5.0
        agent.step()
    assert len(api.patches()) == 2
    assert len(api.requests) == 2 + 1  # the first GET, the two PATCHes; nothing while unchanged


def test_resync_reads_the_node_but_writes_only_what_differs(api: FakeNodeApi) -> None:
    clock = Clock()
    agent, _ = agent_for(api, "t4x4", clock, resync_s=60.0)
    agent.step()
    assert len(api.patches()) == 2
    clock.t += 61.0
    agent.step()
    assert [m for m, _ in api.requests] == ["GET", "PATCH", "PATCH", "GET"]

    del api.nodes["gpu-1"]["metadata"]["annotations"][GPU_INVENTORY]  # someone removed it
    clock.t += 61.0
    agent.step()
    assert api.patches() == ["/api/v1/nodes/gpu-1", "/api/v1/nodes/gpu-1/status", "/api/v1/nodes/gpu-1"]


def test_a_restarted_agent_does_not_rewrite_an_identical_inventory(api: FakeNodeApi) -> None:
    clock = Clock()
    first, _ = agent_for(api, "a100-80gbx8", clock)
    first.step()
    stamped = api.nodes["gpu-1"]["metadata"]["annotations"][GPU_INVENTORY]
    api.requests.clear()
    clock.t += 3600.0
    second, _ = agent_for(api, "a100-80gbx8", clock)
    second.step()
    assert api.patches() == []
    assert api.nodes["gpu-1"]["metadata"]["annotations"][GPU_INVENTORY] == stamped  # observedAt kept


def test_a_changed_inventory_is_published_again(api: FakeNodeApi) -> None:
    clock = Clock()
    agent, fake = agent_for(api, "a100-40gbx2", clock)
    agent.step()
    api.requests.clear()
    fake.set_mig_layout(1, [("7g.40gb", 0)])  # the MIG manager repartitioned GPU 1
    clock.t += 5.0
    agent.step()
    assert api.patches() == ["/api/v1/nodes/gpu-1", "/api/v1/nodes/gpu-1/status"]
    doc = parse_node_inventory(api.nodes["gpu-1"]["metadata"]["annotations"][GPU_INVENTORY])
    assert doc is not None and doc.gpus[1].mig is not None and doc.gpus[1].mig.instances[0].profile == "7g.40gb"
    assert api.nodes["gpu-1"]["status"]["capacity"][GPU_MILLI_RESOURCE] == "1k"


def test_api_failures_are_retried_with_backoff_and_never_raise(api: FakeNodeApi, caplog) -> None:
    clock = Clock()
    agent, _ = agent_for(api, "t4", clock)
    api.fail = 10**6
    for _ in range(100):
        agent.step()
        clock.t += 1.0
    attempts = len(api.requests)
    assert 3 <= attempts <= 12  # backoff, not one request per interval
    assert sum("cannot update the Node" in r.getMessage() for r in caplog.records) == 1
    assert agent.health().nvml_up  # the API server's trouble is not NVML's
    api.fail = 0
    for _ in range(200):
        agent.step()
        clock.t += 1.0
    assert GPU_INVENTORY in api.nodes["gpu-1"]["metadata"]["annotations"]
    assert api.nodes["gpu-1"]["status"]["capacity"][GPU_MILLI_RESOURCE] == "1k"


def test_a_node_without_shareable_gpus_gets_no_gpu_milli(api: FakeNodeApi) -> None:
    clock = Clock()
    agent, _ = agent_for(api, "h100/mig=7g.80gb@0", clock)
    agent.step()
    assert api.patches() == ["/api/v1/nodes/gpu-1"]
    assert GPU_MILLI_RESOURCE not in api.nodes["gpu-1"]["status"]["capacity"]


def test_no_publish_without_a_publisher(api: FakeNodeApi) -> None:
    agent = Agent(FakeNvml.from_spec("t4"), "gpu-1")
    agent.step()
    assert api.requests == []


def test_an_unreadable_gpu_keeps_the_published_inventory(api: FakeNodeApi, monkeypatch) -> None:
    clock = Clock()
    agent, fake = agent_for(api, "a100-40gb/mig=3g.20gb@0,a100-40gb", clock)
    agent.step()
    published = api.nodes["gpu-1"]["metadata"]["annotations"][GPU_INVENTORY]
    api.requests.clear()

    def denied(device: object, gpu_instance_id: int) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)  # no MIG monitor capability in the container

    monkeypatch.setattr(fake, "gpu_instance_info", denied)
    fake.set_mig_layout(1, None)  # another change on GPU 1, which reads fine
    clock.t += 5.0
    agent.step()
    assert api.requests == []  # GPU 0 is unreadable: publishing now would drop it
    assert api.nodes["gpu-1"]["metadata"]["annotations"][GPU_INVENTORY] == published
    sample, health = agent.state()
    assert health.nvml_up and sample is not None and [g.index for g in sample.gpus] == [1]


def test_overcommit_advertises_room_for_borrowed_shares(api: FakeNodeApi) -> None:
    fake = FakeNvml.from_spec("h100x2", hostname="gpu-1")
    publisher = NodePublisher(api.client(), "gpu-1", clock=Clock())
    Agent(fake, "gpu-1", publisher, milli_per_gpu=2000).step()
    assert api.nodes["gpu-1"]["status"]["allocatable"][GPU_MILLI_RESOURCE] == "4k"
