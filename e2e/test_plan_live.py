"""The co-location planner in the live extender, through the real kube-scheduler: the extender re-plans from a
demand file every two seconds (`serve --plan`), publishes the plan in the `gpu-extender-plan` ConfigMap, and the
pods of the model Deployments (kube-controller-manager creates them) land on the planned GPUs; when demand grows,
the plan grows with it, the Deployments scale up, and the new replicas land on its new slots while the running
ones stay where they are. Nodes are never run, only scheduled onto.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from e2e import fleet, helpers
from e2e.controlplane import ControlPlane
from e2e.helpers import PodWatch, Stack, gpu_pod
from policies.catalog import default_catalog
from scheduler.planner.cli import dns_name
from scheduler.podspec import ANNOTATION_GPU_MEMORY, ANNOTATION_MODEL, GPU_MILLI_RESOURCE

pytestmark = pytest.mark.e2e

NS = "plan-live"
POOL = "plan"
H100 = "NVIDIA-H100-80GB-HBM3"
SMALL = "meta-llama/Llama-3.2-1B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"
NODES = [f"plan-{i}" for i in range(3)]
GPUS_PER_NODE = 2


def write_demand(path: Path, rates: dict[str, float]) -> None:
    path.write_text("model,requests_per_second\n" + "".join(f"{m},{r}\n" for m, r in rates.items()))


@pytest.fixture(scope="module")
def demand_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "demand.csv"
    write_demand(path, {SMALL: 30.0, QWEN: 4.0})
    return path


@pytest.fixture(scope="module")
def system(control_plane: ControlPlane, api_client: kubernetes.client.ApiClient, demand_file: Path) -> Iterator[Stack]:
    helpers.create_namespace(api_client, NS)
    names = fleet.create_nodes(
        api_client, helpers.pool_nodes([fleet.gpu_node(n, GPUS_PER_NODE, H100) for n in NODES], POOL)
    )
    plan_args = ["--plan", "--plan-demand", str(demand_file), "--plan-interval", "2", "--plan-time-limit", "3"]
    plan_args += ["--plan-node-selector", f"{helpers.POOL_LABEL}={POOL}", "--plan-namespace", NS]
    manager = control_plane.start_controller_manager()
    running = Stack.start(control_plane, api_client, name="plan-scheduler", extender_args=plan_args)
    yield running
    running.stop()
    apps = kubernetes.client.AppsV1Api(api_client)
    for d in apps.list_namespaced_deployment(NS).items:
        apps.delete_namespaced_deployment(d.metadata.name, NS)
    control_plane.stop_component(manager)
    helpers.delete_pods(api_client, NS)
    helpers.delete_nodes(api_client, names)


def published_plan(api: Any, newer_than: int = 0, timeout_s: float = 60.0) -> dict[str, Any]:
    """The plan in the ConfigMap, once its version is above `newer_than`."""
    core = kubernetes.client.CoreV1Api(api)

    def read() -> dict[str, Any] | None:
        try:
            cm = core.read_namespaced_config_map("gpu-extender-plan", NS)
        except kubernetes.client.ApiException:
            return None
        plan = json.loads(cm.data["plan.json"])
        return plan if plan["version"] > newer_than else None

    return helpers.wait_for(read, f"a plan newer than version {newer_than}", timeout_s, 0.5)


def model_deployments(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One Deployment per planned model at the plan's replica count: its pods ask for a share of its busiest planned
    replica's load (as `gpu-extender plan` writes its Deployments) and declare the model's memory from the
    catalog."""
    catalog = default_catalog()
    asks: dict[str, int] = {}
    for r in plan["replicas"]:
        asks[r["model"]] = max(asks.get(r["model"], 10), -(-round(r["load"] * 1000) // 10) * 10)
    out = []
    for model, count in plan["replicas_per_model"].items():
        spec = catalog.model(model)
        assert spec is not None
        name = dns_name(model)
        annotations = {ANNOTATION_MODEL: model, ANNOTATION_GPU_MEMORY: f"{spec.memory_mib}Mi"}
        pod = gpu_pod(name, NS, POOL, {GPU_MILLI_RESOURCE: str(asks[model])}, annotations)
        labels = {"app": name, helpers.POOL_LABEL: POOL}
        out.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "replicas": count,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod["spec"]},
                },
            }
        )
    return out


def bound_serving_pods(watch: PodWatch, count: int) -> None:
    """Wait until `count` serving pods hold an assignment."""
    watch.wait(lambda pods: sum(helpers.assignment_of(p) is not None for p in pods.values()) >= count, f"{count} bound")


def placed_replicas(watch: PodWatch) -> Counter[tuple[str, str, int]]:
    """(model, node, GPU) of every bound serving pod, from the assignment bind wrote."""
    out: Counter[tuple[str, str, int]] = Counter()
    for pod in watch.snapshot().values():
        doc = helpers.assignment_of(pod)
        if doc is not None:
            out[pod["metadata"]["annotations"][ANNOTATION_MODEL], doc["node"], doc["gpus"][0]] += 1
    return out


def planned_replicas(plan: dict[str, Any]) -> Counter[tuple[str, str, int]]:
    return Counter((r["model"], r["node"], r["gpu"]) for r in plan["replicas"])


def declared_memory_fits(watch: PodWatch) -> list[str]:
    """GPUs whose pods declare more memory than the GPU has."""
    declared: Counter[tuple[str, int]] = Counter()
    for pod in watch.snapshot().values():
        doc = helpers.assignment_of(pod)
        if doc is not None:
            declared[doc["node"], doc["gpus"][0]] += int(pod["metadata"]["annotations"][ANNOTATION_GPU_MEMORY][:-2])
    limit = fleet.GPU_MEMORY_MIB[H100]
    return [f"{gpu}: {mib} MiB declared" for gpu, mib in declared.items() if mib > limit]


def test_serving_pods_land_on_the_planned_gpus_and_follow_a_new_plan(system: Stack, demand_file: Path) -> None:
    plan = published_plan(system.api)
    assert {r["node"] for r in plan["replicas"]} <= set(NODES), "the plan left the pool it was given"
    assert plan["gpus"] < plan["one_replica_per_gpu"], plan
    apps = kubernetes.client.AppsV1Api(system.api)
    with PodWatch(system.api, NS) as watch:
        for manifest in model_deployments(plan):
            apps.create_namespaced_deployment(NS, manifest)
        bound_serving_pods(watch, len(plan["replicas"]))
        assert placed_replicas(watch) == planned_replicas(plan)
        assert not declared_memory_fits(watch)
        assert not helpers.book(watch.snapshot().values()).problems

        # Demand for the small model grows sevenfold: the next plan adds replicas of it and moves none that run;
        # the Deployments scale to it, as an autoscaler following the plan would.
        running = dict(plan["replicas_per_model"])
        write_demand(demand_file, {SMALL: 200.0, QWEN: 4.0})
        grown = helpers.wait_for(
            lambda: (
                (p := published_plan(system.api, plan["version"]))["replicas_per_model"][SMALL] > running[SMALL] and p
            ),
            "a plan with more replicas of the small model",
            60,
            0.5,
        )
        assert grown["moves"] == 0, grown
        for model, count in grown["replicas_per_model"].items():
            apps.patch_namespaced_deployment_scale(dns_name(model), NS, {"spec": {"replicas": count}})
        bound_serving_pods(watch, len(grown["replicas"]))
        assert placed_replicas(watch) == planned_replicas(grown)
        assert not declared_memory_fits(watch)
        assert not helpers.book(watch.snapshot().values()).problems

    metrics = system.extender.metrics()
    assert metrics['gpu_extender_plan_rounds_total{outcome="planned"}'] >= 2
    assert metrics['gpu_extender_plan_gpus{kind="planned"}'] == grown["gpus"] or grown["version"] < plan["version"]
