"""GPU pods as kube-scheduler sees them, made from trace rows (the openb pod lists) or by hand."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.datasets import shared_data

GPU_RESOURCE = "nvidia.com/gpu"
MILLI_RESOURCE = "gpu-extender.io/gpu-milli"
GPU_TYPES_ANNOTATION = "gpu-extender.io/gpu-types"
SCHEDULER_NAME = "gpu-scheduler"


@dataclass(frozen=True)
class TracePod:
    """One row of an openb pod list."""

    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: str = ""


def read_openb_pods(path: str | Path) -> list[TracePod]:
    with open(path, newline="") as handle:
        return [
            TracePod(
                name=row["name"],
                cpu_milli=int(row["cpu_milli"]),
                memory_mib=int(row["memory_mib"]),
                num_gpu=int(row["num_gpu"]),
                gpu_milli=int(row["gpu_milli"]),
                gpu_spec=row.get("gpu_spec") or "",
            )
            for row in csv.DictReader(handle)
        ]


def pod_manifest(
    pod: TracePod, name: str | None = None, namespace: str = "default", scheduler_name: str = SCHEDULER_NAME
) -> dict[str, Any]:
    """A Pod whose request mirrors the trace row: whole GPUs through the device plugin's resource, a share
    through the extender's milli-GPU resource, and GPU type constraints as an annotation."""
    requests: dict[str, str] = {"cpu": f"{pod.cpu_milli}m", "memory": f"{pod.memory_mib}Mi"}
    limits: dict[str, str] = {}
    if pod.num_gpu and pod.gpu_milli >= 1000:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(pod.num_gpu)
    elif pod.num_gpu:
        requests[MILLI_RESOURCE] = limits[MILLI_RESOURCE] = str(pod.gpu_milli)
    annotations = {GPU_TYPES_ANNOTATION: pod.gpu_spec} if pod.gpu_spec else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name or pod.name, "namespace": namespace, "annotations": annotations},
        "spec": {
            "schedulerName": scheduler_name,
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/pause:none",
                    "resources": {"requests": requests, "limits": limits},
                }
            ],
            "terminationGracePeriodSeconds": 0,
        },
    }


def openb_pod_manifests(list_name: str = "default", scheduler_name: str = SCHEDULER_NAME) -> Iterator[dict[str, Any]]:
    path = shared_data() / "openb" / f"openb_pod_list_{list_name}.csv"
    for pod in read_openb_pods(path):
        yield pod_manifest(pod, scheduler_name=scheduler_name)
