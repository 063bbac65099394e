"""The HTTP side of leader election: only the leader answers the scheduler's verbs.

A follower refuses them instead of forwarding them to the leader. The decisions worth keeping in one process
(placements held between filter and bind, scores computed ahead) live in the leader's memory: forwarding would add
a second hop and a second process to every call on the scheduler's serial loop for half the traffic, and a way
to send calls to a leader that is gone. kube-scheduler retries a refused pod like any extender error, and the
Service sends calls only to the leader (`--leader-elect-pod` labels it), so a follower sees calls only in the
moments routing lags behind the Lease. Its refusal closes the connection: the scheduler's next call opens a new
one, which the Service routes to the leader (an open keep-alive connection would stay with the follower).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from scheduler.leader import KubernetesLeaseApi, LeaderElector, PodLabeller, config_from_args
from scheduler.model import ClusterModel

GATED_VERBS = frozenset({"/filter", "/prioritize", "/bind", "/preempt"})
LEADER_PATH = "/readyz/leader"
"""200 on the leader, 503 on a follower: the readiness of "the replica that should answer"."""


class LeaderGate:
    """ASGI front: the scheduler's verbs reach the app only on the leader; `LEADER_PATH` reports leadership."""

    def __init__(self, app: ASGIApp, elector: LeaderElector) -> None:
        self.app = app
        self.elector = elector
        self.refused = 0

    @property
    def state(self) -> object:
        return getattr(self.app, "state", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in GATED_VERBS and scope["method"] == "POST" and not self.elector.is_leader():
                self.refused += 1
                holder = self.elector.holder or "unknown"
                error = f"GPU extender {self.elector.identity} is not the leader (the Lease is held by {holder})"
                await _respond(send, 503, {"Error": error}, close=True)
                return
            if path == LEADER_PATH and scope["method"] == "GET":
                leading = self.elector.is_leader()
                body = {"leader": leading, "identity": self.elector.identity, "holder": self.elector.holder}
                await _respond(send, 200 if leading else 503, body)
                return
        await self.app(scope, receive, send)


async def _respond(send: Send, status: int, body: object, close: bool = False) -> None:
    payload = orjson.dumps(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class LeaderCollector(Collector):
    """`gpu_extender_leader` (0/1), leadership changes, and verbs refused as a follower, at scrape time."""

    def __init__(self, elector: LeaderElector, refused: Callable[[], int]) -> None:
        self._elector = elector
        self._refused = refused

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "gpu_extender_leader",
            "1 while this replica holds the Lease and may decide",
            float(self._elector.is_leader()),
        )
        changes = CounterMetricFamily(
            "gpu_extender_leader_transitions",
            "Leadership changes of this replica, by the state it went to",
            labels=["to"],
        )
        for state, count in self._elector.transitions.items():
            changes.add_metric([state], count)
        yield changes
        yield CounterMetricFamily(
            "gpu_extender_leader_refused_calls",
            "Scheduler calls refused because this replica is not the leader",
            self._refused(),
        )


class Leadership:
    """What `serve --leader-elect` runs: the elector, the label on the leader's pod, and the gate in front."""

    def __init__(self, elector: LeaderElector, labeller: PodLabeller | None = None) -> None:
        self.elector = elector
        self.labeller = labeller

    def start(self, app: ASGIApp, registry: CollectorRegistry) -> LeaderGate:
        gate = LeaderGate(app, self.elector)
        registry.register(LeaderCollector(self.elector, lambda: gate.refused))
        if self.labeller is not None:
            self.labeller.start()
        self.elector.start()
        return gate

    def stop(self) -> None:
        self.elector.stop(release=True)
        if self.labeller is not None:
            self.labeller.stop()


def leadership_from_args(args: argparse.Namespace, model: ClusterModel, api_client: Any) -> Leadership | None:
    """The election `--leader-elect` asks for (None without it). A replica campaigns only once its cluster view
    is complete, so a new leader decides at once. Raises ValueError for settings that cannot work."""
    config = config_from_args(args)
    if config is None:
        return None
    if api_client is None:
        raise ValueError("--leader-elect needs a live cluster (not --fleet)")
    labeller = None
    if args.leader_elect_pod:
        namespace, _, pod = args.leader_elect_pod.rpartition("/")
        if not namespace or not pod:
            raise ValueError(f"--leader-elect-pod wants NAMESPACE/NAME, got {args.leader_elect_pod!r}")
        labeller = PodLabeller(api_client, namespace, pod)
    api = KubernetesLeaseApi(api_client, config.namespace, config.name)
    elector = LeaderElector(api, config, eligible=lambda: model.ready, on_change=labeller)
    return Leadership(elector, labeller)
