"""Pre-warming through the real control plane: the extender's pre-warmer (`serve --prewarm`) reads a request log,
the histogram forecaster learns a model's idle times, and ahead of the next forecast request it raises the model's
Deployment from zero; kube-controller-manager creates the pod, kube-scheduler and the extender place it on a node
that holds the model's weights, and kwok (the kubelet simulator) makes it Ready after a cold start. A burst that
comes as forecast finds the replica Ready; a forecast that does not come true gives the capacity back. When the
autoscaler scales the Deployment up for the burst, herd control lets at most one replica load per node at a time.

Times are compressed: requests every 40 s, idle-time bins of 10 s, a cold start of 4 s.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from e2e import fleet, helpers, stack
from e2e.controlplane import ControlPlane
from e2e.helpers import POOL_LABEL, Stack
from e2e.kwok import MANAGED_LABEL, READY_DELAY, READY_JITTER, start_kwok
from scheduler.annotations import GPU_INVENTORY, GpuDoc, NodeInventoryDoc
from scheduler.kubeapi import read_json
from scheduler.podspec import ANNOTATION_GPU_MEMORY, ANNOTATION_MODEL, GPU_MILLI_RESOURCE
from scheduler.prewarm.cluster import PLACEHOLDERS, PREWARM_LABEL, RAISED_FROM
from scheduler.prewarm.placeholders import PLACEHOLDER_FOR

pytestmark = pytest.mark.e2e

NS = "prewarm-live"
POOL = "prewarm"
H100 = "NVIDIA-H100-80GB-HBM3"
SMALL = "meta-llama/Llama-3.2-1B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"
GEMMA = "google/gemma-2-9b-it"
CACHED = ("prewarm-0", "prewarm-1")  # nodes whose disks hold SMALL's weights
NODES = (*CACHED, "prewarm-2")
PERIOD_S, SERVICE_S, BIN_S, COLD_START = 40.0, 2.0, 10.0, "4s"
START_S = 15.0  # what the pre-warmer counts for a start: the cold start, and the control plane's own latency
# The histogram policy on idle times of 38 s with 10 s bins: a window from 27 s (38 s down to its bin, less 10 %)
# to 44 s (up to the next bin, plus 10 %) after the model went idle; the floor goes up one start (15 s) before it.
OPENS_S, CLOSES_S = 27.0 - START_S, 44.0


def inventory(name: str, models: tuple[str, ...]) -> str:
    gpus = [GpuDoc(index=i, uuid=f"GPU-{name}-{i}", model=H100, memoryMiB=81559) for i in range(2)]
    doc = NodeInventoryDoc(v=1, gpus=gpus, cachedModels=list(models) or None)
    return doc.model_dump_json(by_alias=True, exclude_none=True)


@pytest.fixture(scope="module")
def request_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prewarm") / "requests.csv"
    path.write_text("timestamp,model,service_time\n")
    return path


@pytest.fixture(scope="module")
def system(
    control_plane: ControlPlane, api_client: kubernetes.client.ApiClient, request_log: Path, tmp_path_factory: Any
) -> Iterator[Stack]:
    helpers.create_namespace(api_client, NS)
    nodes = []
    for name in NODES:
        annotations = {GPU_INVENTORY: inventory(name, (SMALL,) if name in CACHED else ())}
        nodes.append(fleet.gpu_node(name, 2, H100, labels={MANAGED_LABEL: "true"}, annotations=annotations))
    names = fleet.create_nodes(api_client, helpers.pool_nodes(nodes, POOL))
    policy = yaml.safe_load(stack.SHIPPED_POLICY.read_text())
    policy["coldLoads"] = {"maxPerNode": 1}
    policy_path = tmp_path_factory.mktemp("prewarm-policy") / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy))
    kwok = start_kwok(control_plane)
    manager = control_plane.start_controller_manager()
    args = ["--prewarm", "--prewarm-requests", str(request_log), "--prewarm-namespace", NS, "--prewarm-interval", "1"]
    args += ["--prewarm-forecaster", "histogram", "--prewarm-start-seconds", str(START_S)]
    args += ["--prewarm-bin-seconds", str(BIN_S)]
    running = Stack.start(control_plane, api_client, policy=policy_path, name="prewarm-scheduler", extender_args=args)
    yield running
    running.stop()
    apps = kubernetes.client.AppsV1Api(api_client)
    for d in apps.list_namespaced_deployment(NS).items:
        apps.delete_namespaced_deployment(d.metadata.name, NS)
    helpers.delete_pods(api_client, NS)
    for component in (manager, kwok):
        control_plane.stop_component(component)
    helpers.delete_nodes(api_client, names)


def deployment(name: str, model: str, resources: dict[str, str] | None = None, placeholders: int = 0) -> dict[str, Any]:
    """A serving Deployment at zero replicas that opts in to pre-warming; its pods start in `COLD_START`."""
    template_annotations = {
        ANNOTATION_MODEL: model,
        ANNOTATION_GPU_MEMORY: "8Gi",
        READY_DELAY: COLD_START,
        READY_JITTER: "0s",
    }
    pod = helpers.gpu_pod(name, NS, POOL, resources or {GPU_MILLI_RESOURCE: "300"}, template_annotations)
    labels = {"app": name, POOL_LABEL: POOL}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {PREWARM_LABEL: "enabled"},
            "annotations": {PLACEHOLDERS: str(placeholders)} if placeholders else {},
        },
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": labels, "annotations": template_annotations}, "spec": pod["spec"]},
        },
    }


def log_requests(path: Path, model: str, arrivals: list[float], service_s: float = SERVICE_S) -> None:
    with path.open("a") as f:
        f.writelines(f"{at:.3f},{model},{service_s}\n" for at in arrivals)


def periodic_history(path: Path, model: str, last_end: float) -> None:
    """Twelve requests, one every `PERIOD_S`, the last ending at `last_end`: eleven idle times of 38 s."""
    last = last_end - SERVICE_S
    log_requests(path, model, [last - PERIOD_S * i for i in range(11, -1, -1)])


def replicas(api: Any, name: str) -> tuple[int, dict[str, str]]:
    d = kubernetes.client.AppsV1Api(api).read_namespaced_deployment(name, NS)
    return d.spec.replicas or 0, d.metadata.annotations or {}


def raw_pods(api: Any) -> list[dict[str, Any]]:
    """The namespace's pods as the API server writes them (what `helpers.book` reads)."""
    return list(read_json(api, "GET", f"/api/v1/namespaces/{NS}/pods")["items"])


def remove_deployment(api: Any, name: str) -> None:
    """Scale to zero, then delete (the harness's controller manager runs no garbage collector)."""
    apps = kubernetes.client.AppsV1Api(api)
    apps.patch_namespaced_deployment_scale(name, NS, {"spec": {"replicas": 0}})
    helpers.wait_for(lambda: not model_pods(api, name) or None, f"the pods of {name} gone", 60)
    apps.delete_namespaced_deployment(name, NS)


def model_pods(api: Any, name: str) -> list[Any]:
    return kubernetes.client.CoreV1Api(api).list_namespaced_pod(NS, label_selector=f"app={name}").items


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())


def condition_time(pod: Any, kind: str) -> dt.datetime | None:
    found = [c.last_transition_time for c in pod.status.conditions or () if c.type == kind and c.status == "True"]
    return found[0] if found else None


def test_a_forecast_burst_finds_a_warm_replica_on_a_node_with_the_weights(system: Stack, request_log: Path) -> None:
    api = system.api
    kubernetes.client.AppsV1Api(api).create_namespaced_deployment(NS, deployment("small", SMALL))
    idle_since = time.time() - 5.0
    periodic_history(request_log, SMALL, idle_since)
    burst_at = idle_since + PERIOD_S - SERVICE_S  # when the next request comes, if the period holds

    helpers.wait_for(lambda: replicas(api, "small")[0] >= 1, "the pre-warmer to raise the floor", 30)
    raised_at = time.time()
    assert replicas(api, "small")[1].get(RAISED_FROM) == "0"
    assert idle_since + OPENS_S - 2 <= raised_at, "raised before the forecast window opened"
    (pod,) = helpers.wait_for(
        lambda: [p for p in model_pods(api, "small") if ready(p)] or None, "the pre-warmed replica Ready", 30
    )
    assert pod.spec.node_name in CACHED, f"the replica started on {pod.spec.node_name}, which lacks the weights"
    assert time.time() < burst_at, "the replica was not Ready before the forecast burst"

    # The burst comes as forecast; its autoscaler asks for six replicas, five of them cold.
    time.sleep(max(0.0, burst_at - time.time()))
    log_requests(request_log, SMALL, [time.time()] * 6, service_s=30.0)
    kubernetes.client.AppsV1Api(api).patch_namespaced_deployment_scale("small", NS, {"spec": {"replicas": 6}})

    def all_ready() -> list[Any] | None:
        found = model_pods(api, "small")
        return found if len(found) == 6 and all(ready(p) for p in found) else None

    pods = helpers.wait_for(
        all_ready,
        "six Ready replicas",
        90,
        0.5,
    )
    loading: dict[str, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    for p in pods:
        bound, up = condition_time(p, "PodScheduled"), condition_time(p, "Ready")
        assert bound is not None and up is not None
        loading[p.spec.node_name].append((bound, up))
    for node, spans in loading.items():
        spans.sort()
        overlaps = [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
        assert not overlaps, f"replicas loaded at once on {node}: {overlaps}"
    metrics = system.extender.metrics()
    assert metrics['gpu_extender_prewarm_actions_total{action="raise_floor",reason="forecast window"}'] >= 1
    remove_deployment(api, "small")


def test_a_forecast_that_does_not_come_true_gives_the_capacity_back(system: Stack, request_log: Path) -> None:
    api = system.api
    kubernetes.client.AppsV1Api(api).create_namespaced_deployment(NS, deployment("qwen", QWEN))
    idle_since = time.time() - 5.0
    periodic_history(request_log, QWEN, idle_since)
    helpers.wait_for(lambda: replicas(api, "qwen")[0] >= 1, "the pre-warmer to raise the floor", 30)
    helpers.wait_for(lambda: any(ready(p) for p in model_pods(api, "qwen")) or None, "the replica Ready", 30)
    # No request comes: when the window closes the floor goes back to zero and the replica goes away.
    helpers.wait_for(
        lambda: replicas(api, "qwen")[0] == 0 or None, "the floor given back", idle_since + CLOSES_S + 20 - time.time()
    )
    assert time.time() >= idle_since + CLOSES_S - 2, "the floor was given back before the window closed"
    assert RAISED_FROM not in replicas(api, "qwen")[1]
    helpers.wait_for(lambda: not model_pods(api, "qwen") or None, "the replica gone", 30)
    metrics = system.extender.metrics()
    assert metrics['gpu_extender_prewarm_actions_total{action="release_floor",reason="idle"}'] >= 1
    remove_deployment(api, "qwen")


def test_a_placeholder_holds_room_that_the_next_replica_preempts(system: Stack, request_log: Path) -> None:
    """With one placeholder, the window starts a replica and holds a GPU for the next; other pods then fill the
    pool, and the replica the burst adds evicts the placeholder, not them, and takes its GPU."""
    api = system.api
    core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
    priority = yaml.safe_load((stack.REPO / "manifests" / "base" / "priority-placeholder.yaml").read_text())
    kubernetes.client.SchedulingV1Api(api).create_priority_class(priority)
    apps.create_namespaced_deployment(NS, deployment("gemma", GEMMA, {"nvidia.com/gpu": "1"}, placeholders=1))
    idle_since = time.time() - 5.0
    periodic_history(request_log, GEMMA, idle_since)

    def held() -> tuple[Any, Any] | None:
        replicas_now = [p for p in model_pods(api, "gemma") if p.spec.node_name]
        holders = [p for p in core.list_namespaced_pod(NS, label_selector=f"{PLACEHOLDER_FOR}=gemma").items]
        bound = [p for p in holders if p.spec.node_name]
        return (replicas_now[0], bound[0]) if len(replicas_now) == 1 and len(bound) == 1 else None

    first, placeholder = helpers.wait_for(held, "the floor raised and a placeholder bound", 40)
    taken = helpers.book(raw_pods(api)).whole
    free = len(NODES) * 2 - sum(len(holders) for holders in taken.values())
    fillers = [helpers.gpu_pod(f"filler-{i}", NS, POOL, {"nvidia.com/gpu": "1"}) for i in range(free)]
    helpers.create_pods(api, fillers)
    names = {f["metadata"]["name"] for f in fillers}
    helpers.wait_for(
        lambda: all(p.spec.node_name for p in core.list_namespaced_pod(NS).items if p.metadata.name in names) or None,
        "the fillers bound",
        40,
    )

    apps.patch_namespaced_deployment_scale("gemma", NS, {"spec": {"replicas": 2}})
    second = helpers.wait_for(
        lambda: (
            [p for p in model_pods(api, "gemma") if p.spec.node_name and p.metadata.name != first.metadata.name] or None
        ),
        "the second replica bound",
        60,
    )[0]
    assert second.spec.node_name == placeholder.spec.node_name, "the replica did not take the placeholder's room"
    gone = helpers.wait_for(
        lambda: all(p.metadata.uid != placeholder.metadata.uid for p in core.list_namespaced_pod(NS).items) or None,
        "the placeholder preempted",
        30,
    )
    assert gone
    still = {p.metadata.name for p in core.list_namespaced_pod(NS).items if p.spec.node_name}
    assert names <= still, "a filler was evicted instead of the placeholder"
    assert not helpers.book(raw_pods(api)).problems
