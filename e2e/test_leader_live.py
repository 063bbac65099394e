"""Two extender replicas with leader election, behind the real kube-scheduler: the leader is killed (SIGKILL) in
the middle of a burst of GPU pods, and the other takes over.

kube-scheduler reaches the replicas through `LeaderProxy`, a stand-in for the shipped Service: it sends each new
connection to the replica whose `/readyz/leader` says it leads and refuses connections while none does, as a
Service whose only endpoint is the leader's pod (the label `--leader-elect-pod` keeps on it) would. It also
reads the HTTP exchanges it carries, to tell which replica answered which bind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import kubernetes.client
import orjson
import pytest

from e2e import fleet, helpers, procs, stack
from e2e.controlplane import ControlPlane
from e2e.helpers import Extender, PodWatch, gpu_pod
from scheduler.kubeapi import read_json
from scheduler.leader import LEADER_LABEL
from scheduler.service import UNKNOWN_NODE

pytestmark = pytest.mark.e2e

NS = "leader-live"
POOL = "leader"
LEASE = "gpu-extender-e2e"
H100 = "NVIDIA-H100-80GB-HBM3"
NODES = 30  # 8 GPUs each: 240 GPUs
WHOLE_PODS = 160
SHARE_PODS = 40  # 500 milli each
KILL_AFTER = 60  # pods bound before the leader is killed
# Short timings: a dead leader's Lease runs out in 2 s; a leader that cannot renew stops after 1.5 s.
TIMINGS = ["--leader-elect-lease-seconds", "2", "--leader-elect-renew-seconds", "1.5"]
TIMINGS += ["--leader-elect-retry-seconds", "0.25"]
FAILOVER_TARGET_S = 5.0


@dataclass
class Exchange:
    backend: str
    path: str
    request: bytes
    status: int
    response: bytes
    at: float


class LeaderProxy:
    """A local HTTP/1.1 proxy that pins each client connection to the current leader, like a Service."""

    def __init__(self, backends: dict[str, int]) -> None:
        self.backends = backends  # name -> port
        self.leader: str | None = None
        self.led_from: dict[str, float] = {}
        """When the poll first saw each backend lead (monotonic)."""
        self.exchanges: list[Exchange] = []
        (self.port,) = procs.free_ports(1)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LeaderProxy:
        threading.Thread(target=self._poll, daemon=True, name="proxy-poll").start()
        threading.Thread(target=self._serve, daemon=True, name="proxy").start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _poll(self) -> None:
        """Readiness as the endpoints controller would see it, every 50 ms."""
        while not self._stop.is_set():
            leader = None
            for name, port in self.backends.items():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz/leader", timeout=0.5) as resp:
                        if resp.status == 200:
                            leader = name
                except (OSError, urllib.error.URLError):
                    continue
            if leader is not None:
                self.led_from.setdefault(leader, time.monotonic())
            self.leader = leader
            self._stop.wait(0.05)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", self.port))
        self._ready.set()
        loop.run_forever()

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        backend = self.leader
        if backend is None:  # no ready endpoint: refused
            client_w.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.backends[backend])
        except OSError:
            client_w.close()
            return
        try:
            while True:
                head, body = await _read_message(client_r)
                if head is None:
                    break
                up_w.write(head + body)
                await up_w.drain()
                reply_head, reply_body = await _read_message(up_r)
                if reply_head is None:
                    break
                client_w.write(reply_head + reply_body)
                await client_w.drain()
                status = int(reply_head.split(b" ", 2)[1])
                path = head.split(b" ", 2)[1].decode()
                self.exchanges.append(Exchange(backend, path, body, status, reply_body, time.monotonic()))
                if b"\r\nconnection: close" in reply_head.lower():
                    break
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            up_w.close()
            client_w.close()

    def binds(self, backend: str) -> set[str]:
        """Pods whose bind this backend answered with success."""
        out = set()
        for e in self.exchanges:
            if e.backend == backend and e.path == "/bind" and e.status == 200 and not orjson.loads(e.response)["Error"]:
                out.add(str(orjson.loads(e.request)["PodName"]))
        return out


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes | None, bytes]:
    """One HTTP/1.1 message with a Content-Length body (all that kube-scheduler and uvicorn send here)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None, b""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return head, await reader.readexactly(length) if length else b""


def _wait_labelled(api: object, leader: str) -> None:
    """Wait until the pod named ``leader`` alone carries the leader label."""

    def labelled() -> bool:
        selector = [("labelSelector", f"{LEADER_LABEL}=true")]
        pods = read_json(api, "GET", f"/api/v1/namespaces/{NS}/pods", query=selector)["items"]
        return [p["metadata"]["name"] for p in pods] == [leader]

    helpers.wait_for(labelled, f"only {leader}'s pod labelled {LEADER_LABEL}", 10)


def _leader_of(extenders: dict[str, Extender]) -> str | None:
    for name, extender in extenders.items():
        if extender.component is not None and procs.http_ok(f"{extender.url}/readyz/leader"):
            return name
    return None


@pytest.fixture(scope="module")
def replicas(control_plane: ControlPlane, api_client: kubernetes.client.ApiClient) -> Iterator[dict[str, Extender]]:
    helpers.create_namespace(api_client, NS)
    extenders = {}
    for name in ("replica-a", "replica-b"):
        # A pod of the replica's name stands for its own (it is never scheduled): the leader labels it.
        helpers.create_pod(api_client, gpu_pod(name, NS, "none", {}, scheduler_name="none"))
        args = ["--leader-elect", "--leader-elect-namespace", NS, "--leader-elect-name", LEASE]
        args += ["--leader-elect-identity", name, "--leader-elect-pod", f"{NS}/{name}", *TIMINGS]
        extenders[name] = Extender(control_plane, name=name, policy=stack.SHIPPED_POLICY, extra_args=args)
    for extender in extenders.values():
        extender.start()
    yield extenders
    for extender in extenders.values():
        extender.stop()
    helpers.delete_pods(api_client, NS)


def test_failover_after_sigkill_mid_burst(
    control_plane: ControlPlane, api_client: kubernetes.client.ApiClient, replicas: dict[str, Extender]
) -> None:
    first = helpers.wait_for(lambda: _leader_of(replicas), "a leader", 20)
    other = next(name for name in replicas if name != first)
    proxy = LeaderProxy({name: e.port for name, e in replicas.items()}).start()
    scheduler = control_plane.start_scheduler(stack.scheduler_config(proxy.url), name="gpu-scheduler-leader")
    nodes = fleet.create_nodes(
        api_client, helpers.pool_nodes([fleet.gpu_node(f"leader-n{i:02d}", 8, H100) for i in range(NODES)], POOL)
    )
    try:
        probe = gpu_pod("probe", NS, POOL, {"nvidia.com/gpu": "1"})
        for extender in replicas.values():  # both views are warm: the follower's from its own watch

            def knows(extender: Extender = extender) -> bool:
                body = {"Pod": probe, "NodeNames": nodes}
                verdicts = helpers.http_post_json(f"{extender.url}/explain", body)["nodes"]
                return all(v["reason"] != UNKNOWN_NODE for v in verdicts)

            helpers.wait_for(knows, f"{extender.name} to see the pool", 30)

        pods = [gpu_pod(f"whole-{i:03d}", NS, POOL, {"nvidia.com/gpu": "1"}) for i in range(WHOLE_PODS)]
        pods += [gpu_pod(f"share-{i:03d}", NS, POOL, {"gpu-extender.io/gpu-milli": "500"}) for i in range(SHARE_PODS)]
        names = [p["metadata"]["name"] for p in pods]
        with PodWatch(api_client, NS) as watch:
            started = time.monotonic()
            threading.Thread(target=helpers.create_pods, args=(api_client, pods), daemon=True).start()
            watch.wait(lambda seen: sum(1 for p in seen.values() if helpers.node_name(p)) >= KILL_AFTER, "a start")
            replicas[first].kill()
            killed_at = time.monotonic()
            bound_before_kill = len(watch.first_bound_at)
            placed = watch.bound(names, timeout_s=90)
            finished = time.monotonic()
            final = watch.snapshot()

        taken_over = proxy.binds(other)
        assert taken_over, f"{other} bound nothing after {first} was killed"
        first_of_other = min(e.at for e in proxy.exchanges if e.status == 200 and e.backend == other)

        def attributed() -> bool:
            """A pod bound after the other's first answer is one whose bind answer the proxy has relayed (the
            watch can see the last binds before their answers are through)."""
            late = {name for name, at in watch.first_bound_at.items() if at >= first_of_other}
            return late <= proxy.binds(other)

        helpers.wait_for(attributed, "the proxy to relay the last bind answers", 10)
        taken_over = proxy.binds(other)
        failover = min(watch.first_bound_at[name] for name in taken_over) - killed_at
        leads = proxy.led_from[other] - killed_at
        print(
            f"\nkill -9 of the leader ({first}) after {bound_before_kill} of {len(names)} pods bound: {other} leads "
            f"{leads:.2f} s later, binds its first pod {failover:.2f} s after the kill; all {len(names)} bound "
            f"{finished - started:.1f} s after the burst started"
        )
        assert failover <= FAILOVER_TARGET_S, f"failover took {failover:.2f} s"

        # Every pod bound, no GPU given twice.
        assert len(placed) == len(names) and all(placed.values())
        problems = helpers.book(final.values()).problems
        assert not problems, problems
        # No pod bound by both replicas, and none by the follower while the leader lived.
        by_first, by_other = proxy.binds(first), taken_over
        assert not by_first & by_other, by_first & by_other
        last_of_first = max(e.at for e in proxy.exchanges if e.status == 200 and e.backend == first)
        assert last_of_first <= killed_at < first_of_other
        # A pod whose bind answer the kill cut off was bound by the killed leader: before the other answered at all.
        unattributed = set(names) - by_first - by_other
        assert all(watch.first_bound_at[name] < first_of_other for name in unattributed), unattributed

        metrics = helpers.parse_metrics(helpers.http_get(f"{replicas[other].url}/metrics"))
        assert metrics["gpu_extender_leader"] == 1
        assert metrics['gpu_extender_leader_transitions_total{to="leader"}'] == 1
        lease = read_json(api_client, "GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE}")
        assert lease["spec"]["holderIdentity"] == other
        assert lease["spec"]["leaseTransitions"] >= 1
        # The Service's selector follows: the new leader labelled its pod and unlabelled the dead one's.
        _wait_labelled(api_client, other)
    finally:
        control_plane.stop_scheduler(scheduler)
        proxy.stop()
        helpers.delete_pods(api_client, NS, f"{helpers.POOL_LABEL}={POOL}")
        helpers.delete_nodes(api_client, nodes)


def test_sigterm_releases_the_lease_for_an_immediate_takeover(
    api_client: kubernetes.client.ApiClient, replicas: dict[str, Extender]
) -> None:
    """A restarted replica joins as a follower; the leader stopped with SIGTERM hands over at once, not after
    its lease runs out."""
    for extender in replicas.values():
        if extender.component is None:
            extender.start()
    leader = helpers.wait_for(lambda: _leader_of(replicas), "a leader", 20)
    follower = next(name for name in replicas if name != leader)
    assert not procs.http_ok(f"{replicas[follower].url}/readyz/leader")
    stopped_at = time.monotonic()
    replicas[leader].stop()  # SIGTERM
    helpers.wait_for(lambda: _leader_of(replicas) == follower, f"{follower} to lead", 10, 0.02)
    handover = time.monotonic() - stopped_at
    print(f"\nSIGTERM of the leader: {follower} leads {handover:.2f} s later (lease duration 2 s)")
    lease = read_json(api_client, "GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE}")
    assert lease["spec"]["holderIdentity"] == follower
    _wait_labelled(api_client, follower)
    # Released, not expired: a lease left to run out would keep the follower waiting 2 s from its last renewal.
    assert "lease released" in replicas[leader].log_path.read_text()
    assert handover < 1.5


def test_a_frozen_leader_does_not_decide_when_it_wakes(replicas: dict[str, Extender]) -> None:
    """SIGSTOP stands for a stalled leader (a long pause, a stopped VM): past its renew deadline the other takes
    over, and the first call the old one answers on waking is a refusal, before its election loop has run."""
    for extender in replicas.values():
        if extender.component is None:
            extender.start()
    leader = helpers.wait_for(lambda: _leader_of(replicas), "a leader", 20)
    other = next(name for name in replicas if name != leader)
    frozen = replicas[leader]
    assert frozen.component is not None
    os.kill(frozen.component.pid, signal.SIGSTOP)
    try:
        helpers.wait_for(lambda: procs.http_ok(f"{replicas[other].url}/readyz/leader"), f"{other} to lead", 10)
        answer: list[int] = []

        def call() -> None:  # sent while frozen: served the moment it wakes
            request = urllib.request.Request(f"{frozen.url}/filter", data=b"{}", method="POST")
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    answer.append(resp.status)
            except urllib.error.HTTPError as exc:
                answer.append(exc.code)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.2)
    finally:
        os.kill(frozen.component.pid, signal.SIGCONT)
    caller.join(10)
    assert answer == [503]
    assert not procs.http_ok(f"{frozen.url}/readyz/leader")
    assert frozen.metrics()["gpu_extender_leader"] == 0
    assert frozen.metrics()["gpu_extender_leader_refused_calls_total"] >= 1
    # The election loop reports the change once it runs again.
    follower = 'gpu_extender_leader_transitions_total{to="follower"}'
    helpers.wait_for(lambda: frozen.metrics()[follower] >= 1, "the lost leadership in the metrics", 5)
