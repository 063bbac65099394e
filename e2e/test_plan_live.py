"""The co-location planner in the live extender, through the real kube-scheduler: the extender re-plans from a
demand file every two seconds (`serve --plan`), publishes the plan in the `gpu-extender-plan` ConfigMap, and the
serving pods that a scale-up creates land on the planned GPUs; when demand grows, the plan grows with it and the
new replicas land on its new slots while the running ones stay where they are.

Pods are created as a model's Deployment would create them (its pod template, once per replica): the harness runs
no controller-manager. Nodes are never run, only scheduled onto.
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
    running = Stack.start(control_plane, api_client, name="plan-scheduler", extender_args=plan_args)
    yield running
    running.stop()
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


def replica_pods(plan: dict[str, Any], start: dict[str, int]) -> list[dict[str, Any]]:
    """The pods a scale-up to the plan's replica counts creates, from `start` running replicas per model: each
    model's pod template asks for a share of its busiest planned replica's load (as `gpu-extender plan` writes
    its Deployments) and declares the model's memory from the catalog."""
    catalog = default_catalog()
    asks: dict[str, int] = {}
    for r in plan["replicas"]:
        asks[r["model"]] = max(asks.get(r["model"], 10), -(-round(r["load"] * 1000) // 10) * 10)
    pods = []
    for model, count in plan["replicas_per_model"].items():
        spec = catalog.model(model)
        assert spec is not None
        annotations = {ANNOTATION_MODEL: model, ANNOTATION_GPU_MEMORY: f"{spec.memory_mib}Mi"}
        for i in range(start.get(model, 0), count):
            name = f"{model.split('/')[-1].lower().replace('.', '-')}-{i}"
            pods.append(gpu_pod(name, NS, POOL, {GPU_MILLI_RESOURCE: str(asks[model])}, annotations))
    return pods


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
    with PodWatch(system.api, NS) as watch:
        pods = replica_pods(plan, {})
        helpers.create_pods(system.api, pods)
        watch.bound([p["metadata"]["name"] for p in pods], timeout_s=60)
        assert placed_replicas(watch) == planned_replicas(plan)
        assert not declared_memory_fits(watch)
        assert not helpers.book(watch.snapshot().values()).problems

        # Demand for the small model grows sevenfold: the next plan adds replicas of it and moves none that run.
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
        more = replica_pods(grown, running)
        helpers.create_pods(system.api, more)
        watch.bound([p["metadata"]["name"] for p in more], timeout_s=60)
        assert placed_replicas(watch) == planned_replicas(grown)
        assert not declared_memory_fits(watch)
        assert not helpers.book(watch.snapshot().values()).problems

    metrics = system.extender.metrics()
    assert metrics['gpu_extender_plan_rounds_total{outcome="planned"}'] >= 2
    assert metrics['gpu_extender_plan_gpus{kind="planned"}'] == grown["gpus"] or grown["version"] < plan["version"]
