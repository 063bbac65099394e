"""The serving Deployments the pre-warmer may act on, read from the API server, and its lever on their count.

A Deployment opts in with the label `gpu-extender.io/prewarm: enabled` and names its model with the annotation
`gpu-extender.io/model` (on itself or its pod template; a model name such as `org/name` is not a valid label value).
`gpu-extender.io/sleep-mode: "1"` (or `"2"`) says its vLLM servers run with `--enable-sleep-mode`, so an idle
replica may sleep at that level instead of being stopped.

**The replica floor** cooperates with an autoscaler rather than fighting it: with a HorizontalPodAutoscaler on the
Deployment it raises the HPA's `minReplicas`, else the Deployment's `replicas`, and only upwards. The value
it raised from is kept in the annotation `gpu-extender.io/prewarm-raised-from`; releasing restores it, unless
someone changed the count since (the autoscaler then owns it and only the annotation goes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from scheduler.podspec import ANNOTATION_MODEL

log = logging.getLogger("gpu_extender.prewarm")

PREWARM_LABEL = "gpu-extender.io/prewarm"
RAISED_FROM = "gpu-extender.io/prewarm-raised-from"
SLEEP_MODE = "gpu-extender.io/sleep-mode"
PLACEHOLDERS = "gpu-extender.io/prewarm-placeholders"
VLLM_URL = "gpu-extender.io/vllm-url"  # a replica's server, where it is not http://<pod IP>:<port "http" or 8000>

__all__ = ["PREWARM_LABEL", "Replica", "ServingDeployment", "list_serving", "raise_floor", "release_floor"]


@dataclass(frozen=True)
class Replica:
    name: str
    ready: bool
    url: str | None  # None until the pod has an address


@dataclass(frozen=True)
class ServingDeployment:
    namespace: str
    name: str
    model: str
    replicas: int  # what the Deployment (or its HPA's minimum, when one scales it) asks for now
    hpa: str | None
    raised_from: int | None  # set while the pre-warmer holds the count raised
    sleep_level: int | None
    pods: tuple[Replica, ...]
    placeholders: int = 0  # pods kept holding room for the next replicas while the model should be warm

    @property
    def ready(self) -> int:
        return sum(p.ready for p in self.pods)


def list_serving(api_client: Any, namespace: str | None = None) -> list[ServingDeployment]:
    """Every opted-in Deployment with its pods and HPA (three list calls, whatever the number of models)."""
    from kubernetes import client

    apps, core, scaling = client.AppsV1Api(api_client), client.CoreV1Api(api_client), _autoscaling(api_client)
    selector = f"{PREWARM_LABEL}=enabled"
    if namespace:
        deployments = apps.list_namespaced_deployment(namespace, label_selector=selector, _request_timeout=10).items
        hpas = scaling.list_namespaced_horizontal_pod_autoscaler(namespace, _request_timeout=10).items
        pods = core.list_namespaced_pod(namespace, _request_timeout=10).items
    else:
        deployments = apps.list_deployment_for_all_namespaces(label_selector=selector, _request_timeout=10).items
        hpas = scaling.list_horizontal_pod_autoscaler_for_all_namespaces(_request_timeout=10).items
        pods = core.list_pod_for_all_namespaces(_request_timeout=10).items
    scaled = {
        (h.metadata.namespace, h.spec.scale_target_ref.name): h
        for h in hpas
        if h.spec.scale_target_ref.kind == "Deployment"
    }
    out = []
    for d in deployments:
        meta = d.metadata
        template_annotations = (d.spec.template.metadata.annotations or {}) if d.spec.template.metadata else {}
        annotations = meta.annotations or {}
        model = annotations.get(ANNOTATION_MODEL) or template_annotations.get(ANNOTATION_MODEL)
        if not model:
            log.warning("opted-in Deployment names no model", extra={"deployment": f"{meta.namespace}/{meta.name}"})
            continue
        hpa = scaled.get((meta.namespace, meta.name))
        holder = hpa.metadata.annotations if hpa is not None else annotations
        replicas = (hpa.spec.min_replicas or 1) if hpa is not None else (d.spec.replicas or 0)
        match = d.spec.selector.match_labels or {}
        mine = [p for p in pods if p.metadata.namespace == meta.namespace and _matches(p.metadata.labels, match)]
        out.append(
            ServingDeployment(
                namespace=meta.namespace,
                name=meta.name,
                model=model,
                replicas=replicas,
                hpa=hpa.metadata.name if hpa is not None else None,
                raised_from=_int((holder or {}).get(RAISED_FROM)),
                sleep_level=_int(annotations.get(SLEEP_MODE)),
                placeholders=max(0, _int(annotations.get(PLACEHOLDERS)) or 0),
                pods=tuple(_replica(p) for p in mine if p.metadata.deletion_timestamp is None),
            )
        )
    return out


def raise_floor(api_client: Any, deployment: ServingDeployment, floor: int) -> bool:
    """At least `floor` replicas; True when this changed something."""
    if deployment.replicas >= floor:
        return False
    raised_from = deployment.replicas if deployment.raised_from is None else deployment.raised_from
    _set(api_client, deployment, floor, str(raised_from))
    return True


def release_floor(api_client: Any, deployment: ServingDeployment, floor: int) -> bool:
    """Give back a floor this pre-warmer raised to `floor`; True when this changed something."""
    if deployment.raised_from is None:
        return False
    unchanged = deployment.replicas == floor
    _set(api_client, deployment, deployment.raised_from if unchanged else None, None)
    return True


def _set(api_client: Any, d: ServingDeployment, replicas: int | None, raised_from: str | None) -> None:
    """Set the count (None: leave it) and the bookkeeping annotation (None: remove it) in one patch, so nobody
    sees one without the other."""
    body: dict[str, Any] = {"metadata": {"annotations": {RAISED_FROM: raised_from}}}
    if d.hpa is not None:
        if replicas is not None:
            body["spec"] = {"minReplicas": max(1, replicas)}
        scaling = _autoscaling(api_client)
        scaling.patch_namespaced_horizontal_pod_autoscaler(d.hpa, d.namespace, body, _request_timeout=10)
        return
    from kubernetes import client

    if replicas is not None:
        body["spec"] = {"replicas": replicas}
    client.AppsV1Api(api_client).patch_namespaced_deployment(d.name, d.namespace, body, _request_timeout=10)


def _autoscaling(api_client: Any) -> Any:
    from kubernetes import client

    return client.AutoscalingV2Api(api_client)


def _matches(labels: dict[str, str] | None, selector: dict[str, str]) -> bool:
    labels = labels or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _replica(pod: Any) -> Replica:
    conditions = (pod.status.conditions or []) if pod.status else []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    url = (pod.metadata.annotations or {}).get(VLLM_URL)
    ip = pod.status.pod_ip if pod.status else None
    if url is None and ip:
        url = f"http://{ip}:{_port(pod)}"
    return Replica(pod.metadata.name, ready, url)


def _port(pod: Any) -> int:
    for container in pod.spec.containers or []:
        for port in container.ports or []:
            if port.name == "http":
                return int(port.container_port)
    return 8000
