"""MIG with departures: Poisson arrivals, exponential lifetimes, dynamic carving, and the no-fragmentation bound.

With arrivals only, first-fit carves GPUs almost perfectly and no policy can beat it by much; with departures the
holes instances leave behind are where placement matters. Each run replays one seeded arrival list through a
policy (first-fit, or the decision core `policies.engine.evaluate`/`assign` with or without a learnt MIG mix) on
H100-80GB GPUs whose instances go on any valid start slot, and through the bound: the fleet as one pool of
compute slices and one of memory slices, with no placement rules, which takes a request whenever the pool has
room. The measure is compute carried (compute slices × lifetime of the requests placed, as a share of those
offered), with requests placed and acceptance per profile beside it: the bound carries the most compute but,
taking small requests wherever they come, places fewer requests than first-fit at overload.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, replace

import numpy as np

from policies.baselines import BasePolicy, make_policy
from policies.config import PlacementPolicy
from policies.fragmentation import TypicalShapes, typical_shapes
from policies.inventory import GpuDevice, NodeInventory
from policies.mig import MIG_TABLES
from policies.mig_demand import MigDemandTracker, MigMix
from policies.reuse import EvaluationCache
from policies.state import ClusterState
from scheduler.simulator.mig import INFERENCE_MIX, TABLE, mig_demand

CHURN_POLICIES = ("first-fit", "mig-fit", "mig-fit-learnt")
CHURN_LOADS = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
MEAN_LIFETIME_S = 3600.0


@dataclass(frozen=True)
class Arrival:
    """One MIG request: when it comes, the profile it asks, and how long it would run if placed."""

    at_s: float
    profile: str
    lifetime_s: float


@dataclass(frozen=True)
class ChurnScenario:
    """One seeded arrival process; `load` is the offered compute slices in use on average over the fleet's."""

    gpus: int = 100
    load: float = 1.0
    seed: int = 0
    mix: tuple[tuple[str, float], ...] = tuple(INFERENCE_MIX.items())
    mean_lifetime_s: float = MEAN_LIFETIME_S
    warmup_lifetimes: float = 2.0  # the fleet fills up: requests arriving earlier are not measured
    measured_lifetimes: float = 6.0
    half_life_s: float = MEAN_LIFETIME_S  # the learnt mix's memory

    def arrivals(self) -> list[Arrival]:
        """Poisson arrivals over warm-up and measurement, profiles drawn from the mix, exponential lifetimes."""
        rng = np.random.default_rng([self.seed, round(self.load * 1000), self.gpus])
        names = [n for n, _ in self.mix]
        weights = np.array([w for _, w in self.mix], dtype=np.float64)
        weights /= weights.sum()
        mean_slices = sum(w * _compute(n) for n, w in zip(names, weights, strict=True))
        rate = self.load * self.gpus * _compute(_full_profile()) / (mean_slices * self.mean_lifetime_s)
        horizon = (self.warmup_lifetimes + self.measured_lifetimes) * self.mean_lifetime_s
        count = int(rate * horizon * 1.2) + 100
        at = np.cumsum(rng.exponential(1.0 / rate, count))
        at = at[at < horizon]
        picks = rng.choice(len(names), size=len(at), p=weights)
        lives = rng.exponential(self.mean_lifetime_s, len(at))
        return [Arrival(float(t), names[int(p)], float(life)) for t, p, life in zip(at, picks, lives, strict=True)]

    @property
    def measured_from_s(self) -> float:
        return self.warmup_lifetimes * self.mean_lifetime_s


@dataclass
class ChurnResult:
    """One policy (or the bound) over one scenario, counting only the requests that arrive after the warm-up."""

    policy: str
    load: float
    seed: int
    requests: int  # measured requests
    placed: int
    offered_slice_s: float
    carried_slice_s: float
    by_profile: dict[str, tuple[int, int]]  # placed, asked
    elapsed_s: float

    @property
    def carried_pct(self) -> float:
        return 100.0 * self.carried_slice_s / self.offered_slice_s if self.offered_slice_s else 0.0

    @property
    def placed_pct(self) -> float:
        return 100.0 * self.placed / self.requests if self.requests else 0.0


def _compute(profile: str) -> int:
    p = MIG_TABLES[TABLE].profile(profile)
    assert p is not None
    return p.compute_slices


def _memory(profile: str) -> int:
    p = MIG_TABLES[TABLE].profile(profile)
    assert p is not None
    return p.memory_slices


def _full_profile() -> str:
    return max(MIG_TABLES[TABLE].profiles, key=lambda p: p.compute_slices).name


def mig_fleet(gpus: int, per_node: int = 8) -> list[NodeInventory]:
    """`gpus` H100-80GB GPUs in MIG mode, 8 per node (the last node holds the rest)."""
    nodes = []
    for i, first in enumerate(range(0, gpus, per_node)):
        count = min(per_node, gpus - first)
        devices = tuple(GpuDevice(g, "NVIDIA-H100-80GB-HBM3", 81_559, mig_table=TABLE) for g in range(count))
        nodes.append(NodeInventory(f"h100-{i:04d}", cpu_milli=256_000, memory_mib=2_097_152, gpus=devices))
    return nodes


class _Tally:
    """Counts of the measured requests."""

    def __init__(self, scenario: ChurnScenario) -> None:
        self.since = scenario.measured_from_s
        self.requests = self.placed = 0
        self.offered = self.carried = 0.0
        self.by_profile = {name: [0, 0] for name, _ in scenario.mix}

    def count(self, arrival: Arrival, placed: bool) -> None:
        if arrival.at_s < self.since:
            return
        work = _compute(arrival.profile) * arrival.lifetime_s
        self.requests += 1
        self.offered += work
        self.by_profile[arrival.profile][1] += 1
        if placed:
            self.placed += 1
            self.carried += work
            self.by_profile[arrival.profile][0] += 1

    def result(self, policy: str, scenario: ChurnScenario, started: float) -> ChurnResult:
        return ChurnResult(
            policy=policy,
            load=scenario.load,
            seed=scenario.seed,
            requests=self.requests,
            placed=self.placed,
            offered_slice_s=self.offered,
            carried_slice_s=self.carried,
            by_profile={k: (v[0], v[1]) for k, v in self.by_profile.items()},
            elapsed_s=time.perf_counter() - started,
        )


def run_bound(scenario: ChurnScenario, arrivals: list[Arrival] | None = None) -> ChurnResult:
    """The no-fragmentation bound: one pool of compute and one of memory slices, a request taken whenever both
    have room."""
    started = time.perf_counter()
    arrivals = scenario.arrivals() if arrivals is None else arrivals
    full = MIG_TABLES[TABLE].profile(_full_profile())
    assert full is not None
    compute = scenario.gpus * full.compute_slices
    memory = scenario.gpus * full.memory_slices
    running: list[tuple[float, int, int]] = []
    tally = _Tally(scenario)
    for arrival in arrivals:
        while running and running[0][0] <= arrival.at_s:
            _, c, m = heapq.heappop(running)
            compute += c
            memory += m
        c, m = _compute(arrival.profile), _memory(arrival.profile)
        fits = c <= compute and m <= memory
        if fits:
            compute -= c
            memory -= m
            heapq.heappush(running, (arrival.at_s + arrival.lifetime_s, c, m))
        tally.count(arrival, fits)
    return tally.result("bound", scenario, started)


def churn_policy(name: str, shapes: TypicalShapes) -> BasePolicy:
    """`first-fit`, `mig-fit` (the decision core with fixed profile values) or `mig-fit-learnt` (the decision core
    with the learnt mix on its typical shapes, which `run_policy` renews whenever the mix moves)."""
    if name == "first-fit":
        return make_policy("first-fit", shapes)
    if name in ("mig-fit", "mig-fit-learnt"):
        policy = make_policy("default", shapes, PlacementPolicy())
        policy.label = name
        return policy
    raise ValueError(f"unknown MIG churn policy {name!r}; known: {', '.join(CHURN_POLICIES)}")


def run_policy(name: str, scenario: ChurnScenario, arrivals: list[Arrival] | None = None) -> ChurnResult:
    """Replay the arrivals through one policy: departures first, then the decision, `ClusterState` refusing any
    overlap of instances."""
    started = time.perf_counter()
    arrivals = scenario.arrivals() if arrivals is None else arrivals
    demands = {name: mig_demand(name) for name, _ in scenario.mix}
    shapes = typical_shapes(demands.values())
    policy = churn_policy(name, shapes)
    tracker = MigDemandTracker(scenario.half_life_s) if name == "mig-fit-learnt" else None
    state = ClusterState(mig_fleet(scenario.gpus))
    snapshot = state.view()
    rows = np.arange(snapshot.size, dtype=np.int64)
    rng = np.random.default_rng([scenario.seed, 2])
    running: list[tuple[float, str]] = []
    tally = _Tally(scenario)
    # As the extender's filter does: a node's evaluation is kept until the node changes, or the mix does.
    cache = EvaluationCache(size=len(demands))
    cache.reset(len(rows))
    mix: MigMix | None = None
    for i, arrival in enumerate(arrivals):
        while running and running[0][0] <= arrival.at_s:
            state.release(heapq.heappop(running)[1])
        demand = demands[arrival.profile]
        if tracker is not None:
            tracker.observe(arrival.profile, arrival.at_s)
            if tracker.mix() is not mix:
                mix = tracker.mix()
                policy.shapes = replace(shapes, mig_mix=mix)  # type: ignore[attr-defined]
                cache.reset(len(rows))
        evaluation = cache.evaluate(
            demand,
            rows,
            state.row_version,
            state.generation,
            lambda redo, _, d=demand: policy.evaluate(snapshot, d, redo),
        )
        index = policy.choose(evaluation, rng)
        if index is not None:
            key = f"mig-{i}"
            state.apply(key, policy.assign(snapshot, demand, evaluation, index, rng))
            heapq.heappush(running, (arrival.at_s + arrival.lifetime_s, key))
        tally.count(arrival, index is not None)
    return tally.result(name, scenario, started)


def churn_table(
    loads: tuple[float, ...] = CHURN_LOADS,
    policies: tuple[str, ...] = CHURN_POLICIES,
    gpus: int = 100,
    seeds: int = 1,
    seed_base: int = 0,
) -> list[dict[str, object]]:
    """Per load and policy (mean over seeds): compute carried, requests placed, acceptance per profile, and the
    share of the gap between first-fit and the bound that the policy closes."""
    rows: list[dict[str, object]] = []
    for load in loads:
        runs: dict[str, list[ChurnResult]] = {}
        for s in range(seeds):
            scenario = ChurnScenario(gpus=gpus, load=load, seed=seed_base + s)
            arrivals = scenario.arrivals()
            runs.setdefault("bound", []).append(run_bound(scenario, arrivals))
            for name in policies:
                runs.setdefault(name, []).append(run_policy(name, scenario, arrivals))
        first = float(np.mean([r.carried_pct for r in runs["first-fit"]])) if "first-fit" in runs else None
        bound = float(np.mean([r.carried_pct for r in runs["bound"]]))
        for name in (*policies, "bound"):
            results = runs[name]
            carried = float(np.mean([r.carried_pct for r in results]))
            row: dict[str, object] = {
                "load": load,
                "policy": name,
                "carried_pct": round(carried, 2),
                "placed_pct": round(float(np.mean([r.placed_pct for r in results])), 2),
                "gap_closed_pct": (
                    round(100 * (carried - first) / (bound - first), 1)
                    if first is not None and bound - first > 1e-9
                    else ""
                ),
            }
            for profile, _ in ChurnScenario().mix:
                placed = sum(r.by_profile[profile][0] for r in results)
                asked = sum(r.by_profile[profile][1] for r in results)
                row[f"accept_{profile}"] = round(100 * placed / asked, 1) if asked else ""
            row["elapsed_s"] = round(sum(r.elapsed_s for r in results), 2)
            rows.append(row)
    return rows


def format_churn_table(rows: list[dict[str, object]]) -> str:
    """The table as Markdown."""
    profiles = [k.removeprefix("accept_") for k in rows[0] if k.startswith("accept_")] if rows else []
    head = ["load", "policy", "compute carried %", "requests placed %", "gap closed %", *profiles, "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            f"{row['load']:.1f}",
            str(row["policy"]),
            f"{row['carried_pct']:.2f}",
            f"{row['placed_pct']:.2f}",
            str(row["gap_closed_pct"]),
            *(str(row[f"accept_{p}"]) for p in profiles),
            str(row["elapsed_s"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
