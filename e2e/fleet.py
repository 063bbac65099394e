"""GPU Node objects without kubelets: capacity, allocatable, NVIDIA GFD labels and a Ready condition.

The scheduler only reads Node objects, so a fleet of them (no kubelet behind any) is enough to test
real scheduling decisions at the scale of the openb trace.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import random
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes.client

from e2e.workload import shared_data

OPENB_GPU_NODES = shared_data() / "openb" / "openb_node_list_gpu_node.csv"
GPU_RESOURCE = "nvidia.com/gpu"
MILLI_RESOURCE = "gpu-extender.io/gpu-milli"
MERGE_PATCH = "application/merge-patch+json"


GPU_MEMORY_MIB: dict[str, int] = {
    "P100": 16280,
    "T4": 15360,
    "V100M16": 16160,
    "V100M32": 32510,
    "A10": 23028,
    "NVIDIA-A100-SXM4-40GB": 40960,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-H200": 143771,
}
"""Per-GPU memory (the GFD ``nvidia.com/gpu.memory`` value) by product; openb's G1-G3 are undisclosed."""


def gpu_node(
    name: str,
    gpus: int,
    product: str,
    cpu_milli: int = 64000,
    memory_mib: int = 262144,
    pods: int = 110,
    mig_profiles: Mapping[str, int] | None = None,
    mig_gpus: int | None = None,
    gpu_memory_mib: int | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A Node manifest (with status) for ``gpus`` GPUs labelled as GFD would label ``product`` (0: a CPU node).

    openb nodes keep the trace's model code as the product (``V100M16``), as the simulator does, so that the
    trace's GPU type constraints mean the same in both. ``gpu_memory_mib`` defaults to GPU_MEMORY_MIB[product];
    unknown memory leaves the ``nvidia.com/gpu.memory`` label out.

    MIG nodes: ``mig_gpus`` of the GPUs (default: all) are partitioned into ``mig_profiles`` (profile -> instance count,
    e.g. ``{"1g.10gb": 7}``), advertised as ``nvidia.com/mig-<profile>`` under the mixed strategy; only the
    remaining whole GPUs count as ``nvidia.com/gpu`` and ``gpu-extender.io/gpu-milli``.
    """
    memory = gpu_memory_mib if gpu_memory_mib is not None else GPU_MEMORY_MIB.get(product)
    whole = gpus - (mig_gpus if mig_gpus is not None else gpus if mig_profiles else 0)
    resources = {"cpu": f"{cpu_milli}m", "memory": f"{memory_mib}Mi", "pods": str(pods), "ephemeral-storage": "500Gi"}
    node_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
    if gpus > 0:  # a node without GPUs runs neither the device plugin nor GFD: no nvidia.com/* at all
        resources |= {GPU_RESOURCE: str(whole), MILLI_RESOURCE: str(whole * 1000)}
        node_labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/mig.strategy": "mixed" if mig_profiles else "none",
        }
        if memory is not None:
            node_labels["nvidia.com/gpu.memory"] = str(memory)
    for profile, count in (mig_profiles or {}).items():
        resources[f"nvidia.com/mig-{profile}"] = str(count)
        node_labels[f"nvidia.com/mig-{profile}.count"] = str(count)
    node_labels.update(labels or {})
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels, "annotations": dict(annotations or {})},
        "spec": {},
        "status": {
            "capacity": resources,
            "allocatable": dict(resources),
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "no kubelet: e2e node",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
            ],
            "addresses": [{"type": "Hostname", "address": name}],
            "nodeInfo": _node_info(),
        },
    }


def _node_info() -> dict[str, str]:
    return {
        "architecture": "amd64",
        "operatingSystem": "linux",
        "osImage": "e2e",
        "kernelVersion": "",
        "containerRuntimeVersion": "",
        "kubeletVersion": "",
        "kubeProxyVersion": "",
        "machineID": "",
        "systemUUID": "",
        "bootID": "",
    }


def nodes_from_openb_csv(
    path: Path | str = OPENB_GPU_NODES,
    fraction: float = 1.0,
    seed: int = 0,
    annotations: Mapping[str, Mapping[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Node manifests for the openb trace's GPU nodes (columns sn,cpu_milli,memory_mib,gpu,model).

    ``fraction`` < 1 keeps a seeded random subset (in file order); ``annotations`` maps node name to extra
    annotations (e.g. a per-node inventory).
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if fraction < 1.0:
        keep = max(1, round(len(rows) * fraction)) if fraction > 0 else 0
        chosen = set(random.Random(seed).sample(range(len(rows)), keep))
        rows = [row for i, row in enumerate(rows) if i in chosen]
    extra = annotations or {}
    return [
        gpu_node(
            row["sn"],
            int(row["gpu"]),
            row["model"],
            int(row["cpu_milli"]),
            int(row["memory_mib"]),
            annotations=extra.get(row["sn"]),
        )
        for row in rows
    ]


def _create_one(core: kubernetes.client.CoreV1Api, node: Mapping[str, Any]) -> str:
    """Nodes keep .status on create (that is how kubelets register), so one POST is enough.

    Should an apiserver drop it (as it does for other kinds), the status subresource is patched instead.
    """
    name = str(node["metadata"]["name"])
    body: Any = node
    response: Any = core.create_node(body, _preload_content=False)
    created = response.data
    response.release_conn()
    if b'"allocatable"' not in created:
        status: Any = {"status": node["status"]}
        response = core.patch_node_status(name, status, _content_type=MERGE_PATCH, _preload_content=False)
        response.release_conn()
    return name


def create_nodes(
    api_client: kubernetes.client.ApiClient,
    node_dicts: Iterable[Mapping[str, Any]],
    workers: int = 16,
) -> list[str]:
    """Create the nodes concurrently, status included; returns their names, raises on any failure.

    Responses are not deserialized into models: that would cost more CPU than the requests themselves.
    """
    configuration = copy.deepcopy(api_client.configuration)
    configuration.connection_pool_maxsize = max(workers, configuration.connection_pool_maxsize or 0)
    nodes = list(node_dicts)
    with kubernetes.client.ApiClient(configuration) as client, ThreadPoolExecutor(workers) as pool:
        core = kubernetes.client.CoreV1Api(client)
        return list(pool.map(lambda node: _create_one(core, node), nodes))
