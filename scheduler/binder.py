"""Binding a pod to a node: one `Binding` that carries the assignment annotations.

The API server copies a Binding's annotations onto the pod in the same write that sets its node, so whoever sees
the pod bound (the device plugin, the node agent, our own watch) already sees which GPUs it holds. The write is
safe to repeat: kube-scheduler retries a failed bind, and a binding that already points at the same node counts as
done.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from scheduler.kubeapi import ApiError, CurlSession

__all__ = ["CONCURRENT_BINDS", "BindError", "KubernetesBinder", "MemoryBinder"]

CONCURRENT_BINDS = 8
"""Binds in flight at once. kube-scheduler sends binds without waiting for one another; more threads than this only
wait for the CPU (24 doubled each bind's time and left the rate as it was), and each thread keeps a connection to
the API server of its own, so no bind pays for a new TLS handshake."""


class BindError(RuntimeError):
    """The pod was not bound; the message says why in words a scheduler event can carry."""


def _pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"


class KubernetesBinder:
    """Binds through the API server with the official client's configuration and credentials (`CurlSession`:
    its own connections, one per bind thread, apart from the watches')."""

    def __init__(self, api_client: Any, timeout_s: float | tuple[float, float] = (5.0, 10.0)) -> None:
        self._session = CurlSession(api_client, timeout_s)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; a transport failure becomes a `BindError`, an HTTP error stays an `ApiError` to inspect."""
        try:
            return self._session.request_json(method, path, body)
        except OSError as exc:
            raise BindError(f"{method} {path}: API server unreachable: {exc}") from None

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod's API JSON (for a bind that arrives before we have seen the pod)."""
        try:
            pod = self._call("GET", _pod_path(namespace, name))
        except ApiError as exc:
            raise BindError(f"cannot read pod {namespace}/{name}: {exc.message or exc}") from None
        if not isinstance(pod, dict):
            raise BindError(f"cannot read pod {namespace}/{name}: unexpected answer")
        return pod

    def bind(self, namespace: str, name: str, uid: str, node: str, annotations: Mapping[str, str]) -> None:
        """One write: the API server copies a Binding's annotations onto the pod as it binds it, so the pod is
        never bound without its assignment (nor annotated but unbound). `uid` guards against a pod recreated
        under the same name (409 Precondition failed)."""
        path = _pod_path(namespace, name)
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if uid:
            metadata["uid"] = uid
        if annotations:
            metadata["annotations"] = dict(annotations)
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": metadata,
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        try:
            self._call("POST", f"{path}/binding", body=binding)
        except ApiError as exc:
            if exc.status == 409:
                self._check_already_bound(namespace, name, uid, node, exc)
                return
            if exc.status == 404:
                raise BindError(f"pod {namespace}/{name} no longer exists") from None
            raise BindError(f"binding pod {namespace}/{name} to {node} failed: {exc}") from None

    def _check_already_bound(self, namespace: str, name: str, uid: str, node: str, exc: ApiError) -> None:
        """A 409 is success when the same pod is already on the same node (a retried bind), else an error."""
        pod = self.get_pod(namespace, name)
        meta = pod.get("metadata") or {}
        bound_to = (pod.get("spec") or {}).get("nodeName")
        if uid and meta.get("uid") != uid:
            raise BindError(f"pod {namespace}/{name} was recreated (uid {meta.get('uid')}, scheduled {uid})")
        if bound_to == node:
            return
        where = f"already bound to {bound_to}" if bound_to else "binding conflict"
        raise BindError(f"pod {namespace}/{name}: {where}, not {node}: {exc.message}")


@dataclass(frozen=True)
class Bound:
    node: str
    uid: str
    annotations: dict[str, str] = field(default_factory=dict)


class MemoryBinder:
    """Bindings kept in memory, for a static fleet and for tests; the same idempotency rules as the API server."""

    def __init__(self, pods: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.bindings: dict[str, Bound] = {}
        self._pods: dict[str, dict[str, Any]] = dict(pods or {})
        self._lock = threading.Lock()

    def add_pod(self, pod: dict[str, Any]) -> None:
        """Make a pod known to `get_pod` (the static fleet has no API server to read it from)."""
        meta = pod.get("metadata") or {}
        with self._lock:
            self._pods[f"{meta.get('namespace') or 'default'}/{meta.get('name')}"] = pod

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        key = f"{namespace}/{name}"
        with self._lock:
            pod = self._pods.get(key)
            bound = self.bindings.get(key)
        if pod is None:
            raise BindError(f"pod {key} is not known")
        if bound is None:
            return pod
        meta = {
            **pod.get("metadata", {}),
            "annotations": {**pod.get("metadata", {}).get("annotations", {}), **bound.annotations},
        }
        return {**pod, "metadata": meta, "spec": {**pod.get("spec", {}), "nodeName": bound.node}}

    def bind(self, namespace: str, name: str, uid: str, node: str, annotations: Mapping[str, str]) -> None:
        key = f"{namespace}/{name}"
        with self._lock:
            existing = self.bindings.get(key)
            if existing is not None:
                if existing.uid and uid and existing.uid != uid:
                    raise BindError(f"pod {key} was recreated (uid {existing.uid}, scheduled {uid})")
                if existing.node != node:
                    raise BindError(f"pod {key}: already bound to {existing.node}, not {node}")
            self.bindings[key] = Bound(node, uid, dict(annotations))

    def unbind(self, namespace: str, name: str) -> Bound | None:
        """Forget a binding (the pod was deleted)."""
        with self._lock:
            return self.bindings.pop(f"{namespace}/{name}", None)
