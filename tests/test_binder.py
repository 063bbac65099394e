"""Binding through a fake API server that answers like kube-apiserver v1.36 does, and the in-memory binder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest

from scheduler.binder import BindError, KubernetesBinder, MemoryBinder
from tests.test_watch import FakeApiServer, gpu_pod

# Messages as kube-apiserver v1.36 sends them (captured against the real server).
ALREADY = 'Operation cannot be fulfilled on pods/binding "{name}": pod {name} is already assigned to node "{node}"'
UID_PRECONDITION = (
    'Operation cannot be fulfilled on pods "{name}": StorageError: invalid object, Code: 4, '
    "Precondition failed: UID in precondition: {want}, UID in object meta: {have}"
)


class PodApi:
    """The pod endpoints bind uses: GET and POST binding (which, like kube-apiserver, copies the Binding's
    annotations onto the pod in the same write)."""

    def __init__(self, fake: FakeApiServer) -> None:
        self.fake = fake
        self.pods: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.fail_bind: int | None = None
        fake.handlers = self.handle

    def add(self, pod: dict[str, Any]) -> None:
        self.pods[pod["metadata"]["name"]] = pod

    def handle(self, h: Any) -> bool:
        parts = h.path.split("?")[0].strip("/").split("/")
        if parts[:4] != ["api", "v1", "namespaces", "default"] or len(parts) < 6:
            return False
        name = parts[5]
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0)) or 0) or b"null")
        self.calls.append((h.command, "/".join(parts[4:]), body))
        pod = self.pods.get(name)
        if pod is None:
            h._status(404, "NotFound", f'pods "{name}" not found')
        elif h.command == "GET":
            h._send(200, pod)
        else:  # POST binding
            assert parts[6:] == ["binding"] and body["kind"] == "Binding" and body["target"]["kind"] == "Node"
            want, have = body["metadata"].get("uid"), pod["metadata"]["uid"]
            if self.fail_bind:
                h._status(self.fail_bind, "InternalError", "etcd timeout")
            elif want and want != have:
                h._status(409, "Conflict", UID_PRECONDITION.format(name=name, want=want, have=have))
            elif pod["spec"].get("nodeName"):
                h._status(409, "Conflict", ALREADY.format(name=name, node=pod["spec"]["nodeName"]))
            else:
                pod["spec"]["nodeName"] = body["target"]["name"]
                pod["metadata"].setdefault("annotations", {}).update(body["metadata"].get("annotations") or {})
                h._send(201, {"kind": "Status", "status": "Success", "code": 201})
        return True


@pytest.fixture
def api() -> Iterator[tuple[PodApi, KubernetesBinder]]:
    with FakeApiServer() as fake:
        pods = PodApi(fake)
        yield pods, KubernetesBinder(fake.client())


def test_bind_annotates_and_binds_in_one_write(api: tuple[PodApi, KubernetesBinder]) -> None:
    pods, binder = api
    pods.add(gpu_pod("p", None, uid="u1"))
    binder.bind("default", "p", "u1", "n1", {"gpu-extender.io/gpu-indices": "0"})
    assert [(m, p) for m, p, _ in pods.calls] == [("POST", "pods/p/binding")]
    binding = pods.calls[0][2]
    annotations = {"gpu-extender.io/gpu-indices": "0"}
    assert binding["metadata"] == {"name": "p", "namespace": "default", "uid": "u1", "annotations": annotations}
    assert binding["target"] == {"apiVersion": "v1", "kind": "Node", "name": "n1"}
    assert pods.pods["p"]["spec"]["nodeName"] == "n1"
    assert pods.pods["p"]["metadata"]["annotations"]["gpu-extender.io/gpu-indices"] == "0"


def test_repeated_bind_to_the_same_node_succeeds(api: tuple[PodApi, KubernetesBinder]) -> None:
    pods, binder = api
    pods.add(gpu_pod("p", None, uid="u1"))
    binder.bind("default", "p", "u1", "n1", {"a": "1"})
    binder.bind("default", "p", "u1", "n1", {"a": "1"})
    with pytest.raises(BindError, match=r'already bound to n1, not n2: .*already assigned to node "n1"'):
        binder.bind("default", "p", "u1", "n2", {"a": "1"})


def test_recreated_pod_is_not_touched(api: tuple[PodApi, KubernetesBinder]) -> None:
    pods, binder = api
    pods.add(gpu_pod("p", None, uid="new"))
    with pytest.raises(BindError, match="recreated"):
        binder.bind("default", "p", "old", "n1", {"a": "1"})
    with pytest.raises(BindError, match=r"recreated \(uid new, scheduled old\)"):
        binder.bind("default", "p", "old", "n1", {})  # no patch: the binding's own precondition catches it
    assert "nodeName" not in pods.pods["p"]["spec"]
    assert "a" not in pods.pods["p"]["metadata"]["annotations"]


def test_errors_are_readable(api: tuple[PodApi, KubernetesBinder]) -> None:
    pods, binder = api
    with pytest.raises(BindError, match="no longer exists"):
        binder.bind("default", "gone", "u", "n1", {"a": "1"})
    with pytest.raises(BindError, match="no longer exists"):
        binder.bind("default", "gone", "u", "n1", {})
    pods.add(gpu_pod("p", None, uid="u1"))
    pods.fail_bind = 500
    with pytest.raises(BindError, match="binding pod default/p to n1 failed: HTTP 500: etcd timeout"):
        binder.bind("default", "p", "u1", "n1", {"a": "1"})
    assert "nodeName" not in pods.pods["p"]["spec"]
    with pytest.raises(BindError, match='cannot read pod default/zz: pods "zz" not found'):
        binder.get_pod("default", "zz")


def test_get_pod(api: tuple[PodApi, KubernetesBinder]) -> None:
    pods, binder = api
    pods.add(gpu_pod("p", "n3", uid="u1"))
    assert binder.get_pod("default", "p")["spec"]["nodeName"] == "n3"


def test_each_request_carries_the_token_of_that_moment() -> None:
    """Service account tokens rotate: the configuration's refresh hook runs before every request, as the client's
    own calls do, and the client's default headers (its User-Agent) go along."""
    with FakeApiServer() as fake:
        pods = PodApi(fake)
        pods.add(gpu_pod("p", None, uid="u1"))
        client = fake.client()
        client.user_agent = "gpu-extender-test"
        tokens = iter(["first", "second"])
        cfg = client.configuration
        cfg.api_key["BearerToken"] = "expired"  # what the in-cluster configuration read at start
        cfg.api_key_prefix["BearerToken"] = "Bearer"
        cfg.refresh_api_key_hook = lambda c: c.api_key.update(BearerToken=next(tokens))
        binder = KubernetesBinder(client)
        binder.get_pod("default", "p")
        binder.bind("default", "p", "u1", "n1", {"a": "1"})
    sent = [{k.lower(): v for k, v in headers.items()} for _, _, _, headers in fake.requests]
    assert [(h["authorization"], h["user-agent"]) for h in sent] == [
        ("Bearer first", "gpu-extender-test"),
        ("Bearer second", "gpu-extender-test"),
    ]
    assert sent[1]["content-type"] == "application/json"


def test_unreachable_api_server() -> None:
    cfg = kubernetes.client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # discard port: nothing listens
    cfg.retries = 0
    binder = KubernetesBinder(kubernetes.client.ApiClient(cfg), timeout_s=1.0)
    with pytest.raises(BindError, match="unreachable"):
        binder.bind("default", "p", "u", "n1", {"a": "1"})


def test_memory_binder() -> None:
    binder = MemoryBinder()
    binder.add_pod(gpu_pod("p", None, uid="u1"))
    binder.bind("default", "p", "u1", "n1", {"x": "1"})
    binder.bind("default", "p", "u1", "n1", {"x": "1"})  # idempotent
    with pytest.raises(BindError, match="already bound to n1"):
        binder.bind("default", "p", "u1", "n2", {})
    with pytest.raises(BindError, match="recreated"):
        binder.bind("default", "p", "u2", "n1", {})
    pod = binder.get_pod("default", "p")
    assert pod["spec"]["nodeName"] == "n1" and pod["metadata"]["annotations"]["x"] == "1"
    assert binder.bindings["default/p"].node == "n1"
    with pytest.raises(BindError, match="not known"):
        binder.get_pod("default", "other")
    assert binder.unbind("default", "p") is not None
    binder.bind("default", "p", "u2", "n2", {})
    assert binder.get_pod("default", "p")["spec"]["nodeName"] == "n2"
