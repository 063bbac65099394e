"""GPU-seconds by state and their cost: the states partition the fleet's capacity × time, agree with the fleet
gauges, and price GPU types by the most specific name."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from extender.metrics import ExtenderMetrics
from extender.waste import STATES, WasteAccountant, sample_fleet
from policies.config import parse_policy
from policies.demand import Demand
from policies.inventory import Assignment, GpuDevice, NodeInventory
from scheduler.model import ClusterModel

H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-80GB"
POLICY = """
typicalShapes:
  learnFromCluster: false
  default: [{cpuMilli: 4000, gpuCount: 1, gpuMilli: 500}]
prices: {gpuHourly: {H100: 2.5, A100: 1.0, A100-80GB: 1.6}}
"""
WHOLE = Demand(cpu_milli=8000, gpu_count=1, gpu_milli=1000)
SHARE = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=500, shareable=True)


def gpu_node(name: str, gpus: int, model: str = H100, cpu: int = 12_000, pool: str | None = None) -> NodeInventory:
    labels = {} if pool is None else {"gpu-extender.io/pool": pool}
    devices = tuple(GpuDevice(i, model, 81_920) for i in range(gpus))
    return NodeInventory(name, cpu, 262_144, devices, labels=labels)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(
    nodes: list[NodeInventory], policy: str = POLICY, namespaces: dict[str, str] | None = None
) -> tuple[ClusterModel, CollectorRegistry, WasteAccountant]:
    model = ClusterModel(parse_policy(policy))
    model.replace_nodes(nodes)
    model.mark_ready()
    registry = CollectorRegistry()
    lookup = None if namespaces is None else namespaces.get
    return model, registry, WasteAccountant(model, registry, namespace_of=lookup, clock=FakeClock())


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_states_add_up_to_the_fleet_gpu_seconds_as_the_fleet_changes() -> None:
    """Pods come and go, telemetry arrives, a node joins, the view goes incomplete for a while: the states'
    GPU-seconds add up to capacity × time at every tick and every scrape in between, and no counter goes down."""
    nodes = [gpu_node("h0", 4, pool="serving"), gpu_node("a0", 2, A100, pool="batch"), NodeInventory("cpu", 8000, 1)]
    model, registry, waste = make(nodes)
    clock: FakeClock = waste._clock  # type: ignore[assignment]
    seen: dict[str, float] = {}

    def scrape(at: float, expected: float) -> None:
        clock.now = at
        samples = {f"{s.name}{sorted(s.labels.items())}": s.value for f in registry.collect() for s in f.samples}
        assert value(registry, "gpu_extender_gpu_seconds_total") == pytest.approx(expected, rel=1e-12)
        assert all(samples[k] >= v for k, v in seen.items() if "_total" in k), "a counter went down"
        seen.update(samples)

    def tick(at: float, expected: float) -> None:
        clock.now = at
        waste.tick()
        scrape(at, expected)

    tick(100.0, 0.0)  # the first tick starts the clock: nothing before it is counted
    scrape(104.0, 6 * 4)  # between ticks a scrape sees the growth since the last one
    model.pod_bound("team-a/w0", Assignment("h0", cpu_milli=8000, gpus=(0, 1), milli=1000), WHOLE)
    tick(110.0, 6 * 10)
    model.pod_bound("team-b/s0", Assignment("a0", cpu_milli=1000, gpus=(1,), milli=500), SHARE)
    util = np.full(model.snapshot().gpu_util.shape, np.nan)
    util[0, :4] = [0.9, 0.1, 0.0, 0.0]
    model.set_utilization(util)
    tick(125.5, 6 * 25.5)
    model.replace_nodes([*nodes, gpu_node("h1", 8, pool="serving")])
    scrape(130.0, 6 * 30)  # the new node counts from the tick that sees it
    tick(160.0, 6 * 60)
    model.mark_ready(False)  # a relist in progress: the view is incomplete, its time is not counted
    tick(170.0, 6 * 60 + 14 * 10)
    model.mark_ready(True)
    model.pod_gone("team-a/w0")
    tick(230.0, 6 * 60 + 14 * 10)
    tick(240.0, 6 * 60 + 14 * 20)
    scrape(250.0, 6 * 60 + 14 * 30)
    assert value(registry, "gpu_extender_gpu_seconds_total", gpu_type=H100, pool="serving") == pytest.approx(
        4 * 60 + 12 * 30
    )
    assert set(STATES) == {
        str(s.labels["state"])
        for f in registry.collect()
        for s in f.samples
        if s.name == "gpu_extender_gpu_seconds_total"
    }


def test_a_scrape_between_ticks_never_sees_more_than_the_next_tick_counts() -> None:
    """All GPUs go from free to allocated and back between ticks: every series keeps growing."""
    model, registry, waste = make([gpu_node("h0", 2)])
    clock: FakeClock = waste._clock  # type: ignore[assignment]
    waste.tick()
    history = []
    for step in range(1, 7):
        clock.now = step * 2.5
        if step % 2:
            waste.tick()
            if step % 4 == 1:
                model.pod_bound("a/p", Assignment("h0", cpu_milli=1000, gpus=(0, 1), milli=1000), WHOLE)
            else:
                model.pod_gone("a/p")
        history.append({s: value(registry, "gpu_extender_gpu_seconds_total", state=s) for s in STATES})
    for before, after in itertools.pairwise(history):
        assert all(after[s] >= before[s] for s in STATES), (before, after)
    assert sum(history[-1].values()) == pytest.approx(2 * 15.0)


def test_each_state_holds_what_the_fleet_gauges_show() -> None:
    """Over one second of a fixed fleet, each counter grows by the gauge it integrates."""
    model = ClusterModel(parse_policy(POLICY))
    model.replace_nodes([gpu_node("h0", 2), gpu_node("h1", 4), gpu_node("a0", 2, A100)])
    model.mark_ready()
    model.pod_bound("ns/w", Assignment("h0", cpu_milli=8000, gpus=(0,), milli=1000), WHOLE)
    model.pod_bound("ns/s", Assignment("h1", cpu_milli=1000, gpus=(2,), milli=500), SHARE)
    model.pod_bound("ns/b", Assignment("h1", cpu_milli=1000, gpus=(3,), milli=300, borrowed=True), SHARE)
    util = np.full(model.snapshot().gpu_util.shape, np.nan)
    util[0, :2] = [0.25, 0.0]
    util[1, :4] = [0.0, 0.0, 0.6, 0.4]
    model.set_utilization(util)
    clock = FakeClock()
    metrics = ExtenderMetrics(model)
    metrics.waste._clock = clock
    metrics.waste.tick()
    clock.now = 1.0
    metrics.waste.tick()
    r = metrics.registry

    def seconds(*states: str) -> float:
        return sum(value(r, "gpu_extender_gpu_seconds_total", state=s) for s in states)

    assert seconds(*STATES) == pytest.approx(value(r, "gpu_extender_gpus"))
    allocated = seconds("allocated_busy", "allocated_idle", "allocated_unmeasured")
    assert allocated == pytest.approx(value(r, "gpu_extender_allocated_gpus"))
    assert seconds("allocated_idle") == pytest.approx(value(r, "gpu_extender_idle_allocated_gpus"))
    assert seconds("allocated_unmeasured") == pytest.approx(0.0)  # a0 has no sample but nothing allocated
    assert seconds("fragmented") == pytest.approx(value(r, "gpu_extender_fragmented_gpus"))
    assert seconds("cpu_stranded") <= value(r, "gpu_extender_cpu_stranded_gpus") + 1e-9
    assert value(r, "gpu_extender_borrowed_gpu_seconds_total") == pytest.approx(value(r, "gpu_extender_borrowed_gpus"))


def test_one_node_state_by_state_with_its_cost_and_owner() -> None:
    """2 H100s, one held whole by a serving replica 25 % busy; the free one fits the typical share by GPU but its
    node's free CPU (4 of 12 cores) feeds only half of it at the typical 4 cores per half GPU."""
    model, registry, waste = make([gpu_node("h0", 2, pool="serving")], namespaces={"3f2a-uid": "team-a"})
    held = Assignment("h0", cpu_milli=8000, gpus=(0,), milli=1000, model="llama-8b")
    model.pod_bound("3f2a-uid", held, WHOLE)
    util = np.full(model.snapshot().gpu_util.shape, np.nan)
    util[0, 0] = 0.25
    model.set_utilization(util)
    waste.tick(0.0)
    waste.tick(3600.0)
    per_state = {s: value(registry, "gpu_extender_gpu_seconds_total", state=s, pool="serving") / 3600 for s in STATES}
    assert per_state == pytest.approx(
        {
            "allocated_busy": 0.25,
            "allocated_idle": 0.75,
            "allocated_unmeasured": 0.0,
            "fragmented": 0.0,
            "cpu_stranded": 0.5,
            "free": 0.5,
        }
    )
    cost = {s: value(registry, "gpu_extender_gpu_cost_dollars_total", state=s, gpu_type=H100) for s in STATES}
    assert cost["allocated_idle"] == pytest.approx(0.75 * 2.5)
    assert sum(cost.values()) == pytest.approx(2 * 2.5)  # two GPU-hours at the H100 price
    assert value(registry, "gpu_extender_allocated_gpu_seconds_total", namespace="team-a", model="llama-8b") == 3600
    assert value(registry, "gpu_extender_gpu_price_dollars_per_hour", gpu_type=H100) == 2.5
    view = model.view()
    sample = sample_fleet(view.snapshot, view.shapes, "gpu-extender.io/pool")
    assert sample.groups == ((H100, "serving"),)
    assert sample.states.sum(axis=1) == pytest.approx(sample.capacity) and sample.capacity[0] == 2


def test_prices_match_the_most_specific_gpu_name_and_unpriced_types_cost_nothing() -> None:
    policy = POLICY.replace("A100: 1.0, ", "A100: 1.0, L4: 0.4, ")
    nodes = [gpu_node("a0", 1, A100), gpu_node("a1", 1, "NVIDIA-A100-SXM4-40GB"), gpu_node("t0", 1, "Tesla-T4")]
    _, registry, waste = make(nodes, policy)
    waste.tick(0.0)
    waste.tick(3600.0)
    assert value(registry, "gpu_extender_gpu_cost_dollars_total", gpu_type=A100) == pytest.approx(1.6)
    assert value(registry, "gpu_extender_gpu_cost_dollars_total", gpu_type="NVIDIA-A100-SXM4-40GB") == 1.0
    assert value(registry, "gpu_extender_gpu_seconds_total", gpu_type="Tesla-T4") == 3600
    assert value(registry, "gpu_extender_gpu_cost_dollars_total", gpu_type="Tesla-T4") == 0  # no series at all
    prices = {
        s.labels["gpu_type"]: s.value
        for f in registry.collect()
        for s in f.samples
        if s.name == "gpu_extender_gpu_price_dollars_per_hour"
    }
    assert prices == {A100: 1.6, "NVIDIA-A100-SXM4-40GB": 1.0}


def test_namespace_from_the_key_or_the_lookup_and_no_pool_label() -> None:
    """`namespace/name` keys carry their namespace; UIDs need the watch's lookup, else the label is empty. Without
    a pool label every node is in the pool ""."""
    policy = POLICY + "accounting: {poolLabel: ''}\n"
    model, registry, waste = make([gpu_node("h0", 4, pool="serving")], policy, namespaces={"uid-1": "team-b"})
    model.pod_bound("team-a/p", Assignment("h0", cpu_milli=1000, gpus=(0,), milli=1000), WHOLE)
    model.pod_bound("uid-1", Assignment("h0", cpu_milli=1000, gpus=(1,), milli=1000), WHOLE)
    model.pod_bound("uid-2", Assignment("h0", cpu_milli=1000, gpus=(2,), milli=500), SHARE)
    waste.tick(0.0)
    waste.tick(10.0)
    by_namespace = {
        s.labels["namespace"]: s.value
        for f in registry.collect()
        for s in f.samples
        if s.name == "gpu_extender_allocated_gpu_seconds_total"
    }
    assert by_namespace == {"team-a": 10.0, "team-b": 10.0, "": 5.0}
    assert value(registry, "gpu_extender_gpu_seconds_total", pool="") == 40.0


def test_a_failing_tick_is_logged_and_the_next_one_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    _, registry, waste = make([gpu_node("h0", 1)])
    waste.tick(0.0)
    monkeypatch.setattr("extender.waste.sample_fleet", lambda *a: 1 / 0)
    waste.tick(5.0)  # must not raise: the housekeeping thread also expires reservations
    monkeypatch.setattr("extender.waste.sample_fleet", sample_fleet)
    waste.tick(7.0)  # the 2 s after the failed sample are not counted
    assert value(registry, "gpu_extender_gpu_seconds_total") == 5.0
    waste.tick(9.0)
    assert value(registry, "gpu_extender_gpu_seconds_total") == 7.0


def test_the_housekeeping_thread_ticks_the_accountant() -> None:
    """`gpu-extender serve` counts through its housekeeping loop, beside expiring reservations."""
    from extender.serve import _housekeeping

    model, registry, waste = make([gpu_node("h0", 2)])
    waste._clock = time.monotonic
    stop = threading.Event()
    thread = threading.Thread(target=_housekeeping, args=(model, stop, 0.01, waste.tick), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while value(registry, "gpu_extender_gpu_seconds_total") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert value(registry, "gpu_extender_gpu_seconds_total") > 0


def test_only_the_leader_counts() -> None:
    """With two replicas each keeping the whole cluster view, a sum over replicas counts the fleet once."""
    _, registry, waste = make([gpu_node("h0", 2)])
    leader = [False]
    waste.active = lambda: leader[0]
    waste.tick(0.0)
    leader[0] = True
    waste.tick(10.0)  # a follower until now: nothing counted
    assert value(registry, "gpu_extender_gpu_seconds_total") == 0
    waste.tick(20.0)
    assert value(registry, "gpu_extender_gpu_seconds_total") == 2 * 10
