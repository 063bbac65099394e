"""Keeps the `ClusterModel` in step with the API server: raw paginated lists, then raw watch streams.

The official client's model objects cost many times the memory and the CPU per event of reading the JSON raw
(DESIGN.md §2), so the client is used only for configuration, authentication and the connection pool: lists are
read page by page (gzip) and each object is projected at once into a compact record (a `NodeInventory`, or a
`PodRecord`); watches are read line by line from the chunked stream and resume from the last bookmark. Records go
through a queue to one publisher thread, which applies them to the model in batches, so a burst of bindings costs
one model update per batch rather than one per event and no watch ever waits on the model's lock.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from policies.demand import Demand
from policies.inventory import Assignment, NodeInventory
from scheduler.annotations import bound_assignment
from scheduler.backoff import Backoff
from scheduler.kubeapi import ApiError, api_request, read_json
from scheduler.model import ClusterModel
from scheduler.nodes import inventory_from_node
from scheduler.podspec import PodSpecError, cached_demand, host_demand

__all__ = ["ClusterWatcher", "PodRecord", "WatchStats", "model_pod_key", "project_pod"]

log = logging.getLogger(__name__)

POD_FIELD_SELECTOR = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
_NODES, _PODS = "nodes", "pods"


# -- compact records -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PodRecord:
    """What the model needs of a bound pod. `gpu_known` is False when it asks for GPUs without our assignment."""

    node: str
    assignment: Assignment
    demand: Demand
    gpu_known: bool = True
    valid: bool = True
    starting: bool = False  # a serving replica not Ready yet: its readiness changes the record
    namespace: str = ""  # for the per-namespace GPU-seconds counters (the model keys pods by UID)


def _ready(obj: Mapping[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or ()
    return any(isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def project_pod(obj: dict[str, Any]) -> PodRecord | None:
    """A bound, non-terminal pod as a `PodRecord`; None for pending or finished pods and unreadable objects."""
    spec = obj.get("spec") or {}
    node = spec.get("nodeName")
    phase = (obj.get("status") or {}).get("phase")
    if not node or phase in ("Succeeded", "Failed"):
        return None
    valid = True
    try:
        demand = cached_demand(obj)
    except PodSpecError:
        valid = False  # still occupies CPU and memory on its node
        try:
            demand = host_demand(obj)
        except PodSpecError:
            return None
    annotations = (obj.get("metadata") or {}).get("annotations")
    assignment, gpu_known = bound_assignment(annotations, node, demand)
    starting = demand.model_name is not None and not _ready(obj)
    if demand.model_name is not None:
        assignment = replace(assignment, model=demand.model_name, starting=starting)
    namespace = str((obj.get("metadata") or {}).get("namespace") or "default")
    return PodRecord(node, assignment, demand, gpu_known, valid, starting, namespace)


def model_pod_key(obj: Mapping[str, Any]) -> str:
    """The pod's key in the model: its UID (what bind and preempt requests carry), else `namespace/name`."""
    meta = obj.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace') or 'default'}/{meta.get('name')}")


def _node_key(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name"))


# -- bookkeeping ---------------------------------------------------------------------------------------
@dataclass
class WatchStats:
    """Counters for `/metrics`. Written by the watcher's threads only; readers may see a value one step behind."""

    lists: int = 0
    relists: int = 0  # lists after the first, forced by 410 Gone
    watch_restarts: int = 0  # watches re-opened from a known resourceVersion (no list needed)
    reconnects: int = 0  # connection or server errors, retried after a backoff
    events: int = 0
    bookmarks: int = 0
    batches: int = 0
    node_publishes: int = 0
    conflicts: int = 0  # bound pods the model refused (capacity already taken)
    unknown_gpu_pods: int = 0  # gauge: bound GPU pods without a readable assignment
    invalid_pods: int = 0  # gauge: bound pods whose GPU request could not be read
    unreadable: int = 0  # objects that could not be projected at all (skipped)
    event_cpu_s: float = 0.0  # CPU spent decoding and projecting watch events
    publish_cpu_s: float = 0.0  # CPU spent applying batches to the model
    last_list_s: dict[str, float] = field(default_factory=dict)


_gc_lock = threading.Lock()
_gc_state = {"depth": 0, "was_enabled": True}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic collector during a bulk list: it would rescan the growing cache thousands of times."""
    with _gc_lock:
        if _gc_state["depth"] == 0:
            _gc_state["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_state["depth"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["depth"] -= 1
            if _gc_state["depth"] == 0 and _gc_state["was_enabled"]:
                gc.enable()


@dataclass
class _Resume:
    """Where a kind's watch resumes: survives a broken stream, so only a 410 costs a list."""

    rv: str | None = None
    progressed: bool = False


class _Gone(Exception):
    """The resourceVersion is too old (410): only a fresh list can resynchronise."""


@dataclass(frozen=True)
class _Kind:
    name: str
    path: str
    selector: tuple[tuple[str, str], ...]
    key: Callable[[Mapping[str, Any]], str]
    project: Callable[[Mapping[str, Any]], Any]


# -- the watcher ---------------------------------------------------------------------------------------
class ClusterWatcher:
    """Lists and watches Nodes and bound Pods in background threads and feeds `model`.

    `ready` (and the model's) turns true once both lists have been applied. Only nodes with GPUs are published
    unless `include_cpu_nodes`; cordoned and not-Ready nodes are left out unless `include_unschedulable`.
    Events are gathered for `batch_window_s` before they are applied. `freeze_gc` moves the objects alive after
    each full list out of the collector's reach (`gc.freeze`): a full collection over a large cache pauses seconds.
    """

    def __init__(
        self,
        api_client: Any,
        model: ClusterModel,
        *,
        page_size: int = 500,
        watch_timeout_s: int = 300,
        request_timeout_s: float = 60.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        include_cpu_nodes: bool = False,
        include_unschedulable: bool = False,
        on_batch: Callable[[WatchStats], None] | None = None,
        pod_key: Callable[[Mapping[str, Any]], str] = model_pod_key,
        batch_window_s: float = 0.02,
        freeze_gc: bool = True,
    ) -> None:
        self._api = api_client
        self._model = model
        self._page_size = page_size
        self._watch_timeout_s = watch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._include_cpu_nodes = include_cpu_nodes
        self._on_batch = on_batch
        self._batch_window_s = batch_window_s
        self._freeze_gc = freeze_gc
        self.stats = WatchStats()
        self._kinds = (
            _Kind(
                _NODES,
                "/api/v1/nodes",
                (),
                _node_key,
                lambda obj: inventory_from_node(obj, include_unschedulable=include_unschedulable),
            ),
            _Kind(_PODS, "/api/v1/pods", (("fieldSelector", POD_FIELD_SELECTOR),), pod_key, project_pod),
        )
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._active: dict[str, Any] = {}
        self._active_lock = threading.Lock()
        # publisher-owned state
        self._nodes: dict[str, NodeInventory] = {}
        self._pods: dict[str, PodRecord] = {}
        self._published: dict[str, NodeInventory] = {}
        self._listed = {_NODES: False, _PODS: False}
        self._pods_reset_pending = False

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("watcher already started")
        self._stop.clear()
        self._threads = [threading.Thread(target=self._publish_loop, name="watch-publisher", daemon=True)]
        for kind in self._kinds:
            self._threads.append(
                threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind.name}", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the threads: open streams are shut down so a blocked read returns at once."""
        self._stop.set()
        with self._active_lock:
            for resp in list(self._active.values()):
                _shutdown(resp)
        self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        return self._ready.wait(timeout_s)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def namespace_of(self, key: str) -> str | None:
        """The namespace of the bound pod the model knows by `key`, None while the watch has not seen it.

        Read from other threads: one dict lookup, which sees the publisher's current dict or the one before."""
        record = self._pods.get(key)
        return None if record is None else record.namespace

    def __enter__(self) -> ClusterWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- list + watch, one thread per kind -------------------------------------------------------------------
    def _run(self, kind: _Kind) -> None:
        backoff = Backoff(*self._backoff)
        resume = _Resume()
        while not self._stop.is_set():
            try:
                if resume.rv is None:
                    resume.rv = self._list(kind)
                    backoff.reset()
                resume.progressed = False
                opened = time.monotonic()
                self._watch(kind, resume)
                self.stats.watch_restarts += 1
                if resume.progressed or time.monotonic() - opened > 1.0:
                    backoff.reset()
                else:  # a server or proxy that ends every watch at once must not make us spin
                    self._stop.wait(backoff.next())
            except _Gone as exc:
                log.info("%s: %s; listing again", kind.name, exc)
                resume.rv = None
                self.stats.relists += 1
            except Exception as exc:  # a watch must survive anything the network or the server does
                if self._stop.is_set():
                    break
                if resume.progressed:
                    backoff.reset()
                self.stats.reconnects += 1
                delay = backoff.next()
                log.warning("%s: %s: %s; retrying in %.1fs", kind.name, type(exc).__name__, exc, delay)
                self._stop.wait(delay)

    def _list(self, kind: _Kind) -> str:
        started = time.monotonic()
        records: dict[str, Any] = {}
        query_base = [("limit", str(self._page_size)), *kind.selector]
        cont = ""
        with _gc_paused():
            while True:
                query = [*query_base, ("continue", cont)] if cont else query_base
                try:
                    page = read_json(self._api, "GET", kind.path, query=query, timeout=self._request_timeout_s)
                except ApiError as exc:
                    if exc.status == 410:
                        raise _Gone(exc.message) from None
                    raise
                for item in page.get("items") or ():
                    record = self._project(kind, item)
                    if record is not None:
                        records[kind.key(item)] = record
                meta = page.get("metadata") or {}
                cont = meta.get("continue") or ""
                if not cont:
                    break
                if self._stop.is_set():
                    raise InterruptedError("stopping")
        self.stats.lists += 1
        self.stats.last_list_s[kind.name] = time.monotonic() - started
        self._queue.put(("reset", kind.name, records))
        return str(meta.get("resourceVersion") or "")

    def _watch(self, kind: _Kind, resume: _Resume) -> None:
        """Follow one watch stream until the server ends it, advancing `resume` with every event and bookmark."""
        assert resume.rv is not None
        timeout = int(self._watch_timeout_s * (1 + random.random()))
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resume.rv),
            ("timeoutSeconds", str(timeout)),
            *kind.selector,
        ]
        try:
            resp = api_request(self._api, "GET", kind.path, query=query, timeout=(10.0, timeout + 30.0))
        except ApiError as exc:
            if exc.status == 410:
                raise _Gone(exc.message) from None
            raise
        with self._active_lock:
            if self._stop.is_set():
                _shutdown(resp)
            self._active[kind.name] = resp
        complete = False
        try:
            pending = b""
            for chunk in resp.stream(1 << 16):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        resume.rv = self._event(kind, line, resume.rv)
                        resume.progressed = True
                if self._stop.is_set():
                    raise InterruptedError("stopping")
            if pending.strip():
                raise ConnectionError("watch stream ended inside an event")
            complete = True
        finally:
            with self._active_lock:
                self._active.pop(kind.name, None)
            if complete:
                resp.release_conn()
            else:
                resp.close()  # a half-read stream must not go back to the pool

    def _event(self, kind: _Kind, line: bytes, rv: str) -> str:
        started = time.thread_time()
        event = orjson.loads(line)
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410 or obj.get("reason") in ("Expired", "Gone"):
                raise _Gone(obj.get("message") or "resource version too old")
            raise ApiError(int(code or 0), obj.get("reason") or "", orjson.dumps(obj))
        new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
        if etype == "BOOKMARK":
            self.stats.bookmarks += 1
            return new_rv
        record = None if etype == "DELETED" else self._project(kind, obj)
        self._queue.put(("event", kind.name, kind.key(obj), record))
        self.stats.events += 1
        self.stats.event_cpu_s += time.thread_time() - started
        return new_rv

    def _project(self, kind: _Kind, obj: Mapping[str, Any]) -> Any:
        """Project one object; one that cannot be read is skipped rather than retried forever with its stream."""
        try:
            return kind.project(obj)
        except Exception:
            self.stats.unreadable += 1
            log.warning("%s: cannot read %s; skipped", kind.name, kind.key(obj), exc_info=True)
            return None

    # -- publisher -----------------------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            if self._batch_window_s > 0 and item[0] == "event":
                self._stop.wait(self._batch_window_s)  # let a burst gather: one model update for all of it
            with contextlib.suppress(queue.Empty):
                while len(batch) < 10_000:
                    nxt = self._queue.get_nowait()
                    if nxt is None:
                        self._stop.set()
                        break
                    batch.append(nxt)
            started = time.thread_time()
            try:
                self._apply(batch)
            except Exception:  # keep feeding the model; the next list repairs what was lost
                log.exception("applying %d watch updates failed", len(batch))
            self.stats.publish_cpu_s += time.thread_time() - started
            self.stats.batches += 1
            if self._on_batch is not None:
                self._on_batch(self.stats)

    def _apply(self, batch: list[tuple[Any, ...]]) -> None:
        nodes_changed = False
        changed_pods: set[str] = set()
        for item in batch:
            if item[0] == "reset":
                _, kind, records = item
                self._listed[kind] = True
                if kind == _NODES:
                    nodes_changed |= records.keys() != self._nodes.keys() or any(
                        not _same_node(self._nodes[k], r) for k, r in records.items()
                    )
                    self._nodes = records
                else:
                    self._pods = records
                    self._pods_reset_pending = True
                    changed_pods.clear()
                    self.stats.unknown_gpu_pods = sum(1 for r in records.values() if not r.gpu_known)
                    self.stats.invalid_pods = sum(1 for r in records.values() if not r.valid)
                continue
            _, kind, key, record = item
            if kind == _NODES:
                old = self._nodes.get(key)
                if record is None:
                    nodes_changed |= self._nodes.pop(key, None) is not None
                elif old is None or not _same_node(old, record):
                    self._nodes[key] = record
                    nodes_changed = True
            elif self._pods.get(key) != record:
                self._set_pod(key, record)
                changed_pods.add(key)
        if not self._listed[_NODES]:
            return
        added: set[str] = set()
        if nodes_changed:
            added = self._publish_nodes()
        if self._pods_reset_pending:
            self._pods_reset_pending = False
            bound = {k: (r.assignment, r.demand) for k, r in self._pods.items() if r.node in self._published}
            self.stats.conflicts += len(self._model.replace_pods(bound))
            if self._freeze_gc:
                gc.freeze()  # the cache just built is long-lived: keep the collector from rescanning it
        else:
            if added:
                changed_pods |= {k for k, r in self._pods.items() if r.node in added}
            self._push_pods(changed_pods)
        if self._listed[_PODS] and not self._ready.is_set():
            self._model.mark_ready()
            self._ready.set()

    def _set_pod(self, key: str, record: PodRecord | None) -> None:
        old = self._pods.pop(key, None)
        if old is not None:
            self.stats.unknown_gpu_pods -= not old.gpu_known
            self.stats.invalid_pods -= not old.valid
        if record is not None:
            self._pods[key] = record
            self.stats.unknown_gpu_pods += not record.gpu_known
            self.stats.invalid_pods += not record.valid

    def _publish_nodes(self) -> set[str]:
        """Send the node set to the model; returns names it did not have before (their pods must follow)."""
        published = {name: inv for name, inv in sorted(self._nodes.items()) if inv.gpus or self._include_cpu_nodes}
        before = self._published
        if published.keys() == before.keys() and all(_same_node(before[k], v) for k, v in published.items()):
            return set()
        self.stats.conflicts += len(self._model.replace_nodes(list(published.values())))
        self.stats.node_publishes += 1
        self._published = published
        return set(published) - set(before)

    def _push_pods(self, keys: set[str]) -> None:
        """Releases first, then bindings, so capacity freed in this batch is free for the pods that follow.

        Uses the model's batch entry point `apply_pod_events(bound, gone)` when it has one: each single-pod call
        republishes the whole snapshot (about 1 ms at 5,000 nodes), a batch does it once.
        """
        bound: dict[str, tuple[Assignment, Demand]] = {}
        gone: list[str] = []
        for key in keys:
            record = self._pods.get(key)
            if record is not None and record.node in self._published:
                bound[key] = (record.assignment, record.demand)
            else:
                gone.append(key)
        apply_batch = getattr(self._model, "apply_pod_events", None)
        if apply_batch is not None:
            self.stats.conflicts += len(apply_batch(bound, gone))
            return
        for key in gone:
            self._model.pod_gone(key)
        for key, (assignment, demand) in bound.items():
            if not self._model.pod_bound(key, assignment, demand):
                self.stats.conflicts += 1


def _same_node(a: NodeInventory, b: NodeInventory) -> bool:
    return a == b and a.labels == b.labels and a.cached_models == b.cached_models


def _shutdown(resp: Any) -> None:
    """Unblock a thread reading `resp`: shutting the socket down wakes a blocked recv, closing it does not."""
    try:
        if hasattr(resp, "shutdown"):
            resp.shutdown()
        else:  # urllib3 < 2.3
            resp.close()
    except Exception:  # best effort while stopping
        log.debug("closing a watch stream failed", exc_info=True)
