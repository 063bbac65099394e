"""Overcommit end to end: batch GPU shares borrow the measured idle capacity of fully allocated GPUs, decided by
the extender from a real Prometheus scraping fake-NVML node agents, and bound by the real kube-scheduler running
the shipped profile.

The pool `overcommit` has three H100 nodes, every GPU allocated before the first borrower arrives:

- `oc-idle` (3 GPUs, 10 % busy): one GPU held by an ordinary `gpu-milli: 1000` pod (shareable), two by
  `nvidia.com/gpu` pods (exclusive). kube-scheduler's own `gpu-milli` count leaves room for two more shares.
- `oc-excl` (2 GPUs, 10 % busy): both held by `nvidia.com/gpu` pods. Idle, but exclusive tenants never lend.
- `oc-busy` (2 GPUs, 90 % busy): one shareable and one exclusive tenant. 0.9 + 0.2 exceeds 1 - safetyMargin.

So exactly one GPU of the pool may lend, to exactly one full share (maxBorrowedMilliPerGpu 1000), and only to a
batch pod that asks through `gpu-extender.io/gpu-milli` and declares its GPU memory. Every refusal is asserted
through kube-scheduler: the pod stays Pending and its FailedScheduling event counts the nodes the extender turned
down with its reason (nodes kube-scheduler rejects itself are reported with kube-scheduler's own words).

A fourth node, `oc-full` (pool `overcommit-full`), has both GPUs held by `gpu-milli: 1000` pods: the case where
kube-scheduler's accounting of the extended resource, not the extender, decides (see the last test).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import pytest
import yaml

from e2e import fleet, helpers, procs, stack
from e2e.controlplane import ControlPlane
from e2e.helpers import PodWatch, Stack, gpu_pod
from e2e.prometheus import Prometheus
from e2e.test_telemetry_live import (
    INTERVAL_S,
    MAX_AGE_S,
    SLACK_S,
    TelemetryExtender,
    published_inventory,
    telemetry_system,
)
from policies.feasibility import REASON_TEXT, Reason
from scheduler.annotations import GPU_INVENTORY
from scheduler.podspec import (
    ANNOTATION_EXPECTED_BUSY,
    ANNOTATION_GPU_MEMORY,
    ANNOTATION_LATENCY_CLASS,
    GPU_MILLI_RESOURCE,
)

pytestmark = pytest.mark.e2e

NS = "overcommit-live"
POOL = "overcommit"
FULL_POOL = "overcommit-full"
H100 = "NVIDIA-H100-80GB-HBM3"
POLICY = stack.SHIPPED_POLICY
HOSTNAME = "kubernetes.io/hostname"
ROLE = "e2e.gpu-extender.io/role"
WHOLE = fleet.GPU_RESOURCE

IDLE, EXCL, BUSY, FULL = "oc-idle", "oc-excl", "oc-busy", "oc-full"
IDLE_LOAD, BUSY_LOAD = 0.10, 0.90
NODES: dict[str, tuple[str, int, float]] = {  # node -> (pool, GPUs, constant busy fraction)
    IDLE: (POOL, 3, IDLE_LOAD),
    EXCL: (POOL, 2, IDLE_LOAD),
    BUSY: (POOL, 2, BUSY_LOAD),
    FULL: (FULL_POOL, 2, IDLE_LOAD),
}
SHARE = {GPU_MILLI_RESOURCE: "1000"}
EXCLUSIVE = {WHOLE: "1"}
FILLERS: dict[str, list[dict[str, str]]] = {  # what holds every GPU before a borrower arrives; shares first
    IDLE: [SHARE, EXCLUSIVE, EXCLUSIVE],
    EXCL: [EXCLUSIVE, EXCLUSIVE],
    BUSY: [SHARE, EXCLUSIVE],
    FULL: [SHARE, SHARE],
}
SAFETY_MARGIN = 0.2
EXPECTED_BUSY = 0.2
"""0.1 + 0.2 <= 0.8 lends; 0.9 + 0.2 does not, nor would any expected busy on `oc-busy`."""
MAX_BORROWED_MILLI = 1000  # the shipped maxBorrowedMilliPerGpu: one full share per GPU
BORROWER = {ANNOTATION_GPU_MEMORY: "20Gi", ANNOTATION_EXPECTED_BUSY: f"{EXPECTED_BUSY:g}"}
REFUSED = REASON_TEXT[Reason.GPUS_BUSY]
"""The extender's reason for a `gpu-milli: 1000` pod on a node where no GPU is free and none lends."""


def pod(
    name: str,
    resources: Mapping[str, str],
    role: str,
    annotations: Mapping[str, str] | None = None,
    node: str | None = None,
    pool: str = POOL,
) -> dict[str, Any]:
    """A GPU pod of ``pool`` labelled with its ``role`` (for clean-up), pinned to ``node`` when given."""
    manifest = gpu_pod(name, NS, pool, resources, annotations)
    manifest["metadata"]["labels"][ROLE] = role
    if node is not None:
        manifest["spec"]["nodeSelector"][HOSTNAME] = node
    return manifest


def borrower(name: str, role: str, node: str | None = None, pool: str = POOL, **extra: str) -> dict[str, Any]:
    """A batch pod that may borrow: a full share asked through `gpu-milli`, declared memory and expected busy.
    ``extra`` sets `gpu-extender.io/` annotations by their name in snake case; an empty value removes one
    (``gpu_memory=""``)."""
    annotations = dict(BORROWER)
    for key, value in extra.items():
        full = f"gpu-extender.io/{key.replace('_', '-')}"
        if value:
            annotations[full] = value
        else:
            annotations.pop(full, None)
    return pod(name, SHARE, role, annotations, node, pool)


@dataclass(frozen=True)
class Tenant:
    """One pod's hold on one GPU, as its assignment annotation and its spec say."""

    pod: str
    milli: int
    borrowed: bool
    exclusive: bool
    interactive: bool


def tenants(pods: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], list[Tenant]]:
    """(node, GPU) -> the bound pods holding it, read back from the API server's objects."""
    out: dict[tuple[str, int], list[Tenant]] = {}
    for p in pods:
        node, doc = helpers.node_name(p), helpers.assignment_of(p)
        if not node or doc is None:
            continue
        requests = p["spec"]["containers"][0]["resources"]["requests"]
        annotations = p["metadata"].get("annotations") or {}
        tenant = Tenant(
            pod=str(p["metadata"]["name"]),
            milli=int(doc.get("milli") or 0),
            borrowed=bool(doc.get("borrowed")),
            exclusive=WHOLE in requests,
            interactive=annotations.get(ANNOTATION_LATENCY_CLASS) == "interactive",
        )
        for gpu in doc.get("gpus") or []:
            out.setdefault((node, int(gpu)), []).append(tenant)
    return out


def ledger_problems(held: Mapping[tuple[str, int], list[Tenant]]) -> list[str]:
    """What overcommit must never produce: an allocation above the GPU, borrowed load above the policy's cap, a
    borrowed share where the allocation still had room, or next to an exclusive or interactive tenant."""
    problems = []
    for key, on_gpu in sorted(held.items()):
        allocated = sum(t.milli for t in on_gpu if not t.borrowed)
        borrowed = [t for t in on_gpu if t.borrowed]
        if allocated > 1000:
            problems.append(f"{key} has {allocated} milli allocated: {on_gpu}")
        if sum(t.milli for t in borrowed) > MAX_BORROWED_MILLI:
            problems.append(f"{key} carries more borrowed load than the policy allows: {on_gpu}")
        if borrowed and allocated + min(t.milli for t in borrowed) <= 1000:
            problems.append(f"{key} lends though its allocation had room: {on_gpu}")
        if borrowed and any(t.exclusive or t.interactive for t in on_gpu):
            problems.append(f"{key} lends next to a tenant that forbids it: {on_gpu}")
    return problems


@dataclass
class Live:
    """The running system and what the scenarios read from it."""

    system: Stack
    extender: TelemetryExtender
    prometheus: Prometheus
    watch: PodWatch
    share_gpu: int = -1  # the GPU of `oc-idle` whose tenant is shareable: the only one that may lend

    @property
    def api(self) -> Any:
        return self.system.api

    def explain(self, manifest: dict[str, Any], nodes: Iterable[str] = (IDLE, EXCL, BUSY)) -> dict[str, Any]:
        """The extender's verdict per node (node -> fits, reason, placement, components)."""
        body = {"Pod": manifest, "NodeNames": list(nodes)}
        return {v["node"]: v for v in helpers.http_post_json(f"{self.extender.url}/explain", body)["nodes"]}

    def lends(self) -> bool:
        """Whether the extender would now place a borrower on `oc-idle`'s shareable GPU: telemetry is fresh and
        the loads of the pods bound last are measured rather than estimated. The precondition of every check."""
        idle = self.explain(borrower("probe", "probe"), [IDLE])[IDLE]
        return bool(idle["fits"]) and idle.get("placement", {}).get("gpus") == [self.share_gpu]

    def wait_lending(self, timeout_s: float = 15.0) -> None:
        try:
            helpers.wait_for(self.lends, f"{IDLE}'s GPU {self.share_gpu} to lend", timeout_s, 0.1)
        except AssertionError as exc:
            verdicts = self.explain(borrower("probe", "probe"))
            raise AssertionError(f"{exc}\nverdicts: {verdicts}{self.context()}") from None

    def telemetry(self) -> dict[str, float]:
        metrics = self.extender.metrics()
        return {
            "gpus": metrics.get("gpu_extender_telemetry_gpus", -1.0),
            "fresh": metrics.get('gpu_extender_telemetry_nodes{state="fresh"}', -1.0),
            "borrowed": metrics.get("gpu_extender_borrowed_gpus", -1.0),
        }

    def bind(self, manifest: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        """Submit the pod; return it once kube-scheduler has bound it (fail with its condition otherwise)."""
        helpers.create_pod(self.api, manifest)
        name = manifest["metadata"]["name"]
        placed = self.watch.settle(name, timeout_s)
        assert helpers.node_name(placed), (
            f"{name} was not bound: {helpers.scheduled_condition(placed)} {helpers.events(self.api, NS, name)}"
            f"{self.context()}"
        )
        return placed

    def refused(self, manifest: dict[str, Any], nodes: int, timeout_s: float = 30.0) -> str:
        """Submit the pod; check kube-scheduler leaves it Pending because the extender turned down ``nodes``
        nodes with `REFUSED`, and return the FailedScheduling message."""
        helpers.create_pod(self.api, manifest)
        name = manifest["metadata"]["name"]
        placed = self.watch.settle(name, timeout_s)
        assert not helpers.node_name(placed), f"{name} was bound: {helpers.assignment_of(placed)}"
        messages = helpers.wait_for(lambda: helpers.events(self.api, NS, name), f"FailedScheduling of {name}", 30)
        message = messages[-1]
        assert f"{nodes} {REFUSED}" in message, f"{name}: {message}{self.context()}"
        return message

    def remove(self, role: str) -> None:
        helpers.delete_pods(self.api, NS, f"{ROLE}={role}")
        self.watch.wait(
            lambda pods: not any(p["metadata"]["labels"].get(ROLE) == role for p in pods.values()),
            f"pods of role {role} deleted",
            30,
        )

    def held(self) -> dict[tuple[str, int], list[Tenant]]:
        return tenants(self.watch.snapshot().values())

    def context(self) -> str:
        return (
            f"\ntelemetry: {self.telemetry()}\n--- extender log ---\n{procs.log_tail(self.extender.log_path, 15)}"
            f"\n--- prometheus log ---\n{self.prometheus.log_tail(10)}"
        )


def fill(live: Live) -> None:
    """Allocate every GPU: each filler pinned to its node, bound by kube-scheduler through the extender. Shareable
    fillers declare the busy fraction their node runs at: the shipped policy judges a lender by its tenants'
    declarations as well as by its measured load (`declaredBusy`), and undeclared tenants count whole."""
    for node, fillers in FILLERS.items():
        pool, _, load = NODES[node]
        for i, resources in enumerate(fillers):
            declared = {ANNOTATION_EXPECTED_BUSY: f"{load:g}"} if GPU_MILLI_RESOURCE in resources else None
            live.bind(pod(f"fill-{node}-{i}", resources, "fill", declared, node=node, pool=pool))
    held = live.held()
    expected = {(node, g) for node, (_, gpus, _) in NODES.items() for g in range(gpus)}
    assert set(held) == expected and all(len(t) == 1 and t[0].milli == 1000 for t in held.values()), held
    (live.share_gpu,) = [g for (node, g), on_gpu in held.items() if node == IDLE and not on_gpu[0].exclusive]


@pytest.fixture(scope="module")
def live(
    control_plane: ControlPlane, api_client: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("overcommit-live")
    policy = yaml.safe_load(POLICY.read_text())
    policy["overcommit"] |= {"enabled": True, "safetyMargin": SAFETY_MARGIN}
    assert policy["overcommit"]["maxBorrowedMilliPerGpu"] == MAX_BORROWED_MILLI
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))

    helpers.create_namespace(api_client, NS)
    specs = {node: f"h100x{gpus};util=const:{load * 100:g}" for node, (_, gpus, load) in NODES.items()}
    manifests: list[dict[str, Any]] = []
    for node, (pool, gpus, _) in NODES.items():
        inventory = {GPU_INVENTORY: published_inventory(node, specs[node])}  # the agent's GPUs, UUIDs included
        manifests += helpers.pool_nodes([fleet.gpu_node(node, gpus, H100, annotations=inventory)], pool)
    with (
        telemetry_system(
            control_plane, api_client, workdir, NS, manifests, specs, policy_path, "gpu-extender-overcommit"
        ) as running,
        PodWatch(api_client, NS) as watch,
    ):
        live = Live(running.system, running.extender, running.prometheus, watch)
        fill(live)
        yield live


def test_ineligible_pods_and_guarded_or_busy_gpus_do_not_borrow(live: Live) -> None:
    """Each refusal while a proper borrower would be placed: telemetry is fresh and `oc-idle` lends."""
    live.wait_lending()
    try:
        # Not a batch pod: interactive pods never share a GPU with borrowed load, in either direction.
        live.refused(borrower("interactive", "negative", latency_class="interactive"), nodes=3)
        # No declared GPU memory: memory is never lent, so the pod must say how much it needs.
        live.refused(borrower("no-memory", "negative", gpu_memory=""), nodes=3)
        # Exclusive tenants: `oc-excl` is as idle as `oc-idle`, but `nvidia.com/gpu` pods hold its GPUs.
        message = live.refused(borrower("on-exclusive", "negative", node=EXCL), nodes=1)
        assert "Insufficient" not in message, message  # kube-scheduler's counts let it through to the extender
        # Measured load: `oc-busy`'s shareable GPU reports 90 %, above 1 - margin before the pod adds anything.
        message = live.refused(borrower("on-busy", "negative", node=BUSY), nodes=1)
        assert "Insufficient" not in message, message
        assert live.lends(), f"{IDLE} stopped lending during the check{live.context()}"
        assert not any(t.borrowed for on_gpu in live.held().values() for t in on_gpu)
    finally:
        live.remove("negative")


def test_idle_allocated_gpu_lends_one_batch_share(live: Live) -> None:
    """The pool is fully allocated, yet a proper borrower is bound, on the one GPU whose tenant is shareable and
    idle, marked borrowed; a second one is refused because that GPU already carries the one share it may lend."""
    live.wait_lending()
    try:
        first = live.bind(borrower("borrow-0", "borrow"))
        doc = helpers.assignment_of(first)
        assert helpers.node_name(first) == IDLE, f"bound to {helpers.node_name(first)}, only {IDLE} may lend"
        assert doc is not None and doc.get("borrowed") is True, doc
        assert doc["node"] == IDLE and doc["gpus"] == [live.share_gpu] and doc["milli"] == 1000, doc
        holders = live.held()[(IDLE, live.share_gpu)]
        assert sorted((t.pod, t.borrowed) for t in holders) == [("borrow-0", True), (f"fill-{IDLE}-0", False)]
        assert not ledger_problems(live.held()), ledger_problems(live.held())
        helpers.wait_for(lambda: live.telemetry()["borrowed"] == 1.0, "gpu_extender_borrowed_gpus == 1", 10)

        # The same pod again: `oc-idle`'s lender carries its one borrowed share (kube-scheduler's `gpu-milli`
        # count still has room there), its other GPUs are exclusive, and the other nodes lend nothing either.
        message = live.refused(borrower("borrow-1", "borrow"), nodes=3)
        assert "Insufficient" not in message, message
        held = live.held()
        assert not ledger_problems(held), ledger_problems(held)
        lent = {key for key, on_gpu in held.items() if any(t.borrowed for t in on_gpu)}
        assert lent == {(IDLE, live.share_gpu)}, lent
    finally:
        live.remove("borrow")


def test_stale_telemetry_lends_nothing_until_prometheus_returns(live: Live) -> None:
    """Unknown load lends nothing: once Prometheus is gone and the samples expire the borrower waits, and the
    same extender process lends again when Prometheus is back."""
    live.wait_lending()
    live.prometheus.stop()
    stopped_at = time.monotonic()
    try:
        try:
            helpers.wait_for(
                lambda: live.telemetry()["gpus"] == 0, "the samples to expire", MAX_AGE_S + INTERVAL_S + SLACK_S + 5
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}{live.context()}") from None
        print(f"\nsamples expired {time.monotonic() - stopped_at:.2f}s after Prometheus stopped")
        # Allocation only: the pool is full, so the pod waits; nothing may be lent on unknown load.
        live.refused(borrower("stale-0", "stale"), nodes=3)
        assert not any(t.borrowed for on_gpu in live.held().values() for t in on_gpu)
    finally:
        live.prometheus.start()
    live.prometheus.wait_targets_up(timeout_s=20)
    helpers.wait_for(lambda: live.telemetry()["gpus"] == sum(g for _, g, _ in NODES.values()), "fresh samples", 15)
    live.wait_lending()
    try:
        # kube-scheduler retries a Pending pod on cluster events, not when samples arrive: submit it again.
        live.remove("stale")
        placed = live.bind(borrower("stale-1", "stale"))
        doc = helpers.assignment_of(placed)
        assert doc is not None and doc.get("borrowed") is True and doc["gpus"] == [live.share_gpu], doc
        assert helpers.node_name(placed) == IDLE
        assert not ledger_problems(live.held()), ledger_problems(live.held())
    finally:
        live.remove("stale")


def test_gpus_allocated_through_gpu_milli_lend(live: Live) -> None:
    """`oc-full`: both GPUs held by `gpu-milli: 1000` batch pods, 10 % busy. The node's gpu-milli count is
    used up, so this passes only because the shipped profile leaves share accounting to the extender."""
    probe = borrower("probe", "probe", pool=FULL_POOL)
    helpers.wait_for(lambda: live.explain(probe, [FULL])[FULL]["fits"], f"{FULL} to lend", 15)
    try:
        manifest = borrower("full-0", "full", pool=FULL_POOL)
        helpers.create_pod(live.api, manifest)
        placed = live.watch.settle("full-0", 30)
        if not helpers.node_name(placed):
            message = helpers.wait_for(lambda: helpers.events(live.api, NS, "full-0"), "FailedScheduling", 30)[-1]
            raise AssertionError(f"{FULL} did not lend: {message}")
        doc = helpers.assignment_of(placed)
        assert doc is not None and doc.get("borrowed") is True and doc["node"] == FULL, doc
    finally:
        live.remove("full")
