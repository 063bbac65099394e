"""Leader election over a `coordination.k8s.io/v1` Lease: of several extender replicas, one decides.

A module of our own rather than the `kubernetes` client's `leaderelection` (v37). That one measures expiry and
its own validity with the wall clock (a clock step can make two leaders), does not release the Lease on shutdown
(a rolling update then waits a whole lease duration with nobody binding), sets no timeout on its lease calls (a
hung call stalls the renew loop while the leader keeps deciding), and reports leadership through callbacks run
on its own thread, where every verb needs a cheap, always-correct "may I decide now?".

The rules, as client-go's:

- A candidate takes the Lease when nobody holds it, when its holder released it (empty holder), or when the
  record has not changed for `leaseDurationSeconds` *as measured on the candidate's own monotonic clock from
  when it first saw that record*. Wall-clock times in the record are informative only; no two clocks are compared.
- Every write is a compare-and-swap on the Lease's resourceVersion, so of two candidates at most one wins.
- The leader may decide only until `renew_seconds` after the start of its last successful renewal
  (`is_leader()` compares against that monotonic deadline on every call, whatever its renew loop is doing).
  Any other candidate waits at least `lease_seconds` from a moment after that renewal was written, and
  `renew_seconds < lease_seconds`: the old leader has stopped before a new one starts. The difference is the
  margin for a decision already under way (a bind in flight) and for clock rate differences.
- `stop()` stops deciding first, then releases the Lease (empty holder, a 1 s duration), so a successor takes it
  on its next attempt instead of after a whole lease duration.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

log = logging.getLogger("gpu_extender.leader")

LEADER_LABEL = "gpu-extender.io/leader"
"""The label the leader puts on its own pod (`--leader-elect-pod`): the Service selects it."""


class LeaseConflict(Exception):
    """The Lease changed (or appeared) since it was read: another candidate wrote first."""


@dataclass(frozen=True)
class LeaseRecord:
    """The fields of a Lease's spec that election uses, and the resourceVersion a write must match."""

    holder: str
    lease_seconds: int
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0
    resource_version: str = ""


class LeaseApi(Protocol):
    """Reads and compare-and-swap writes of one Lease; every call bounded by ``timeout`` seconds."""

    def get(self, timeout: float) -> LeaseRecord | None: ...

    def create(self, record: LeaseRecord, timeout: float) -> LeaseRecord: ...

    def update(self, record: LeaseRecord, timeout: float) -> LeaseRecord: ...


@dataclass(frozen=True)
class LeaderConfig:
    namespace: str
    name: str
    identity: str
    lease_seconds: int = 15
    renew_seconds: float = 10.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("leader election needs an identity")
        if not 0 < self.retry_seconds < self.renew_seconds < self.lease_seconds:
            raise ValueError(
                "leader election timings must satisfy 0 < retry < renew deadline < lease duration, got "
                f"retry {self.retry_seconds}, renew {self.renew_seconds}, lease {self.lease_seconds}"
            )

    @property
    def request_timeout(self) -> float:
        """One attempt is a read and a write: both fit within the renew deadline."""
        return self.renew_seconds / 2


def micro_time(moment: datetime) -> str:
    """A Lease's MicroTime (RFC 3339 with microseconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Take and keep the Lease; `is_leader()` says whether this replica may decide at this instant.

    ``eligible`` keeps a candidate from taking the Lease before it could decide (its cluster view not yet
    complete). ``on_change`` is told every change of leadership, from the election thread.
    """

    def __init__(
        self,
        api: LeaseApi,
        config: LeaderConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        eligible: Callable[[], bool] = lambda: True,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self._clock = clock
        self._wall = wall
        self._eligible = eligible
        self._on_change = on_change
        self._valid_until = -math.inf
        self._observed: LeaseRecord | None = None
        self._observed_at = -math.inf
        self._reported = False
        self.transitions = {"leader": 0, "follower": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one attempt at a time: the loop's, or stop's release

    @property
    def identity(self) -> str:
        return self.config.identity

    def is_leader(self) -> bool:
        """Whether this replica may decide now: by the monotonic clock, before its renew deadline."""
        return self._clock() < self._valid_until

    @property
    def holder(self) -> str:
        """The holder of the Lease as last read (empty: none or unknown)."""
        observed = self._observed
        return observed.holder if observed is not None else ""

    # -- one attempt ----------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One attempt to take or renew the Lease; returns whether it holds it now. Never raises."""
        with self._lock:
            start = self._clock()
            try:
                won = self._try_acquire_or_renew()
            except LeaseConflict:
                won = False
            except Exception as exc:  # the API server is unreachable or answered oddly: try again later
                log.warning("lease attempt failed", extra={"lease": self.config.name, "error": str(exc)})
                won = False
            if won:
                self._valid_until = max(self._valid_until, start + self.config.renew_seconds)
        self._report()
        return won

    def _try_acquire_or_renew(self) -> bool:
        cfg = self.config
        timeout = cfg.request_timeout
        record = self.api.get(timeout)
        now_wall = micro_time(self._wall())
        if record is None:
            if not self._eligible():
                return False
            mine = LeaseRecord(cfg.identity, cfg.lease_seconds, now_wall, now_wall, 0)
            self._observe(self.api.create(mine, timeout))
            return True
        self._observe(record)
        if record.holder != cfg.identity:
            held = bool(record.holder) and self._clock() < self._observed_at + record.lease_seconds
            if held or not self._eligible():
                return False
        ours = record.holder == cfg.identity
        mine = replace(
            record,
            holder=cfg.identity,
            lease_seconds=cfg.lease_seconds,
            renew_time=now_wall,
            acquire_time=record.acquire_time if ours else now_wall,
            transitions=record.transitions if ours else record.transitions + 1,
        )
        self._observe(self.api.update(mine, timeout))
        return True

    def _observe(self, record: LeaseRecord) -> None:
        """Remember when a record was first seen: a Lease expires by time since its last change, as we saw it."""
        if self._observed is None or record.resource_version != self._observed.resource_version:
            self._observed = record
            self._observed_at = self._clock()

    def _report(self) -> None:
        leading = self.is_leader()
        if leading == self._reported:
            return
        self._reported = leading
        self.transitions["leader" if leading else "follower"] += 1
        log.warning(
            "leadership changed",
            extra={"leader": leading, "identity": self.config.identity, "lease": self.config.name},
        )
        if self._on_change is not None:
            try:
                self._on_change(leading)
            except Exception:
                log.exception("leadership callback failed")

    # -- the loop -----------------------------------------------------------------------------------------------------
    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="leader-election")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.step()
            wait = self.config.retry_seconds
            if self._reported:  # wake at the deadline to report a lost leadership on time
                wait = min(wait, max(0.0, self._valid_until - self._clock()) + 0.001)
            self._stop.wait(wait)
            self._report()

    def stop(self, release: bool = True) -> None:
        """Stop deciding and campaigning; with ``release``, hand the Lease back so a successor takes it at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.request_timeout * 2 + 1)
        with self._lock:
            was_leader = self.is_leader()
            self._valid_until = -math.inf
        self._report()
        if release and was_leader:
            self.release()

    def release(self) -> bool:
        """Empty the holder if the Lease is still ours; returns whether it was released."""
        cfg = self.config
        with self._lock:
            try:
                record = self.api.get(cfg.request_timeout)
                if record is None or record.holder != cfg.identity:
                    return False
                now_wall = micro_time(self._wall())
                released = replace(record, holder="", lease_seconds=1, acquire_time=now_wall, renew_time=now_wall)
                self._observe(self.api.update(released, cfg.request_timeout))
            except Exception as exc:
                log.warning("could not release the lease", extra={"lease": cfg.name, "error": str(exc)})
                return False
        log.info("lease released", extra={"lease": cfg.name, "identity": cfg.identity})
        return True


# -- the Kubernetes API -----------------------------------------------------------------------------------------
class KubernetesLeaseApi:
    """The Lease through the API server (raw requests through the client's configuration and pool)."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.name = name
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    def get(self, timeout: float) -> LeaseRecord | None:
        from scheduler.kubeapi import ApiError, read_json

        try:
            return _record(read_json(self.api_client, "GET", f"{self._collection}/{self.name}", timeout=timeout))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, record: LeaseRecord, timeout: float) -> LeaseRecord:
        return self._write("POST", self._collection, record, timeout)

    def update(self, record: LeaseRecord, timeout: float) -> LeaseRecord:
        return self._write("PUT", f"{self._collection}/{self.name}", record, timeout)

    def _write(self, method: str, path: str, record: LeaseRecord, timeout: float) -> LeaseRecord:
        from scheduler.kubeapi import ApiError, read_json

        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if record.resource_version:
            metadata["resourceVersion"] = record.resource_version
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": record.holder,
                "leaseDurationSeconds": record.lease_seconds,
                "acquireTime": record.acquire_time,
                "renewTime": record.renew_time,
                "leaseTransitions": record.transitions,
            },
        }
        try:
            return _record(read_json(self.api_client, method, path, body=body, timeout=timeout))
        except ApiError as exc:
            if exc.status == 409:
                raise LeaseConflict(str(exc)) from exc
            raise


def _record(lease: dict[str, Any]) -> LeaseRecord:
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        lease_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=spec.get("acquireTime"),
        renew_time=spec.get("renewTime"),
        transitions=int(spec.get("leaseTransitions") or 0),
        resource_version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
    )


class PodLabeller:
    """Keeps `LEADER_LABEL` on the leader's pod only, so a Service selecting it sends traffic to the leader.

    A new leader labels its pod and takes the label off every other pod of its namespace (a crashed leader
    cannot); a replica that stops leading, or starts, takes it off its own. The patches run on a thread of their
    own so a slow API server never delays a renewal. Routing only: correctness comes from `is_leader()`.
    """

    def __init__(self, api_client: Any, namespace: str, pod: str, timeout: float = 5.0) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.pod = pod
        self.timeout = timeout
        self._wanted: queue.Queue[bool | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="leader-label")

    def start(self) -> PodLabeller:
        self._wanted.put(False)  # a restarted container keeps its pod's labels
        self._thread.start()
        return self

    def __call__(self, leading: bool) -> None:
        self._wanted.put(leading)

    def stop(self) -> None:
        self._wanted.put(None)
        self._thread.join(self.timeout + 1)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            pending = [self._wanted.get()]
            while not self._wanted.empty():
                pending.append(self._wanted.get())
            stopping = None in pending
            states = [state for state in pending if state is not None]
            if not states:
                continue
            try:
                self.apply(states[-1])  # only the latest state matters
            except Exception as exc:
                log.warning("could not label the leader's pod", extra={"pod": self.pod, "error": str(exc)})

    def apply(self, leading: bool) -> None:
        from scheduler.kubeapi import read_json

        self._label(self.pod, "true" if leading else None)
        if not leading:
            return
        selector = [("labelSelector", f"{LEADER_LABEL}=true")]
        pods = read_json(
            self.api_client, "GET", f"/api/v1/namespaces/{self.namespace}/pods", query=selector, timeout=self.timeout
        )
        for pod in pods.get("items") or []:
            name = str(pod["metadata"]["name"])
            if name != self.pod:
                self._label(name, None)

    def _label(self, pod: str, value: str | None) -> None:
        from scheduler.kubeapi import read_json

        read_json(
            self.api_client,
            "PATCH",
            f"/api/v1/namespaces/{self.namespace}/pods/{pod}",
            body={"metadata": {"labels": {LEADER_LABEL: value}}},
            headers={"Content-Type": "application/merge-patch+json"},
            timeout=self.timeout,
        )


# -- the command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("leader election (several replicas, one decides)")
    group.add_argument(
        "--leader-elect",
        action="store_true",
        help="answer the scheduler's verbs and run the background loops only while holding the Lease",
    )
    group.add_argument("--leader-elect-namespace", default=os.environ.get("POD_NAMESPACE") or "gpu-extender-system")
    group.add_argument("--leader-elect-name", default="gpu-extender", help="the Lease's name")
    group.add_argument("--leader-elect-lease-seconds", type=int, default=15, help="lease duration (default 15)")
    group.add_argument(
        "--leader-elect-renew-seconds",
        type=float,
        default=10.0,
        help="a leader that has not renewed for this long stops deciding (default 10, below the lease duration)",
    )
    group.add_argument(
        "--leader-elect-retry-seconds", type=float, default=2.0, help="time between attempts (default 2)"
    )
    group.add_argument(
        "--leader-elect-identity", help="this replica's name in the Lease (default: pod name or host, plus a suffix)"
    )
    group.add_argument(
        "--leader-elect-pod",
        help=f"NAMESPACE/NAME of this replica's pod: the leader labels it {LEADER_LABEL}=true for its Service",
    )


def default_identity() -> str:
    """The pod's name (or the host's) and a random suffix: a restarted process is a new candidate."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(4)}"


def config_from_args(args: argparse.Namespace) -> LeaderConfig | None:
    """The election's settings, or None without `--leader-elect`. Raises ValueError for inconsistent timings."""
    if not getattr(args, "leader_elect", False):
        return None
    return LeaderConfig(
        namespace=args.leader_elect_namespace,
        name=args.leader_elect_name,
        identity=args.leader_elect_identity or default_identity(),
        lease_seconds=args.leader_elect_lease_seconds,
        renew_seconds=args.leader_elect_renew_seconds,
        retry_seconds=args.leader_elect_retry_seconds,
    )
