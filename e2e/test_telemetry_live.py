"""Live GPU utilization end to end: node agents on the fake NVML backend, a real Prometheus scraping them, and the
extender in live mode reading it, with kube-scheduler binding pods through the extender.

Two fleet nodes each have an agent (`gpu-extender agent --nvml fake:...`, the node's name as `Hostname`):
`tl-steady` runs at a constant 40 %, `tl-flip` is idle and turns 95 % busy a few seconds after it starts. With
the utilization weight dominating the policy, the extender must prefer `tl-flip` while it is idle and `tl-steady`
once it is busy, within one telemetry interval plus one scrape. When Prometheus stops, the samples expire, every
GPU becomes unknown and placement falls back to allocation alone while pods keep being bound; when Prometheus
comes back on its port, the same extender process reads fresh samples again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import kubernetes.client
import pytest
import yaml

from e2e import fleet, helpers, procs, stack
from e2e.controlplane import ControlPlane
from e2e.helpers import Extender, PodWatch, Stack, gpu_pod
from e2e.prometheus import Prometheus
from policies.feasibility import REASON_TEXT, Reason
from scheduler.agent.fake_nvml import FakeNvml
from scheduler.agent.sampler import Sampler, inventory_doc
from scheduler.annotations import GPU_INVENTORY
from scheduler.podspec import ANNOTATION_GPU_MEMORY, GPU_MILLI_RESOURCE

pytestmark = pytest.mark.e2e

NS = "telemetry-live"
POOL = "telemetry"
H100 = "NVIDIA-H100-80GB-HBM3"
FLIP = "tl-flip"
STEADY = "tl-steady"
POLICY = stack.SHIPPED_POLICY

GPUS = 8
FLIP_AFTER_S = 10.0
"""Seconds after its agent starts that `tl-flip` turns busy: room for a scrape and a query to show it idle first."""
FLIP_BUSY, STEADY_BUSY = 0.95, 0.40
SCRAPE_S = 1.0
INTERVAL_S = 1.0
WINDOW_S = 1.0
"""One sample in the smoothing window: the score follows the newest scrape, so the delay measures the pipeline."""
MAX_AGE_S = 3.0
SLACK_S = 2.0
"""What a shared two-core machine adds to a bound: HTTP round trips, a query, process scheduling."""
UTILIZATION_WEIGHT = 10.0
"""Headroom differs by 0.55 between the nodes: 5.5 points, beyond anything fragmentation or packing adds here."""
NEUTRAL = 0.5  # `utilization_score` of a GPU without fresh telemetry


STEADY_MEMORY_USED = 0.90
"""`tl-steady`'s GPUs report 90 % of their memory in use (a server that took it up front), though no pod there
declares any: about 8 GiB of each 80 GB left."""


def agent_spec(util: str, memory_used: float = 0.0) -> str:
    return f"h100x{GPUS};util={util};mem=const:{memory_used * 100:g}"


AGENTS = {
    FLIP: agent_spec(f"step:0@0,{FLIP_BUSY * 100:g}@{FLIP_AFTER_S:g}"),
    STEADY: agent_spec(f"const:{STEADY_BUSY * 100:g}", STEADY_MEMORY_USED),
}


def published_inventory(hostname: str, spec: str) -> str:
    """The inventory annotation the agent on ``hostname`` would publish (same fake GPUs, same UUIDs)."""
    fake = FakeNvml.from_spec(spec, hostname=hostname)
    fake.init()
    try:
        doc = inventory_doc(Sampler(fake).sample().gpus)
    finally:
        fake.shutdown()
    return doc.model_dump_json(by_alias=True, exclude_none=True)


def start_agents(
    specs: dict[str, str], ports: dict[str, int], workdir: Path, started: list[procs.Component]
) -> dict[str, str]:
    """One agent per node on the fake NVML ``specs[node]``, serving `/metrics` on ``ports[node]`` without
    publishing to the API server; returns node -> base URL once each answers `/healthz`. Every process is appended
    to ``started`` as soon as it exists, so the caller's teardown stops it even when a later one fails."""
    agents: dict[str, procs.Component] = {}
    for node, spec in specs.items():
        argv = [sys.executable, "-m", "extender.cli", "agent", "--nvml", f"fake:{spec}", "--hostname", node]
        argv += ["--host", "127.0.0.1", "--port", str(ports[node]), "--no-publish", "--interval", "1"]
        agents[node] = procs.spawn(f"agent-{node}", argv, workdir / "logs" / f"agent-{node}.log")
        started.append(agents[node])
    for node, agent in agents.items():
        url = f"http://127.0.0.1:{ports[node]}/healthz"
        procs.wait_until(agent, lambda u=url: procs.http_ok(u), "/healthz", 30)
    return {node: f"http://127.0.0.1:{ports[node]}" for node in specs}


class TelemetryExtender(Extender):
    """The live extender with the telemetry store on: it reads utilization from ``prometheus_url``."""

    def __init__(
        self, plane: ControlPlane, policy: Path, prometheus_url: str, name: str = "gpu-extender-telemetry"
    ) -> None:
        telemetry_args = [
            f"--prometheus-url={prometheus_url}",
            f"--telemetry-interval={INTERVAL_S:g}",
            f"--telemetry-window={WINDOW_S:g}",
            f"--telemetry-max-age={MAX_AGE_S:g}",
        ]
        super().__init__(plane, name=name, policy=policy, extra_args=telemetry_args)


class Running(NamedTuple):
    system: Stack
    extender: TelemetryExtender
    prometheus: Prometheus
    agents: dict[str, str]  # node -> agent base URL


@contextmanager
def telemetry_system(
    control_plane: ControlPlane,
    api_client: kubernetes.client.ApiClient,
    workdir: Path,
    namespace: str,
    nodes: list[dict[str, Any]],
    specs: dict[str, str],
    policy: Path,
    extender_name: str,
    agents_last: bool = False,
) -> Iterator[Running]:
    """The fleet `nodes`, one fake agent per `specs` entry, a real Prometheus scraping them, the extender reading
    it and kube-scheduler with the shipped profile. Everything is torn down whatever fails: the pods of
    `namespace`, the processes, the nodes. `agents_last`: start the agents once the rest is up (their load
    schedules run from their start)."""
    names = fleet.create_nodes(api_client, nodes)
    ports = dict(zip(specs, procs.free_ports(len(specs)), strict=True))
    prometheus = Prometheus(workdir, [f"127.0.0.1:{port}" for port in ports.values()], scrape_interval_s=SCRAPE_S)
    agents: list[procs.Component] = []
    system: Stack | None = None
    try:
        prometheus.start()
        urls = {} if agents_last else start_agents(specs, ports, workdir, agents)
        extender = TelemetryExtender(control_plane, policy, prometheus.url, name=extender_name)
        system = Stack(control_plane, api_client, extender)
        extender.start()
        system.scheduler = control_plane.start_scheduler(stack.scheduler_config(extender.url), name="gpu-scheduler")
        if agents_last:
            urls = start_agents(specs, ports, workdir, agents)
        yield Running(system, extender, prometheus, urls)
    finally:
        helpers.delete_pods(api_client, namespace)
        if system is not None:
            system.stop()
        prometheus.stop()
        for agent in agents:
            procs.stop(agent)
        helpers.delete_nodes(api_client, names)


@dataclass
class Live:
    """Everything the scenarios drive: the stack, Prometheus, the agents' URLs and a watch on the pods."""

    system: Stack
    extender: TelemetryExtender
    prometheus: Prometheus
    agents: dict[str, str]  # node -> agent base URL
    watch: PodWatch

    def probe(self) -> dict[str, Any]:
        return gpu_pod("probe", NS, POOL, {"nvidia.com/gpu": "1"})

    def prioritize(self) -> dict[str, int]:
        """kube-scheduler's prioritize call, as it sends it with nodeCacheCapable: node names only."""
        body = {"Pod": self.probe(), "Nodes": None, "NodeNames": [FLIP, STEADY]}
        reply = helpers.http_post_json(f"{self.extender.url}/prioritize", body)
        return {h["Host"]: h["Score"] for h in reply}

    def preferred(self) -> str:
        scores = self.prioritize()
        return next(host for host, score in scores.items() if score == max(scores.values()))

    def headroom(self) -> dict[str, float]:
        """Each node's utilization component (1 - busy at the chosen GPU; 0.5 when unknown), from /explain."""
        body = {"Pod": self.probe(), "NodeNames": [FLIP, STEADY]}
        nodes = helpers.http_post_json(f"{self.extender.url}/explain", body)["nodes"]
        return {n["node"]: n["components"]["utilization"] for n in nodes if n["fits"]}

    def telemetry(self) -> dict[str, float]:
        """The store's own gauges and counters, from the extender's /metrics."""
        metrics = self.extender.metrics()
        return {
            "gpus": metrics.get("gpu_extender_telemetry_gpus", -1.0),
            "fresh": metrics.get('gpu_extender_telemetry_nodes{state="fresh"}', -1.0),
            "stale": metrics.get('gpu_extender_telemetry_nodes{state="stale"}', -1.0),
            "errors": metrics.get('gpu_extender_telemetry_queries_total{result="error"}', 0.0),
            "ok": metrics.get('gpu_extender_telemetry_queries_total{result="ok"}', 0.0),
        }

    def agent_util(self, node: str) -> float:
        """GPU 0's `DCGM_FI_DEV_GPU_UTIL` as the node's agent serves it now (the source of truth)."""
        for key, value in helpers.parse_metrics(helpers.http_get(f"{self.agents[node]}/metrics")).items():
            if key.startswith("DCGM_FI_DEV_GPU_UTIL{") and 'gpu="0"' in key:
                return value
        raise AssertionError(f"the agent of {node} serves no DCGM_FI_DEV_GPU_UTIL for GPU 0")

    def extender_log(self) -> str:
        return self.extender.log_path.read_text(errors="replace")

    def context(self) -> str:
        """What a failure message should show: the store's metrics and the last lines of both logs."""
        return (
            f"\ntelemetry: {self.telemetry()}\n--- extender log ---\n{procs.log_tail(self.extender.log_path, 15)}"
            f"\n--- prometheus log ---\n{self.prometheus.log_tail(10)}"
        )


@pytest.fixture(scope="module")
def live(
    control_plane: ControlPlane, api_client: kubernetes.client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("telemetry-live")
    policy = yaml.safe_load(POLICY.read_text())
    policy["weights"]["utilization"] = UTILIZATION_WEIGHT
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))

    helpers.create_namespace(api_client, NS)
    nodes = [
        fleet.gpu_node(name, GPUS, H100, annotations={GPU_INVENTORY: published_inventory(name, spec)})
        for name, spec in AGENTS.items()
    ]
    # The agents come last: `tl-flip`'s schedule runs from its start, and everything else must be up by then.
    with (
        telemetry_system(
            control_plane,
            api_client,
            workdir,
            NS,
            helpers.pool_nodes(nodes, POOL),
            AGENTS,
            policy_path,
            "gpu-extender-telemetry",
            agents_last=True,
        ) as running,
        PodWatch(api_client, NS) as watch,
    ):
        yield Live(running.system, running.extender, running.prometheus, running.agents, watch)


def wait_fresh(live: Live, timeout_s: float) -> float:
    """Until every GPU of both nodes has a fresh busy fraction in the extender; returns the seconds it took."""
    started = time.monotonic()
    try:
        helpers.wait_for(
            lambda: live.telemetry()["gpus"] == 2 * GPUS and live.telemetry()["fresh"] == 2,
            "fresh utilization for both nodes",
            timeout_s,
            0.05,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}{live.context()}") from None
    return time.monotonic() - started


def test_scores_follow_a_change_of_load(live: Live) -> None:
    waited = wait_fresh(live, timeout_s=FLIP_AFTER_S)
    print(f"\nfresh utilization in the extender {waited:.2f}s after the agents answered")
    headroom, scores = live.headroom(), live.prioritize()
    assert live.agent_util(FLIP) == 0, "tl-flip turned busy before the extender saw it idle: raise FLIP_AFTER_S"
    assert headroom[FLIP] == pytest.approx(1.0, abs=0.02), headroom
    assert headroom[STEADY] == pytest.approx(1 - STEADY_BUSY, abs=0.02), headroom
    assert scores[FLIP] == 10 and scores[STEADY] < 10, f"idle {FLIP} should win: {scores}"

    helpers.wait_for(lambda: live.agent_util(FLIP) > 0, "tl-flip's agent to report the load", FLIP_AFTER_S + 5, 0.02)
    flipped_at = time.monotonic()
    assert live.agent_util(FLIP) == pytest.approx(FLIP_BUSY * 100)
    bound = SCRAPE_S + INTERVAL_S + SLACK_S
    try:
        helpers.wait_for(lambda: live.preferred() == STEADY, f"the extender to prefer {STEADY}", bound + 5, 0.02)
    except AssertionError as exc:
        raise AssertionError(f"{exc}{live.context()}") from None
    delay = time.monotonic() - flipped_at
    print(f"scores followed the load {delay:.2f}s after the agent served it (bound {bound:.1f}s)")
    assert delay <= bound, f"scores followed the load after {delay:.2f}s, more than {bound:.1f}s"
    headroom = live.headroom()
    assert headroom[FLIP] == pytest.approx(1 - FLIP_BUSY, abs=0.02), headroom
    assert headroom[STEADY] == pytest.approx(1 - STEADY_BUSY, abs=0.02), headroom


def test_measured_gpu_memory_refuses_what_declarations_would_allow(live: Live) -> None:
    """A share declaring 20 GiB of GPU memory: by declarations every GPU of both nodes has 80 GB free, but
    `tl-steady` measures about 8 GiB free on each, so only `tl-flip` may take it; 4 GiB fits on both."""
    wait_fresh(live, timeout_s=10)

    def fits(gpu_memory: str) -> dict[str, str]:
        pod = gpu_pod("memory-probe", NS, POOL, {GPU_MILLI_RESOURCE: "500"}, {ANNOTATION_GPU_MEMORY: gpu_memory})
        body = {"Pod": pod, "NodeNames": [FLIP, STEADY]}
        return {n["node"]: n["reason"] for n in helpers.http_post_json(f"{live.extender.url}/explain", body)["nodes"]}

    try:
        assert fits("20Gi") == {FLIP: REASON_TEXT[Reason.FITS], STEADY: REASON_TEXT[Reason.NO_GPU_SHARE]}
        assert fits("4Gi") == {FLIP: REASON_TEXT[Reason.FITS], STEADY: REASON_TEXT[Reason.FITS]}
    except AssertionError as exc:
        raise AssertionError(f"{exc}{live.context()}") from None


def test_prometheus_outage_falls_back_and_recovers(live: Live) -> None:
    helpers.wait_for(lambda: live.agent_util(FLIP) > 0, "tl-flip's agent to report the load", FLIP_AFTER_S + 10)
    wait_fresh(live, timeout_s=10)
    helpers.wait_for(lambda: live.preferred() == STEADY, f"the extender to prefer {STEADY}", 10, 0.05)
    before = live.telemetry()
    url = live.prometheus.url

    # Outage: queries fail, the held samples expire, every GPU is unknown and scores are allocation-only.
    live.prometheus.stop()
    stopped_at = time.monotonic()
    try:
        helpers.wait_for(
            lambda: live.telemetry()["gpus"] == 0 and live.telemetry()["fresh"] == 0,
            "the extender to give up the expired samples",
            MAX_AGE_S + INTERVAL_S + SLACK_S + 5,
            0.05,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}{live.context()}") from None
    fallback = time.monotonic() - stopped_at
    print(f"\nfallback engaged {fallback:.2f}s after Prometheus stopped (max age {MAX_AGE_S:g}s)")
    assert fallback <= MAX_AGE_S + SCRAPE_S + INTERVAL_S + SLACK_S
    during = live.telemetry()
    assert during["errors"] > before["errors"], during
    assert during["stale"] >= 2, during
    log = live.extender_log()
    assert "cannot read utilization from Prometheus" in log
    assert "no fresh utilization for some nodes" in log
    assert live.headroom() == {FLIP: NEUTRAL, STEADY: NEUTRAL}

    # kube-scheduler keeps binding GPU pods through the extender, where allocation alone puts them.
    for i in range(4):
        pod = gpu_pod(f"outage-{i}", NS, POOL, {"nvidia.com/gpu": "1"})
        body = {"Pod": pod, "NodeNames": [FLIP, STEADY]}
        verdicts = [v for v in helpers.http_post_json(f"{live.extender.url}/explain", body)["nodes"] if v["fits"]]
        best = {v["node"] for v in verdicts if v["raw"] == verdicts[0]["raw"]}
        helpers.create_pod(live.system.api, pod)
        placed = live.watch.settle(pod["metadata"]["name"], timeout_s=30)
        node = helpers.node_name(placed)
        assert node, f"outage-{i} was not bound: {helpers.scheduled_condition(placed)}"
        assert node in best, f"outage-{i} went to {node}; allocation alone prefers {best}"
        assignment = helpers.assignment_of(placed)
        assert assignment is not None and assignment["node"] == node and len(assignment["gpus"]) == 1
    bound = [p for p in live.watch.snapshot().values() if p["metadata"]["name"].startswith("outage-")]
    assert len(bound) == 4 and helpers.book(bound).problems == []
    assert live.telemetry()["gpus"] == 0, "fresh data appeared while Prometheus was down"

    # Recovery: Prometheus returns on the same port; the same extender process reads fresh samples again.
    extender_pid = live.extender.component.pid if live.extender.component else None
    live.prometheus.start()
    assert live.prometheus.url == url and live.prometheus.starts == 2
    restarted_at = time.monotonic()
    live.prometheus.wait_targets_up(timeout_s=20)  # a starting Prometheus applies its targets after up to 5 s
    scraped_at = time.monotonic()
    recovered = wait_fresh(live, timeout_s=SCRAPE_S + INTERVAL_S + SLACK_S + 5)
    print(
        f"fresh utilization again {recovered:.2f}s after Prometheus scraped the agents"
        f" ({scraped_at - restarted_at:.2f}s after it was ready)"
    )
    assert recovered <= INTERVAL_S + SLACK_S, f"the store took {recovered:.2f}s to read fresh samples again"
    assert live.extender.component is not None and live.extender.component.pid == extender_pid
    assert "Prometheus answers again" in live.extender_log()
    helpers.wait_for(lambda: live.preferred() == STEADY, f"the extender to prefer {STEADY} again", 5, 0.05)
    headroom = live.headroom()
    assert headroom[FLIP] == pytest.approx(1 - FLIP_BUSY, abs=0.02), headroom
    assert headroom[STEADY] == pytest.approx(1 - STEADY_BUSY, abs=0.02), headroom
    assert time.monotonic() - restarted_at < 30
