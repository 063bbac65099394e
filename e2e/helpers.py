"""What the end-to-end scenarios and benchmarks share: the shipped stack with an extender that can be killed and
restarted on its port, pods followed through a raw watch, and the GPU assignments read back from the API server."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import orjson

from e2e import procs, stack
from e2e.controlplane import ControlPlane
from scheduler.annotations import ASSIGNMENT
from scheduler.kubeapi import ApiError, api_request, read_json

POOL_LABEL = "e2e.gpu-extender.io/pool"
"""Every scenario gets its own nodes, labelled with its pool, and its pods select that pool: scenarios share one
control plane and one scheduler without seeing each other's nodes."""
T = TypeVar("T")


def wait_for(fetch: Callable[[], T | None], what: str, timeout_s: float = 30.0, interval_s: float = 0.1) -> T:
    """Poll until ``fetch`` returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


# -- the extender, restartable on a fixed port ---------------------------------------------------------------
class Extender:
    """`gpu-extender serve` in live mode on one fixed port: kube-scheduler's configuration names the URL, so a
    restarted extender must come back where the old one was."""

    def __init__(
        self,
        plane: ControlPlane,
        name: str = "gpu-extender",
        policy: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.plane = plane
        self.name = name
        self.policy = policy
        self.extra_args = list(extra_args)  # more `serve` flags, e.g. the telemetry ones
        (self.port,) = procs.free_ports(1)
        self.component: procs.Component | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.plane.workdir / "logs" / f"{self.name}.log"

    def start(self, timeout_s: float = 60.0, wait_ready: bool = True) -> procs.Component:
        """Spawn the extender; with ``wait_ready``, return once /readyz answers (its first full list is in)."""
        argv = [sys.executable, "-m", "extender.cli", "serve", "--kubeconfig", str(self.plane.kubeconfig)]
        argv += ["--port", str(self.port)]
        if self.policy is not None:
            argv += ["--policy", str(self.policy)]
        argv += self.extra_args
        component = procs.spawn(self.name, argv, self.log_path)
        component.port = self.port
        self.component = component
        self.plane.components.append(component)
        if wait_ready:
            self.wait_ready(timeout_s)
        return component

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        assert self.component is not None
        procs.wait_until(self.component, lambda: procs.http_ok(f"{self.url}/readyz"), "/readyz", timeout_s, 0.05)

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a node failure would end it: no shutdown path runs."""
        component = self.component
        if component is None:
            return
        os.killpg(component.pid, signal.SIGKILL)
        if component.popen is not None:
            component.popen.wait()
        if component in self.plane.components:
            self.plane.components.remove(component)
        self.component = None

    def stop(self) -> None:
        if self.component is not None:
            procs.stop(self.component)
            if self.component in self.plane.components:
                self.plane.components.remove(self.component)
            self.component = None

    def metrics(self) -> dict[str, float]:
        """/metrics as ``{"name{labels}": value}``."""
        return parse_metrics(http_get(f"{self.url}/metrics"))

    def rss_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the process, in KiB."""
        assert self.component is not None
        return proc_memory_kib(self.component.pid)


def grown(before: Mapping[str, float], after: Mapping[str, float], name: str) -> float:
    """How much a metric grew between two `Extender.metrics()` readings (a series not yet exported counts 0)."""
    return after.get(name, 0.0) - before.get(name, 0.0)


def http_get(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return str(resp.read().decode())


def http_post_json(url: str, body: Any, timeout_s: float = 30.0) -> Any:
    request = urllib.request.Request(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        return orjson.loads(resp.read())


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def proc_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) from /proc, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# -- namespaces, nodes, pods ------------------------------------------------------------------------------------
def create_namespace(api: Any, name: str) -> None:
    try:
        read_json(api, "POST", "/api/v1/namespaces", body={"metadata": {"name": name}})
    except ApiError as exc:
        if exc.status != 409:
            raise


def delete_pods(api: Any, namespace: str, label_selector: str = "") -> None:
    """Delete the namespace's pods at once (grace 0: no kubelet would ever confirm a graceful delete)."""
    query = [("gracePeriodSeconds", "0")] + ([("labelSelector", label_selector)] if label_selector else [])
    read_json(api, "DELETE", f"/api/v1/namespaces/{namespace}/pods", query=query)


def delete_namespace(api: Any, namespace: str) -> None:
    delete_pods(api, namespace)
    try:
        read_json(api, "DELETE", f"/api/v1/namespaces/{namespace}")
    except ApiError as exc:
        if exc.status != 404:
            raise


def delete_nodes(api: Any, names: Iterable[str], workers: int = 8) -> None:
    def one(name: str) -> None:
        try:
            read_json(api, "DELETE", f"/api/v1/nodes/{quote(name, safe='')}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, names))


def in_pool(pod: dict[str, Any], pool: str) -> dict[str, Any]:
    """The pod, labelled with ``pool`` and restricted to its nodes."""
    pod["metadata"].setdefault("labels", {})[POOL_LABEL] = pool
    pod["spec"].setdefault("nodeSelector", {})[POOL_LABEL] = pool
    return pod


def pool_nodes(nodes: list[dict[str, Any]], pool: str) -> list[dict[str, Any]]:
    """The node manifests, labelled as members of ``pool``."""
    for node in nodes:
        node["metadata"]["labels"][POOL_LABEL] = pool
    return nodes


def gpu_pod(
    name: str,
    namespace: str,
    pool: str,
    resources: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
    scheduler_name: str = "gpu-scheduler",
) -> dict[str, Any]:
    """A pod asking ``resources`` (besides 1 CPU and 1 GiB) on the nodes of ``pool``; never run, only scheduled."""
    requests = {"cpu": "1", "memory": "1Gi", **resources}
    limits = {k: v for k, v in requests.items() if k not in ("cpu", "memory")}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {POOL_LABEL: pool},
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "schedulerName": scheduler_name,
            "nodeSelector": {POOL_LABEL: pool},
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


def create_pod(api: Any, pod: Mapping[str, Any]) -> dict[str, Any]:
    namespace = pod["metadata"].get("namespace") or "default"
    return dict(read_json(api, "POST", f"/api/v1/namespaces/{namespace}/pods", body=pod))


def create_pods(api: Any, pods: Iterable[Mapping[str, Any]], workers: int = 16) -> int:
    """Create pods concurrently; responses are drained, not parsed (parsing them costs more than sending them)."""

    def one(pod: Mapping[str, Any]) -> None:
        namespace = pod["metadata"].get("namespace") or "default"
        resp = api_request(api, "POST", f"/api/v1/namespaces/{namespace}/pods", body=pod)
        resp.data  # noqa: B018 - a connection goes back to the pool only once its body is read
        resp.release_conn()

    items = list(pods)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, items))
    return len(items)


def events(api: Any, namespace: str, name: str, reason: str = "FailedScheduling") -> list[str]:
    """Messages of the events of one pod with ``reason``."""
    selector = f"involvedObject.name={name},reason={reason}"
    items = read_json(api, "GET", f"/api/v1/namespaces/{namespace}/events", query=[("fieldSelector", selector)])
    return [str(e.get("message") or "") for e in items["items"]]


def scheduled_condition(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled":
            return dict(condition)
    return None


def unschedulable(pod: Mapping[str, Any]) -> bool:
    """kube-scheduler gave up on this attempt: no node fits (Unschedulable) or the attempt failed (SchedulerError)."""
    condition = scheduled_condition(pod)
    return bool(condition and condition.get("status") == "False")


def node_name(pod: Mapping[str, Any]) -> str:
    return str((pod.get("spec") or {}).get("nodeName") or "")


# -- following pods -----------------------------------------------------------------------------------------------
class PodWatch:
    """The pods of one namespace, kept current by a raw watch: waiting for a binding costs no polling."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.pods: dict[str, dict[str, Any]] = {}
        self.first_bound_at: dict[str, float] = {}
        """Monotonic time at which each pod was first seen bound."""
        self.deleted: set[str] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None

    def __enter__(self) -> PodWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        page = read_json(self.api, "GET", f"/api/v1/namespaces/{self.namespace}/pods")
        for pod in page["items"]:
            self._record("ADDED", pod)
        rv = str(page["metadata"]["resourceVersion"])
        self._thread = threading.Thread(target=self._loop, args=(rv,), daemon=True, name=f"watch-{self.namespace}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:
                resp.close()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self, rv: str) -> None:
        while not self._stop.is_set():
            query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("resourceVersion", rv)]
            query.append(("timeoutSeconds", "300"))
            try:
                self._resp = api_request(
                    self.api, "GET", f"/api/v1/namespaces/{self.namespace}/pods", query=query, timeout=(10, 330)
                )
                pending = b""
                for chunk in self._resp.stream(1 << 16):
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        if line.strip():
                            event = orjson.loads(line)
                            obj = event.get("object") or {}
                            rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                                self._record(str(event["type"]), obj)
                self._resp.release_conn()
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.2)

    def _record(self, kind: str, pod: dict[str, Any]) -> None:
        now = time.monotonic()
        name = str(pod["metadata"]["name"])
        with self._cond:
            if kind == "DELETED":
                self.pods.pop(name, None)
                self.deleted.add(name)
            else:
                self.pods[name] = pod
                if node_name(pod) and name not in self.first_bound_at:
                    self.first_bound_at[name] = now
            self._cond.notify_all()

    def wait(self, check: Callable[[dict[str, dict[str, Any]]], bool], what: str, timeout_s: float = 60.0) -> None:
        """Block until ``check(pods)`` holds (it is called under the lock, with every change)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not check(self.pods):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
                self._cond.wait(min(left, 1.0))

    def settle(self, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until kube-scheduler has decided about ``name``: bound, or marked unschedulable."""

        def done(pods: dict[str, dict[str, Any]]) -> bool:
            pod = pods.get(name)
            return pod is not None and (bool(node_name(pod)) or unschedulable(pod))

        self.wait(done, f"a decision about pod {name}", timeout_s)
        with self._cond:
            return self.pods[name]

    def bound(self, names: Iterable[str], timeout_s: float = 60.0) -> dict[str, str]:
        """Wait until every named pod is bound; returns pod -> node."""
        wanted = list(names)

        def done(pods: dict[str, dict[str, Any]]) -> bool:
            return all(n in pods and node_name(pods[n]) for n in wanted)

        self.wait(done, f"{len(wanted)} pods bound", timeout_s)
        with self._cond:
            return {n: node_name(self.pods[n]) for n in wanted}

    def gone(self, prefix: str, timeout_s: float = 60.0) -> None:
        """Wait until no pod whose name starts with ``prefix`` is left."""
        self.wait(lambda pods: not any(n.startswith(prefix) for n in pods), f"pods {prefix}* deleted", timeout_s)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return dict(self.pods)


# -- reading assignments back -----------------------------------------------------------------------------------
@dataclass
class GpuBook:
    """Per (node, GPU index) the milli-GPUs held and by whom; MIG slices per (node, GPU) as (profile, start)."""

    milli: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    holders: dict[tuple[str, int], list[str]] = field(default_factory=lambda: defaultdict(list))
    whole: dict[tuple[str, int], list[str]] = field(default_factory=lambda: defaultdict(list))
    mig: dict[tuple[str, int], list[tuple[str, int, str]]] = field(default_factory=lambda: defaultdict(list))
    problems: list[str] = field(default_factory=list)

    def allocated_milli(self) -> int:
        return sum(self.milli.values())


def assignment_of(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(ASSIGNMENT)
    return json.loads(text) if text else None


def asks_gpu(pod: Mapping[str, Any]) -> bool:
    """Whether a container asks for a resource the extender manages (only those pods reach it)."""
    from scheduler.podspec import managed_resources

    managed = set(managed_resources())
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        if managed & {*(resources.get("requests") or {}), *(resources.get("limits") or {})}:
            return True
    return False


def mig_tables(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Node name -> MIG table of its GPUs (by their GFD product and memory labels), for nodes that have one."""
    from policies.mig import mig_table_for

    out = {}
    for node in nodes:
        labels = node["metadata"].get("labels") or {}
        table = mig_table_for(labels.get("nvidia.com/gpu.product", ""), int(labels.get("nvidia.com/gpu.memory", 0)))
        if table is not None:
            out[str(node["metadata"]["name"])] = table
    return out


def book(pods: Iterable[Mapping[str, Any]], tables: Mapping[str, str] | None = None) -> GpuBook:
    """Sum the assignment annotations of bound pods per node and GPU, noting every inconsistency.

    A problem is: a bound GPU pod without an assignment, an assignment for another node, a GPU over 1000 milli,
    a whole GPU shared with anyone, or MIG slices that are no placement of the node's table (``tables``, node ->
    MIG table name) or overlap.
    """
    from policies.mig import MIG_TABLES

    out = GpuBook()
    for pod in pods:
        node = node_name(pod)
        if not node:
            continue
        name = str(pod["metadata"]["name"])
        doc = assignment_of(pod)
        if doc is None and asks_gpu(pod):
            out.problems.append(f"{name} is bound to {node} without an assignment")
        if doc is None:
            continue
        if doc.get("node") != node:
            out.problems.append(f"{name} is bound to {node} but assigned on {doc.get('node')}")
        if doc.get("mig"):
            mig = doc["mig"]
            out.mig[(node, int(mig["gpu"]))].append((str(mig["profile"]), int(mig["start"]), name))
            continue
        milli = int(doc.get("milli") or 0)
        for gpu in doc.get("gpus") or []:
            key = (node, int(gpu))
            out.milli[key] += milli
            out.holders[key].append(name)
            if milli >= 1000:
                out.whole[key].append(name)
    for key, total in out.milli.items():
        if total > 1000:
            out.problems.append(f"{key} holds {total} milli: {out.holders[key]}")
        if out.whole[key] and len(out.holders[key]) > 1:
            out.problems.append(f"whole GPU {key} is shared: {out.holders[key]}")
    for key, slices in out.mig.items():
        table = MIG_TABLES.get((tables or {}).get(key[0], ""))
        if table is None:
            out.problems.append(f"MIG pods on {key[0]}, whose MIG table is not known: {slices}")
            continue
        occupied = 0
        for profile_name, start, name in slices:
            profile = table.profile(profile_name)
            if profile is None or start not in profile.starts:
                out.problems.append(f"{name}: {profile_name}@{start} is no MIG placement on {table.gpu_model}")
                continue
            mask = profile.mask_at(start)
            if occupied & mask:
                out.problems.append(f"MIG slices of {key} overlap: {slices}")
            occupied |= mask
    return out


# -- the shipped stack ----------------------------------------------------------------------------------------------
@dataclass
class Stack:
    """Our extender plus kube-scheduler running the shipped profile, on one control plane."""

    plane: ControlPlane
    api: Any
    extender: Extender
    scheduler: procs.Component | None = None

    @classmethod
    def start(
        cls,
        plane: ControlPlane,
        api: Any,
        policy: Path = stack.SHIPPED_POLICY,
        name: str = "gpu-scheduler",
        extender_args: Sequence[str] = (),
    ) -> Stack:
        extender = Extender(plane, policy=policy, extra_args=extender_args)
        extender.start()
        scheduler = plane.start_scheduler(stack.scheduler_config(extender.url), name=name)
        return cls(plane, api, extender, scheduler)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.plane.stop_scheduler(self.scheduler)
            self.scheduler = None
        self.extender.stop()


# -- kustomize ------------------------------------------------------------------------------------------------------
KUSTOMIZE_VERSION = "v5.8.1"
"""The newest kustomize that builds with Go 1.26 (v5.8.2 and later require Go 1.27)."""


def ensure_kustomize(log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The real kustomize, built once from the Go module proxy into the harness's cache (about a minute).

    kubectl is not part of the harness; rendering with kustomize itself, rather than imitating it, is what catches
    its transformers rewriting what the files say (a `namespace:` moves every namespaced object).
    """
    from e2e.build import cache_root, go_install

    out = cache_root() / f"kustomize-{KUSTOMIZE_VERSION}"
    return go_install(
        f"sigs.k8s.io/kustomize/kustomize/v5@{KUSTOMIZE_VERSION}", out, f"kustomize {KUSTOMIZE_VERSION}", log
    )


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build DIR` as a list of objects."""
    import subprocess

    import yaml

    proc = subprocess.run(
        [str(ensure_kustomize()), "build", str(directory)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kustomize build {directory} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
