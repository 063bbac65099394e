"""The watcher against a small fake API server on loopback: pages, gzip, chunked watch streams, 410 and drops."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import kubernetes.client
import pytest

from policies.config import PlacementPolicy
from policies.inventory import Assignment
from scheduler.annotations import assignment_annotations
from scheduler.backoff import Backoff
from scheduler.model import ClusterModel
from scheduler.watch import ClusterWatcher, project_pod

# -- a fake kube-apiserver -------------------------------------------------------------------------------


class FakeApiServer:
    """Nodes and pods with resourceVersions and an event log; lists page and gzip, watches stream chunked JSON.

    Test controls: `expire()` makes every older resourceVersion 410 Gone, `drop_watches()` cuts open watch
    connections mid-stream, `bookmark()` sends a BOOKMARK to open watches.
    """

    def __init__(self) -> None:
        self.rv = 100
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"nodes": {}, "pods": {}}
        self.log: list[tuple[int, str, str, dict[str, Any]]] = []
        self.oldest_rv = 0
        self.drops = 0
        self.requests: list[tuple[str, str, dict[str, list[str]], dict[str, str]]] = []
        self.cond = threading.Condition()
        self.handlers: Callable[[Any], bool] | None = None  # optional hook: return True when handled
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.oldest_rv = 1 << 60
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def client(self) -> kubernetes.client.ApiClient:
        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        return kubernetes.client.ApiClient(cfg)

    # -- mutations ---------------------------------------------------------------------------------------
    @staticmethod
    def key(kind: str, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return meta["name"] if kind == "nodes" else f"{meta['namespace']}/{meta['name']}"

    def put(self, kind: str, obj: dict[str, Any], event: str | None = None) -> dict[str, Any]:
        with self.cond:
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = self.key(kind, obj)
            event = event or ("MODIFIED" if key in self.objects[kind] else "ADDED")
            self.objects[kind][key] = obj
            self.log.append((self.rv, kind, event, obj))
            self.cond.notify_all()
            return obj

    def delete(self, kind: str, key: str) -> None:
        with self.cond:
            obj = self.objects[kind].pop(key)
            self.rv += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
            self.log.append((self.rv, kind, "DELETED", obj))
            self.cond.notify_all()

    def expire(self) -> None:
        with self.cond:
            self.oldest_rv = self.rv + 1
            self.rv += 1
            self.cond.notify_all()

    def drop_watches(self) -> None:
        with self.cond:
            self.drops += 1
            self.cond.notify_all()

    def bookmark(self) -> None:
        with self.cond:
            self.rv += 1
            self.log.append((self.rv, "*", "BOOKMARK", {"metadata": {"resourceVersion": str(self.rv)}}))
            self.cond.notify_all()

    def watch_requests(self, kind: str) -> list[dict[str, list[str]]]:
        return [q for m, p, q, _ in self.requests if p.endswith("/" + kind) and q.get("watch") == ["true"]]

    # -- HTTP --------------------------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle(self) -> None:
                # the client may go away first: what a watcher that stops or relists does
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    super().handle()

            def _send(self, status: int, body: Any, gzip_ok: bool = False) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if gzip_ok and "gzip" in self.headers.get("Accept-Encoding", ""):
                    data = gzip.compress(data)
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _record(self) -> tuple[str, dict[str, list[str]]]:
                url = urlparse(self.path)
                query = parse_qs(url.query, keep_blank_values=True)
                fake.requests.append((self.command, url.path, query, dict(self.headers)))
                return url.path, query

            def do_GET(self) -> None:
                path, query = self._record()
                if fake.handlers and fake.handlers(self):
                    return
                kind = path.rsplit("/", 1)[-1]
                if path not in ("/api/v1/nodes", "/api/v1/pods"):
                    self._status(404, "NotFound", f"{path} not found")
                elif query.get("watch") == ["true"]:
                    self._watch(kind, int(query["resourceVersion"][0]), int(query["timeoutSeconds"][0]))
                else:
                    self._list(kind, query)

            def _list(self, kind: str, query: dict[str, list[str]]) -> None:
                if kind == "pods":
                    assert query["fieldSelector"] == ["spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"]
                limit = int(query.get("limit", ["0"])[0]) or 1 << 30
                with fake.cond:
                    if "continue" in query:
                        start, rv = (int(x) for x in query["continue"][0].split(":"))
                        if rv < fake.oldest_rv:
                            return self._status(410, "Expired", "The provided continue parameter is too old")
                        items = fake._snapshots[(kind, rv)]
                    else:
                        start, rv = 0, fake.rv
                        items = [copy.deepcopy(o) for _, o in sorted(fake.objects[kind].items())]
                        if kind == "pods":
                            items = [
                                p
                                for p in items
                                if p["spec"].get("nodeName")
                                and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
                            ]
                        fake._snapshots[(kind, rv)] = items
                page = items[start : start + limit]
                meta: dict[str, Any] = {"resourceVersion": str(rv)}
                if start + limit < len(items):
                    meta["continue"] = f"{start + limit}:{rv}"
                self._send(200, {"kind": "List", "metadata": meta, "items": page}, gzip_ok=True)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _watch(self, kind: str, rv: int, timeout_s: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                deadline = time.monotonic() + min(timeout_s, 600)
                with fake.cond:
                    drops = fake.drops
                if rv < fake.oldest_rv:
                    status = {
                        "kind": "Status",
                        "status": "Failure",
                        "reason": "Expired",
                        "code": 410,
                        "message": f"too old resource version: {rv} ({fake.oldest_rv})",
                    }
                    self._chunk(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                    self._chunk(b"")
                    return
                pos = next((i for i, entry in enumerate(fake.log) if entry[0] > rv), len(fake.log))
                while True:
                    with fake.cond:
                        fake.cond.wait_for(
                            lambda seen=pos: fake.drops != drops or time.monotonic() > deadline or len(fake.log) > seen,
                            timeout=0.05,
                        )
                        if fake.drops != drops:
                            break
                        pending = [(r, t, o) for r, k, t, o in fake.log[pos:] if k in (kind, "*")]
                        pos = len(fake.log)
                    if pending:
                        data = b"".join(json.dumps({"type": t, "object": o}).encode() + b"\n" for _, t, o in pending)
                        rv = pending[-1][0]
                        # split the data at an odd place: lines may straddle chunks
                        cut = max(1, len(data) // 3)
                        self._chunk(data[:cut])
                        self._chunk(data[cut:])
                    if time.monotonic() > deadline:
                        self._chunk(b"")
                        return
                # cut the connection without the final chunk
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

            def do_PATCH(self) -> None:
                self._record()
                assert fake.handlers is not None and fake.handlers(self)

            def do_POST(self) -> None:
                self._record()
                assert fake.handlers is not None and fake.handlers(self)

        self._snapshots: dict[tuple[str, int], list[dict[str, Any]]] = {}
        return Handler


# -- fixtures and builders -------------------------------------------------------------------------------


def gpu_node(name: str, gpus: int = 4, ready: str = "True", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.memory": "81920", **labels},
        },
        "spec": {},
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": "2026-01-01T00:00:00Z"}],
        },
    }


def gpu_pod(
    name: str,
    node: str | None,
    gpus: int = 1,
    uid: str | None = None,
    phase: str = "Running",
    annotations: dict[str, str] | None = None,
    cpu: str = "1",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "c",
                "resources": {
                    "requests": {"cpu": cpu, "memory": "1Gi", "nvidia.com/gpu": str(gpus)},
                    "limits": {"nvidia.com/gpu": str(gpus)},
                },
            }
        ]
    }
    if node:
        spec["nodeName"] = node
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": uid or f"uid-{name}",
            "annotations": annotations or {},
        },
        "spec": spec,
        "status": {"phase": phase},
    }


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


def make_watcher(fake: FakeApiServer, **kw: Any) -> tuple[ClusterWatcher, ClusterModel]:
    model = ClusterModel(PlacementPolicy())
    options: dict[str, Any] = {"page_size": 2, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, **kw}
    return ClusterWatcher(fake.client(), model, **options), model


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    assert check(), "condition not reached in time"


def placed(model: ClusterModel) -> dict[str, str]:
    return {k: a.node for k, a in model.assignments().items()}


# -- tests -----------------------------------------------------------------------------------------------


def test_initial_list_pages_gzip_and_ready(fake: FakeApiServer) -> None:
    for i in range(5):
        fake.put("nodes", gpu_node(f"n{i}"))
    fake.put("nodes", {**gpu_node("cpu-only", gpus=0)})
    fake.put("nodes", gpu_node("cordoned") | {"spec": {"unschedulable": True}})
    fake.put("pods", gpu_pod("a", "n0"))
    fake.put("pods", gpu_pod("b", "n1", gpus=2))
    fake.put("pods", gpu_pod("pending", None))
    fake.put("pods", gpu_pod("done", "n2", phase="Succeeded"))
    watcher, model = make_watcher(fake)
    assert not model.ready
    with watcher:
        assert watcher.wait_ready(5)
        assert model.ready
        assert model.snapshot().names == ("n0", "n1", "n2", "n3", "n4")
        assert placed(model) == {"uid-a": "n0", "uid-b": "n1"}
    lists = [(p, q) for m, p, q, h in fake.requests if "watch" not in q]
    assert len([p for p, _ in lists if p == "/api/v1/nodes"]) == 4  # 7 nodes, 2 a page
    assert all(q["limit"] == ["2"] for _, q in lists)
    assert all("gzip" in h.get("Accept-Encoding", "") for _, _, _, h in fake.requests)
    assert watcher.stats.lists == 2 and watcher.stats.unknown_gpu_pods == 2  # bound without our annotation


def test_events_bind_release_and_ignore_noise(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    watcher, model = make_watcher(fake)
    with watcher:
        assert watcher.wait_ready(5)
        publishes = watcher.stats.node_publishes
        pod = gpu_pod("a", None)
        fake.put("pods", pod)  # pending: filtered by the server in a real cluster, ignored here too
        annotations = assignment_annotations(Assignment("n0", 1000, 1024, (2,), 1000))
        fake.put("pods", gpu_pod("a", "n0", annotations=annotations))
        eventually(lambda: "uid-a" in placed(model))
        assignment = model.assignment_of("uid-a")
        assert assignment is not None and assignment.gpus == (2,)
        assert watcher.stats.unknown_gpu_pods == 0
        # a heartbeat changes nothing the model holds: no new node set is published
        heartbeat = gpu_node("n0")
        heartbeat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:05:00Z"
        fake.put("nodes", heartbeat)
        fake.put("pods", gpu_pod("a", "n0", annotations=annotations) | {"status": {"phase": "Running", "x": 1}})
        fake.delete("pods", "default/a")
        eventually(lambda: "uid-a" not in placed(model))
        assert watcher.stats.node_publishes == publishes
        # a label change is published; a node going NotReady leaves the model
        fake.put("nodes", gpu_node("n0", zone="z1"))
        eventually(lambda: model.snapshot().inventories[0].labels.get("zone") == "z1")
        fake.put("nodes", gpu_node("n0", ready="False"))
        eventually(lambda: model.snapshot().names == ())


def test_pod_on_a_node_seen_later_is_applied_when_it_appears(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    fake.put("pods", gpu_pod("early", "n9"))
    watcher, model = make_watcher(fake)
    with watcher:
        assert watcher.wait_ready(5)
        assert placed(model) == {}
        fake.put("nodes", gpu_node("n9"))
        eventually(lambda: placed(model) == {"uid-early": "n9"})
        fake.delete("nodes", "n9")
        eventually(lambda: placed(model) == {})
        fake.put("nodes", gpu_node("n9"))  # back again (e.g. Ready again): its pods follow
        eventually(lambda: placed(model) == {"uid-early": "n9"})


def test_gone_forces_a_relist(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    fake.put("pods", gpu_pod("a", "n0"))
    watcher, model = make_watcher(fake)
    with watcher:
        assert watcher.wait_ready(5)
        eventually(lambda: len(fake.watch_requests("pods")) == 1)
        fake.expire()  # the history the open watches would resume from is gone
        fake.drop_watches()
        fake.delete("pods", "default/a")
        fake.put("pods", gpu_pod("b", "n0"))
        fake.expire()
        eventually(lambda: placed(model) == {"uid-b": "n0"})
        eventually(lambda: watcher.stats.relists >= 2)
        # after the relist the watch resumes from the new list's resourceVersion
        fake.put("pods", gpu_pod("c", "n0"))
        eventually(lambda: placed(model) == {"uid-b": "n0", "uid-c": "n0"})


def test_expired_continue_token_restarts_the_list(fake: FakeApiServer) -> None:
    for i in range(5):
        fake.put("nodes", gpu_node(f"n{i}"))
    calls = {"n": 0}

    def expire_mid_list(handler: Any) -> bool:
        if "continue=" in handler.path and "nodes" in handler.path and calls["n"] == 0:
            calls["n"] += 1
            fake.expire()
        return False

    fake.handlers = expire_mid_list
    watcher, model = make_watcher(fake)
    with watcher:
        assert watcher.wait_ready(5)
        assert len(model.snapshot().names) == 5
    assert watcher.stats.relists >= 1


def test_dropped_connection_resumes_without_relisting(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    watcher, model = make_watcher(fake)
    with watcher:
        assert watcher.wait_ready(5)
        fake.put("pods", gpu_pod("a", "n0"))
        eventually(lambda: "uid-a" in placed(model))
        for round_ in range(3):
            fake.drop_watches()
            fake.put("pods", gpu_pod(f"x{round_}", "n0"))
        eventually(lambda: {"uid-x0", "uid-x1", "uid-x2"} <= set(placed(model)))
        assert watcher.stats.lists == 2  # resumed from resourceVersions, never listed again
        assert watcher.stats.reconnects >= 1


def test_bookmarks_advance_the_resume_point(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    watcher, _ = make_watcher(fake)
    with watcher:
        assert watcher.wait_ready(5)
        eventually(lambda: len(fake.watch_requests("pods")) == 1)
        assert fake.watch_requests("pods")[0]["allowWatchBookmarks"] == ["true"]
        fake.bookmark()
        eventually(lambda: watcher.stats.bookmarks >= 2)  # one per stream
        bookmark_rv = str(fake.rv)
        fake.drop_watches()
        eventually(lambda: len(fake.watch_requests("pods")) >= 2)
        assert fake.watch_requests("pods")[-1]["resourceVersion"] == [bookmark_rv]


def test_server_timeout_reopens_the_watch(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    watcher, model = make_watcher(fake, watch_timeout_s=0)
    with watcher:
        assert watcher.wait_ready(5)
        eventually(lambda: watcher.stats.watch_restarts >= 4)
        fake.put("pods", gpu_pod("a", "n0"))
        eventually(lambda: "uid-a" in placed(model))
        assert watcher.stats.lists == 2 and watcher.stats.relists == 0


def test_server_errors_back_off_then_recover(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    failures = {"n": 3}

    def flaky(handler: Any) -> bool:
        if failures["n"] > 0 and "pods" in handler.path:
            failures["n"] -= 1
            handler._status(500, "InternalError", "etcd is sad")
            return True
        return False

    fake.handlers = flaky
    watcher, _ = make_watcher(fake)
    with watcher:
        assert watcher.wait_ready(5)
    assert watcher.stats.reconnects == 3


def test_stop_interrupts_a_blocked_watch(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    watcher, _ = make_watcher(fake, watch_timeout_s=600)
    watcher.start()
    assert watcher.wait_ready(5)
    eventually(lambda: len(fake.watch_requests("pods")) == 1)
    time.sleep(0.1)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 2.0
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("watch-"))


def test_backoff_is_capped_and_jittered() -> None:
    values = iter([0.0, 1.0] * 20)
    backoff = Backoff(0.5, 4.0, rng=lambda: next(values))
    delays = [backoff.next() for _ in range(8)]
    assert delays[:4] == [0.25, 1.0, 1.0, 4.0]  # half fixed + random half of 0.5, 1, 2, 4
    assert max(delays) == 4.0 and min(delays[4:]) == 2.0
    backoff.reset()
    assert backoff.next() == 0.25


def test_project_pod() -> None:
    assert project_pod(gpu_pod("a", None)) is None
    assert project_pod(gpu_pod("a", "n0", phase="Failed")) is None
    record = project_pod(gpu_pod("a", "n0", gpus=2))
    assert record is not None and record.node == "n0" and record.demand.gpu_count == 2 and not record.gpu_known
    bad = gpu_pod("a", "n0")
    bad["spec"]["containers"][0]["resources"]["requests"]["gpu-extender.io/gpu-milli"] = "1500"
    record = project_pod(bad)
    assert record is not None and not record.valid and record.assignment.cpu_milli == 1000
    cpu_only = gpu_pod("a", "n0", gpus=0)
    record = project_pod(cpu_only)
    assert record is not None and record.gpu_known and record.assignment.memory_mib == 1024


def test_many_events_cost(fake: FakeApiServer) -> None:
    """Per-event CPU (decode + project) and the publisher's share, printed for the report."""
    for i in range(20):
        fake.put("nodes", gpu_node(f"n{i}", gpus=8))
    watcher, model = make_watcher(fake, page_size=500)
    with watcher:
        assert watcher.wait_ready(5)
        n = 2000
        for i in range(n):
            fake.put("pods", gpu_pod(f"p{i}", f"n{i % 20}", gpus=0, cpu="100m"))
        eventually(lambda: len(placed(model)) == n, timeout_s=30)
        stats = watcher.stats
        per_event_us = stats.event_cpu_s / stats.events * 1e6
        publish_us = stats.publish_cpu_s / stats.events * 1e6
        print(
            f"\nwatch event: decode+project {per_event_us:.0f} us, model update {publish_us:.0f} us "
            f"({stats.batches} batches for {stats.events} events)"
        )
        assert per_event_us < 2000


def test_an_unreadable_object_is_skipped_not_retried_forever(fake: FakeApiServer) -> None:
    fake.put("nodes", gpu_node("n0"))
    watcher, model = make_watcher(fake)
    nodes, pods = watcher._kinds

    def fragile(obj: dict[str, Any]) -> Any:
        if obj["metadata"]["name"] == "odd":
            raise RuntimeError("a shape nobody expected")
        return pods.project(obj)

    watcher._kinds = (nodes, dataclasses.replace(pods, project=fragile))
    with watcher:
        assert watcher.wait_ready(5)
        fake.put("pods", gpu_pod("odd", "n0"))
        fake.put(
            "pods",
            {
                "metadata": {"name": "bad-spec", "namespace": "default", "uid": "u-bad"},
                "spec": {"nodeName": "n0", "containers": "not a list"},
                "status": {},
            },
        )
        fake.put("nodes", {"metadata": {"name": "n1", "labels": None, "annotations": 7}, "status": {}})
        fake.put("pods", gpu_pod("after", "n0"))
        eventually(lambda: "uid-after" in placed(model))
        assert watcher.stats.unreadable == 1 and watcher.stats.reconnects == 0
        assert "uid-odd" not in placed(model) and "u-bad" not in placed(model)


def test_namespace_of_follows_the_watched_pods(fake: FakeApiServer) -> None:
    """The per-namespace GPU-seconds counters learn a pod's namespace from the watch (the model keys by UID)."""
    fake.put("nodes", gpu_node("n0"))
    pod = gpu_pod("a", "n0")
    pod["metadata"]["namespace"] = "team-a"
    fake.put("pods", pod)
    watcher, _ = make_watcher(fake)
    with watcher:
        assert watcher.wait_ready(5)
        assert watcher.namespace_of("uid-a") == "team-a"
        assert watcher.namespace_of("uid-unknown") is None
        fake.put("pods", gpu_pod("b", "n0"))
        eventually(lambda: watcher.namespace_of("uid-b") == "default")
