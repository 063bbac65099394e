"""The pre-warmer's decisions: a model's activity read from its requests, the forecaster asked once per idle spell,
warm inside its keep-alive and ahead of a forecast window by the start time, and its actions on vLLM replicas
(wake and sleep, against the fake vLLM server) and on the replica floor."""

from __future__ import annotations

from typing import Any

import pytest

from policies.forecast import FixedKeepAlive, HistogramPolicy, WarmPlan
from policies.prewarm import lapsed, warm_decision
from scheduler.prewarm import loop as prewarm_loop
from scheduler.prewarm.activity import activity_until
from scheduler.prewarm.cluster import Replica, ServingDeployment
from scheduler.prewarm.loop import PrewarmLoop
from scheduler.vllm.client import VllmClient
from scheduler.vllm.fake import FakeVllm

MODEL = "meta-llama/Llama-3.2-1B-Instruct"


def test_activity_tracks_busy_spells_and_idle_times() -> None:
    requests = [(0.0, 10.0), (5.0, 20.0), (100.0, 1.0), (300.0, 5.0)]
    at_50 = activity_until(requests, 50.0)
    assert not at_50.busy and at_50.idle_since == 25.0
    assert at_50.history.idle_times == []  # the second request arrived while the first ran
    at_200 = activity_until(requests, 200.0)
    assert at_200.history.idle_times == [75.0] and at_200.idle_since == 101.0
    at_302 = activity_until(requests, 302.0)
    assert at_302.busy and at_302.idle_since is None and at_302.history.idle_times == [75.0, 199.0]
    assert activity_until([], 10.0).idle_since is None


def test_warm_inside_the_keep_alive_and_from_one_start_ahead_of_the_window() -> None:
    plan = WarmPlan(keep_until=100.0, prewarm_at=500.0, prewarm_until=700.0)
    assert warm_decision(plan, False, 50.0, 30.0).reason == "keep-alive"
    idle = warm_decision(plan, False, 200.0, 30.0)
    assert not idle.warm and idle.until == 470.0
    assert warm_decision(plan, False, 470.0, 30.0).reason == "forecast window"
    assert not warm_decision(plan, False, 700.0, 30.0).warm
    assert warm_decision(plan, True, 700.0, 30.0).reason == "serving"
    assert not lapsed(plan, 699.0) and lapsed(plan, 700.0)


def periodic(period: float, count: int, service: float = 2.0) -> list[tuple[float, float]]:
    return [(i * period, service) for i in range(count)]


def deployment(sleep_level: int | None = None, pods: tuple[Replica, ...] = (), replicas: int = 0) -> ServingDeployment:
    return ServingDeployment("ns", "small", MODEL, replicas, None, None, sleep_level, pods)


def test_the_histogram_forecaster_opens_a_window_before_the_next_periodic_request() -> None:
    requests = periodic(600.0, 20)
    loop = PrewarmLoop(None, HistogramPolicy(), lambda now: {}, start_s=30.0)
    last_end = 19 * 600.0 + 2.0
    d = deployment()

    def at(now: float) -> Any:
        return loop.decide(d, activity_until(requests, now), now)

    assert not at(last_end + 60).warm  # let go at once: the next request is minutes away
    head = min(loop._plans[MODEL][1].prewarm_at or 0, 1e9)
    assert head - last_end == pytest.approx(540.0 * 0.9, abs=1)  # the 5th percentile bin, less the margin
    assert not at(head - 31).warm
    assert at(head - 29).reason == "forecast window"


def test_a_model_with_too_little_history_gets_the_fixed_keep_alive() -> None:
    loop = PrewarmLoop(None, HistogramPolicy(fallback_keep_s=600.0), lambda now: {}, start_s=30.0)
    requests = periodic(600.0, 3)
    d = deployment()
    assert loop.decide(d, activity_until(requests, 1300.0), 1300.0).reason == "keep-alive"
    assert not loop.decide(d, activity_until(requests, 1202.0 + 600.0), 1202.0 + 600.0).warm


class _Floor:
    """Records floor calls in place of the API server."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def raise_floor(self, api: Any, d: ServingDeployment, floor: int) -> bool:
        self.calls.append(("raise", d.name))
        return d.replicas < floor

    def release_floor(self, api: Any, d: ServingDeployment, floor: int) -> bool:
        self.calls.append(("release", d.name))
        return True


@pytest.fixture
def floor(monkeypatch: pytest.MonkeyPatch) -> _Floor:
    recorder = _Floor()
    monkeypatch.setattr(prewarm_loop, "raise_floor", recorder.raise_floor)
    monkeypatch.setattr(prewarm_loop, "release_floor", recorder.release_floor)
    return recorder


def test_sleep_mode_puts_idle_replicas_to_sleep_and_wakes_them_for_the_window(floor: _Floor) -> None:
    with FakeVllm(MODEL, service_time_s=0.0) as server:
        client = VllmClient(server.url)
        d = deployment(sleep_level=1, pods=(Replica("small-0", True, server.url),), replicas=1)
        loop = PrewarmLoop(None, FixedKeepAlive(60.0), lambda now: {}, start_s=30.0, wake_s=2.0)
        done = loop._act(d, warm_decision(None, False, 0.0, 2.0))
        assert [a.action for a in done] == ["sleep"] and client.is_sleeping()
        assert loop._act(d, warm_decision(None, False, 0.0, 2.0)) == []  # asleep already
        woke = loop._act(d, warm_decision(WarmPlan(0.0, 10.0, 50.0), False, 9.0, 2.0))
        assert [a.action for a in woke] == ["wake"] and not client.is_sleeping()
        assert floor.calls == [("raise", "small")]  # one replica is there: the floor holds


def test_without_sleep_mode_the_floor_is_raised_for_a_window_and_given_back_after(floor: _Floor) -> None:
    loop = PrewarmLoop(None, FixedKeepAlive(60.0), lambda now: {}, start_s=30.0)
    raised = loop._act(deployment(), warm_decision(WarmPlan(0.0, 100.0, 200.0), False, 80.0, 30.0))
    assert [(a.action, a.reason) for a in raised] == [("raise_floor", "forecast window")]
    released = loop._act(deployment(replicas=1), warm_decision(WarmPlan(0.0, 100.0, 200.0), False, 200.0, 30.0))
    assert [a.action for a in released] == ["release_floor"]


def test_an_unreachable_replica_is_skipped(floor: _Floor) -> None:
    loop = PrewarmLoop(None, FixedKeepAlive(60.0), lambda now: {})
    d = deployment(sleep_level=1, pods=(Replica("gone", True, "http://127.0.0.1:9"),), replicas=1)
    assert loop._act(d, warm_decision(None, False, 0.0, 2.0)) == []


def test_placeholders_ask_what_a_replica_asks_at_the_lowest_priority() -> None:
    from kubernetes import client

    from scheduler.prewarm.placeholders import PLACEHOLDER_FOR, PRIORITY_CLASS, placeholder_manifest

    container = client.V1Container(
        name="vllm",
        image="vllm/vllm-openai",
        resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}, requests={"cpu": "4"}),
    )
    serving = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="small", namespace="serving"),
        spec=client.V1DeploymentSpec(
            selector=client.V1LabelSelector(match_labels={"app": "small"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "small"}, annotations={"gpu-extender.io/model": MODEL}),
                spec=client.V1PodSpec(
                    containers=[container], scheduler_name="gpu-scheduler", node_selector={"pool": "serving"}
                ),
            ),
        ),
    )
    manifest = placeholder_manifest(serving, 2)
    template = manifest["spec"]["template"]
    assert manifest["metadata"]["name"] == "small-placeholder" and manifest["spec"]["replicas"] == 2
    # Its pods are not the serving Deployment's: another selector, so neither ReplicaSet adopts the other's pods.
    assert manifest["spec"]["selector"]["matchLabels"] == {PLACEHOLDER_FOR: "small"}
    assert "app" not in template["metadata"]["labels"]
    spec = template["spec"]
    assert spec["priorityClassName"] == PRIORITY_CLASS and spec["schedulerName"] == "gpu-scheduler"
    assert spec["nodeSelector"] == {"pool": "serving"}
    (pause,) = spec["containers"]
    assert pause["resources"] == {"requests": {"cpu": "4"}, "limits": {"nvidia.com/gpu": "1"}}
    assert template["metadata"]["annotations"] == {"gpu-extender.io/model": MODEL}


def test_starts_are_staggered_soonest_window_first(floor: _Floor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three models' windows open in one round; two starts a round: the two closing first start now, the third in
    the next round."""
    models = {"a": 300.0, "b": 100.0, "c": 200.0}  # window end per model
    raised: set[str] = set()

    def serving(api: Any, namespace: str | None) -> list[ServingDeployment]:
        return [ServingDeployment("ns", m, m, int(m in raised), None, None, None, ()) for m in models]

    def raise_floor(api: Any, d: ServingDeployment, at_least: int) -> bool:
        if d.replicas >= at_least:
            return False
        raised.add(d.name)
        return True

    monkeypatch.setattr(prewarm_loop, "list_serving", serving)
    monkeypatch.setattr(prewarm_loop, "raise_floor", raise_floor)
    loop = PrewarmLoop(None, FixedKeepAlive(60.0), lambda now: {}, clock=lambda: 50.0, max_starts_per_round=2)
    monkeypatch.setattr(
        loop, "decide", lambda d, activity, now: warm_decision(WarmPlan(0.0, 0.0, models[d.name]), False, now, 5.0)
    )
    assert [a.deployment for a in loop.round()] == ["ns/b", "ns/c"]
    assert [a.deployment for a in loop.round()] == ["ns/a"]
    assert loop.round() == []
