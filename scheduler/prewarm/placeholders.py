"""Placeholders: GPU room held for a model's next replicas by pods that real pods preempt.

For a serving Deployment annotated `gpu-extender.io/prewarm-placeholders: "N"`, the pre-warmer keeps a companion
Deployment `<name>-placeholder` at N replicas while the model should be warm, and at 0 otherwise. Its pods ask for
what the model's pods ask (same resources, scheduler, node selector, model annotation, so the extender places them
as it would place a replica: on the plan's slots and where the weights are cached) but run a pause container at
the PriorityClass `gpu-extender-placeholder` (value -10, never preempting): a replica of the model that finds no
room preempts one, and lands where the room was kept. A companion Deployment rather than bare pods: the pre-warmer
then only ever patches a count, and the ReplicaSet controller creates and deletes the pods.
"""

from __future__ import annotations

import copy
from typing import Any

from scheduler.prewarm.cluster import PLACEHOLDERS, ServingDeployment

PLACEHOLDER_FOR = "gpu-extender.io/placeholder-for"
PRIORITY_CLASS = "gpu-extender-placeholder"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"

__all__ = ["PLACEHOLDERS", "PRIORITY_CLASS", "placeholder_manifest", "set_placeholders"]


def placeholder_name(d: ServingDeployment) -> str:
    return f"{d.name}-placeholder"[:253]


def placeholder_manifest(serving: Any, replicas: int) -> dict[str, Any]:
    """The companion Deployment of a serving Deployment (a `V1Deployment`), at `replicas`."""
    from kubernetes import client

    template = client.ApiClient().sanitize_for_serialization(serving.spec.template)
    spec = template.get("spec") or {}
    containers = spec.get("containers") or []
    resources = [c.get("resources") or {} for c in containers]
    pause = {"name": "placeholder", "image": PAUSE_IMAGE, "resources": _summed(resources)}
    kept = {k: v for k, v in spec.items() if k in ("schedulerName", "nodeSelector", "affinity", "tolerations")}
    labels = {PLACEHOLDER_FOR: serving.metadata.name}
    annotations = copy.deepcopy((template.get("metadata") or {}).get("annotations") or {})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{serving.metadata.name}-placeholder",
            "namespace": serving.metadata.namespace,
            "labels": labels,
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    **kept,
                    "containers": [pause],
                    "priorityClassName": PRIORITY_CLASS,
                    "terminationGracePeriodSeconds": 0,
                },
            },
        },
    }


def _summed(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """One container asking what all of the pod's containers ask (quantities of one name are written as the
    first container's when several name it: serving pods have one container)."""
    out: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    for r in resources:
        for kind in ("requests", "limits"):
            for name, value in (r.get(kind) or {}).items():
                out[kind].setdefault(name, value)
    return {k: v for k, v in out.items() if v}


def set_placeholders(api_client: Any, d: ServingDeployment, wanted: int) -> bool:
    """Bring the companion Deployment to `wanted` replicas (creating it the first time); True when this changed
    something."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps = client.AppsV1Api(api_client)
    name = placeholder_name(d)
    try:
        current = apps.read_namespaced_deployment(name, d.namespace, _request_timeout=10)
    except ApiException as exc:
        if exc.status != 404:
            raise
        if not wanted:
            return False
        serving = apps.read_namespaced_deployment(d.name, d.namespace, _request_timeout=10)
        apps.create_namespaced_deployment(d.namespace, placeholder_manifest(serving, wanted), _request_timeout=10)
        return True
    if (current.spec.replicas or 0) == wanted:
        return False
    apps.patch_namespaced_deployment(name, d.namespace, {"spec": {"replicas": wanted}}, _request_timeout=10)
    return True
