"""The HTTP layer: bad input gets a clear 4xx, a decision it cannot make gets the protocol's Error, never a 500."""

from __future__ import annotations

import asyncio
import copy
import logging

import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from extender.app import ExtenderApp, create_app
from extender.metrics import ExtenderMetrics, FleetCollector
from extender.serve import fleet_service
from extender.wire import ExtenderFilterResult, filter_result
from policies.config import PlacementPolicy
from scheduler.model import ClusterModel
from scheduler.service import PlacementService
from tests.helpers import node
from tests.test_wire_replay import FLEET, captured


@pytest.fixture
def client() -> TestClient:
    service = fleet_service(str(FLEET), PlacementPolicy())
    return TestClient(create_app(service, ExtenderMetrics(service.model)), raise_server_exceptions=False)


def gpu_pod(resources: dict[str, str], annotations: dict[str, str] | None = None, uid: str = "u-1") -> dict:
    pod = copy.deepcopy(captured("filter-001")["Pod"])
    pod["metadata"]["uid"] = uid
    pod["metadata"]["annotations"] = annotations or {}
    pod["spec"]["containers"][0]["resources"] = {"requests": resources, "limits": resources}
    return pod


def filter_args(pod: dict, names: list[str] | None = None) -> dict:
    return {"Pod": pod, "Nodes": None, "NodeNames": names or ["gpu-a", "gpu-b", "gpu-c", "gpu-p"]}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"NodeNames": ["a"]}', "Pod: Field required"),
        (b'{"Pod": {}, "NodeNames": "gpu-a"}', "NodeNames: Input should be a valid list"),
    ],
)
def test_malformed_filter_bodies_get_400(client: TestClient, body: bytes, needle: str) -> None:
    reply = client.post("/filter", content=body)
    assert reply.status_code == 400
    assert needle in reply.json()["Error"]


def test_malformed_bind_gets_400(client: TestClient) -> None:
    reply = client.post("/bind", json={"PodName": "p"})
    assert reply.status_code == 400 and "PodNamespace" in reply.json()["Error"]


def test_unreadable_pod_is_rejected_everywhere_with_the_reason(client: TestClient) -> None:
    pod = gpu_pod({"nvidia.com/gpu": "1", "gpu-extender.io/gpu-milli": "500"})
    body = client.post("/filter", json=filter_args(pod)).json()
    assert body["NodeNames"] == [] and body["Error"] == ""
    assert set(body["FailedAndUnresolvableNodes"]) == {"gpu-a", "gpu-b", "gpu-c", "gpu-p"}
    assert "cannot read the pod's request" in body["FailedAndUnresolvableNodes"]["gpu-a"]


def test_pod_that_fits_nowhere_is_not_an_error(client: TestClient) -> None:
    body = client.post("/filter", json=filter_args(gpu_pod({"nvidia.com/gpu": "16"}))).json()
    assert body["Error"] == "" and body["NodeNames"] == []
    assert body["FailedAndUnresolvableNodes"]["gpu-b"] == "node has fewer GPUs than requested"


def test_unknown_node_names_are_rejected_not_crashed_on(client: TestClient) -> None:
    body = client.post("/filter", json=filter_args(gpu_pod({"nvidia.com/gpu": "1"}), ["gpu-a", "ghost"])).json()
    assert body["NodeNames"] == ["gpu-a"]
    assert "ghost" in body["FailedAndUnresolvableNodes"]


def test_gpu_type_constraint(client: TestClient) -> None:
    pod = gpu_pod({"nvidia.com/gpu": "1"}, {"gpu-extender.io/gpu-types": "A100"})
    assert client.post("/filter", json=filter_args(pod)).json()["NodeNames"] == ["gpu-a"]


def test_not_ready_answers_with_the_protocol_error() -> None:
    model = ClusterModel(PlacementPolicy())  # never marked ready
    app = create_app(PlacementService(model, binder=None), ExtenderMetrics(model))  # type: ignore[arg-type]
    client = TestClient(app)
    body = client.post("/filter", json=filter_args(gpu_pod({"nvidia.com/gpu": "1"}))).json()
    assert "not ready" in body["Error"] and body["NodeNames"] == []
    assert client.get("/readyz").status_code == 503
    scores = client.post("/prioritize", json=filter_args(gpu_pod({"nvidia.com/gpu": "1"}))).json()
    assert {s["Score"] for s in scores} == {0}


def test_shares_pack_onto_one_gpu_and_never_overbook(client: TestClient) -> None:
    placed = []
    for i in range(5):
        pod = gpu_pod({"gpu-extender.io/gpu-milli": "300"}, uid=f"share-{i}")
        args = filter_args(pod, ["gpu-p"])
        passed = client.post("/filter", json=args).json()["NodeNames"]
        if not passed:
            placed.append(None)
            continue
        reply = client.post(
            "/bind", json={"PodName": f"s{i}", "PodNamespace": "default", "PodUID": f"share-{i}", "Node": "gpu-p"}
        ).json()
        assert reply == {"Error": ""}
        placed.append(client.app.state.service.model.assignment_of(f"share-{i}").gpus)
    # 3 x 300 on GPU 0 (900), then GPU 1; a GPU is never above 1000.
    assert placed[:3] == [(0,), (0,), (0,)] and placed[3] == (1,)
    snapshot = client.app.state.service.model.snapshot()
    assert (snapshot.gpu_free >= 0).all()


def test_explain_lists_every_node_with_its_reason(client: TestClient) -> None:
    pod = gpu_pod({"nvidia.com/gpu": "4"}, {"gpu-extender.io/gpu-types": "H100"})
    nodes = client.post("/explain", json={"Pod": pod}).json()["nodes"]
    verdicts = {n["node"]: n for n in nodes}
    assert verdicts["gpu-a"]["reason"] == "GPU model not allowed by the pod"
    assert verdicts["gpu-b"]["fits"] and "fragmentation" in verdicts["gpu-b"]["components"]
    assert verdicts["gpu-b"]["placement"]["gpus"] == [0, 1, 2, 3]


def test_metrics_expose_latency_and_fleet(client: TestClient) -> None:
    client.post("/filter", json=filter_args(gpu_pod({"nvidia.com/gpu": "16"})))
    text = client.get("/metrics").text
    assert 'gpu_extender_request_duration_seconds_count{verb="filter"} 1.0' in text
    assert 'gpu_extender_rejections_total{reason="node has fewer GPUs than requested"} 4.0' in text
    assert "gpu_extender_gpus 22.0" in text
    assert "\ngpu_extender_cpu_stranded_gpus " in text


def test_fleet_metrics_count_gpus_their_nodes_cpu_cannot_feed() -> None:
    model = ClusterModel(PlacementPolicy())
    model.replace_nodes([node("starved", gpus=4, cpu=8_000), node("fed", gpus=4, cpu=64_000)])
    registry = CollectorRegistry()
    registry.register(FleetCollector(model))
    ratio = model.view().shapes.cpu_per_gpu_milli  # the policy's default shapes: about 8 cores per GPU
    expected = (4000 - 8000 / ratio) / 1000
    assert registry.get_sample_value("gpu_extender_cpu_stranded_gpus") == pytest.approx(expected)
    assert 2.5 < expected < 3.5


def test_filter_reply_has_the_wire_shape() -> None:
    failed, unresolvable = {"b": "insufficient CPU"}, {"c": "GPU model not allowed by the pod"}
    assert (
        filter_result(["a"], failed, unresolvable)
        == ExtenderFilterResult(
            NodeNames=["a"], FailedNodes=failed, FailedAndUnresolvableNodes=unresolvable
        ).model_dump()
    )
    assert filter_result([], error="down") == ExtenderFilterResult(Error="down").model_dump()


def test_hot_verbs_count_and_time_every_outcome(client: TestClient) -> None:
    pod = gpu_pod({"nvidia.com/gpu": "1"}, uid="m-1")
    assert client.post("/filter", json=filter_args(pod)).json()["NodeNames"]
    scores = client.post("/prioritize", json=filter_args(pod, ["gpu-a", "gpu-b"])).json()
    best = max(scores, key=lambda s: s["Score"])["Host"]
    bind = {"PodName": "m", "PodNamespace": "default", "PodUID": "m-1", "Node": best}
    assert client.post("/bind", json=bind).json() == {"Error": ""}
    assert "already holds GPUs" in client.post("/bind", json={**bind, "Node": "gpu-p"}).json()["Error"]
    text = client.get("/metrics").text
    for verb in ("filter", "prioritize", "bind"):
        assert f'gpu_extender_request_duration_seconds_count{{verb="{verb}"}}' in text
    assert 'gpu_extender_decisions_total{outcome="ok",verb="prioritize"} 1.0' in text
    assert 'gpu_extender_decisions_total{outcome="ok",verb="bind"} 1.0' in text
    assert 'gpu_extender_decisions_total{outcome="error",verb="bind"} 1.0' in text


def test_other_methods_and_paths_reach_the_full_app(client: TestClient) -> None:
    assert client.get("/filter").status_code == 405
    assert client.post("/nothing", json={}).status_code == 404
    reply = client.post("/prioritize", content=b"{")
    assert reply.status_code == 400 and reply.headers["content-type"] == "application/json"
    assert "not valid JSON" in reply.json()["Error"]


async def _asgi_post(app: ExtenderApp, path: str, chunks: list[bytes | None]) -> list[dict]:
    """Drive the ASGI app directly: each chunk a body message, None a disconnect."""
    last = len(chunks) - 1
    messages = [
        {"type": "http.disconnect"} if c is None else {"type": "http.request", "body": c, "more_body": i < last}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    return sent


def test_a_body_in_several_parts_and_a_client_gone_away(client: TestClient) -> None:
    app = client.app
    body = orjson.dumps(filter_args(gpu_pod({"nvidia.com/gpu": "1"})))
    sent = asyncio.run(_asgi_post(app, "/filter", [body[:100], body[100:2000], body[2000:]]))
    assert sent[0]["status"] == 200
    assert (b"content-length", str(len(sent[1]["body"])).encode()) in sent[0]["headers"]
    assert orjson.loads(sent[1]["body"])["NodeNames"]
    assert asyncio.run(_asgi_post(app, "/filter", [body[:100], None])) == []


def test_filter_scores_the_passed_names_ahead_of_prioritize(client: TestClient) -> None:
    service = client.app.state.service
    pod = gpu_pod({"nvidia.com/gpu": "1"}, uid="ahead")
    passed = client.post("/filter", json=filter_args(pod)).json()["NodeNames"]
    assert len(passed) > 1
    hits = service.score_cache.hits
    scores = client.post("/prioritize", json=filter_args(pod, passed)).json()
    assert service.score_cache.hits == hits + 1
    assert [s["Host"] for s in scores] == passed and [s["Score"] for s in scores].count(10) == 1


def assert_bind_takes_what_is_held(client: TestClient, uid: str, node: str) -> None:
    """The pod's placement on `node` is held once the verb has answered, and bind takes exactly that placement."""
    service = client.app.state.service
    held = service.model.assignment_of(uid)
    assert held is not None and held.node == node, "held after the answer, before bind"
    planned = service.score_cache.planned_hits
    reply = client.post("/bind", json={"PodName": "p", "PodNamespace": "default", "PodUID": uid, "Node": node})
    assert reply.json() == {"Error": ""}
    assert service.model.assignment_of(uid) == held and service.score_cache.planned_hits == planned + 1


def test_a_shortlisting_filter_holds_its_node_once_answered_and_bind_takes_it() -> None:
    policy = PlacementPolicy.model_validate({"extenderScoring": {"shortlist": 1}})
    service = fleet_service(str(FLEET), policy)
    client = TestClient(create_app(service, ExtenderMetrics(service.model)), raise_server_exceptions=False)
    pod = gpu_pod({"nvidia.com/gpu": "1"}, uid="held")
    (node,) = client.post("/filter", json=filter_args(pod)).json()["NodeNames"]
    assert_bind_takes_what_is_held(client, "held", node)


def test_prioritize_holds_its_best_node_once_answered_and_bind_takes_it(client: TestClient) -> None:
    service = client.app.state.service
    pod = gpu_pod({"nvidia.com/gpu": "1"}, uid="ranked")
    passed = client.post("/filter", json=filter_args(pod)).json()["NodeNames"]
    assert len(passed) > 1 and service.model.assignment_of("ranked") is None, "filter holds only a shortlist of one"
    scores = client.post("/prioritize", json=filter_args(pod, passed)).json()
    assert_bind_takes_what_is_held(client, "ranked", next(s["Host"] for s in scores if s["Score"] == 10))


def test_rejections_are_logged_with_the_pod_and_the_reasons(client: TestClient, caplog) -> None:
    pod = gpu_pod({"nvidia.com/gpu": "16"}, uid="big")
    pod["metadata"].update(namespace="team-a", name="trainer")
    with caplog.at_level(logging.INFO, logger="gpu_extender"):
        reply = client.post("/filter", json=filter_args(pod)).json()
    assert reply["NodeNames"] == [] and reply["FailedAndUnresolvableNodes"]
    (record,) = [r for r in caplog.records if r.getMessage() == "rejected nodes"]
    assert record.pod == "team-a/trainer"  # type: ignore[attr-defined]
    assert sum(record.reasons.values()) == 4  # type: ignore[attr-defined]  # every node asked about, by reason
