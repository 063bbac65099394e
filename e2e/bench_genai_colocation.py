"""GPUs the co-location planner saves on the genai-serving trace, and how busy the GPUs of each placement get.

    python -m e2e.bench_genai_colocation [--replan-hours 4] [--learn-hours 2] [--percentiles 99,95,90,75]

Each recorded pod of `../shared/data/genai-serving/` is a served model of its own (the trace's ids do not say
which pods serve the same model): its memory is the GPU memory it was seen to use at peak, rounded up to GiB,
plus 1 GiB (as `scheduler/simulator/duty_cycle.py` declares it), and its demand is a percentile of its measured
duty cycle over the `--learn-hours` before each plan (a busy fraction; the catalog entry says one replica on a
whole H100 serves one "request per second", so demand is in GPUs). Pods whose duty cycles rise and fall
together are kept apart by the planner's correlation rule, as their histories are passed along.

Every `--replan-hours` the pods alive then (with some history) are placed: one replica per GPU (allocation-only,
what the trace ran), and for each of `--percentiles` first-fit decreasing and the CP-SAT plan. Then the pods'
measured duty cycles are replayed on each placement until the next plan: a GPU's busy fraction at a step is the
sum of its tenants' (a pod split into R replicas gives each 1/R of its own, as a Service spreads requests).
Printed per placement: GPUs at plan time and against what the declared memory allows (the planner packing by
memory alone), occupied GPUs averaged over time, the mean busy fraction of occupied GPU-time and the share of it
above 90 % busy; then why the two targets conflict, in numbers: the GPU-time above 90 % that pods make on their
own, and what memory allows once the pods whose demand exceeds one GPU's margin are split.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np

from policies.catalog import ModelSpec
from policies.colocation import FleetGpu, PlannedReplica, PlannerOptions, ServedModel, first_fit_decreasing, solve
from policies.colocation.concretize import concretize
from policies.colocation.problem import Problem, build_problem
from scheduler.agent.traces import DUTY_CYCLE_CSV, MEMORY_USED_CSV, shared_data
from scheduler.simulator.duty_cycle import GPU_MODELS, INTERFERENCE_BUSY, DutyTrace, load_duty_trace

GPU_MODEL, GPU_MIB = GPU_MODELS["h100"]
GPUS_PER_NODE = 8
KV_MIB = 1  # the spec's one-token KV reserve of one value per layer, rounded up to a MiB


def pod_spec(name: str, memory_mib: int) -> ModelSpec:
    """A catalog entry whose replica needs exactly `memory_mib` and serves one unit of demand per whole H100:
    one parameter byte per MiB of overhead would be noise, so weights are one MiB and the rest is overhead."""
    return ModelSpec.model_validate(
        {
            "name": name,
            "parametersBillion": 0.001,
            "bytesPerParameter": 1,
            "layers": 1,
            "kvHeads": 1,
            "headDim": 1,
            "contextTokens": 1,
            "concurrency": 1,
            "overheadMib": memory_mib - 1 - KV_MIB,
            "promptTokens": 1,
            "outputTokens": 1,
            "throughput": [{"gpu": "H100-80GB", "requestsPerSecond": 1.0, "source": "genai-serving duty cycle"}],
            "source": "genai-serving: peak GPU memory used, plus 1 GiB",
        }
    )


@dataclass
class Placement:
    """One way to place the window's pods: per GPU, its tenants as (pod, share of the pod's load)."""

    name: str
    gpus: list[list[tuple[int, float]]]
    seconds: float = 0.0
    gap: float | None = None


@dataclass
class Tally:
    """GPUs at plan time, occupied GPU-steps, their summed busy fraction and the steps above 90 % busy."""

    planned: int = 0
    gpu_steps: int = 0
    steps: int = 0
    busy: float = 0.0
    hot: int = 0
    seconds: float = 0.0

    def add(self, placement: Placement, busy: np.ndarray) -> None:
        """Replay `busy` ([steps, pods], NaN where a pod is gone) on the placement's GPUs."""
        self.planned += len(placement.gpus)
        self.steps += busy.shape[0]
        self.seconds += placement.seconds
        alive = ~np.isnan(busy)
        value = np.nan_to_num(busy)
        for tenants in placement.gpus:
            pods = [p for p, _ in tenants]
            share = np.array([s for _, s in tenants])
            occupied = alive[:, pods].any(axis=1)
            load = (value[:, pods] * share).sum(axis=1)[occupied]
            self.gpu_steps += len(load)
            self.busy += float(np.minimum(load, 1.0).sum())
            self.hot += int((load > INTERFERENCE_BUSY).sum())


def served_models(trace: DutyTrace, pods: list[int], at: int, learn: int, percentile: float) -> list[ServedModel]:
    models = []
    for p in pods:
        seen = trace.busy[max(0, at - learn) : at, p]
        seen = seen[~np.isnan(seen)]
        demand = float(np.percentile(seen, percentile))
        models.append(ServedModel(pod_spec(trace.pods[p], int(trace.memory_mib[p])), demand))
    return models


def histories(trace: DutyTrace, pods: list[int], at: int, learn: int) -> list[np.ndarray]:
    """Each pod's duty cycle over the learning time, where all of them were alive (for the correlation rule)."""
    window = trace.busy[max(0, at - learn) : at, pods]
    common = ~np.isnan(window).any(axis=1)
    return [window[common, i] for i in range(len(pods))]


def fleet(count: int) -> list[FleetGpu]:
    return [FleetGpu(f"node-{i // GPUS_PER_NODE:03d}", i % GPUS_PER_NODE, GPU_MODEL, GPU_MIB) for i in range(count)]


def tenants(replicas: list[PlannedReplica], pods: list[int], names: dict[str, int]) -> list[list[tuple[int, float]]]:
    """Group replicas by GPU; each takes 1/R of its pod's work, R being the pod's replica count."""
    count: dict[str, int] = {}
    for r in replicas:
        count[r.model] = count.get(r.model, 0) + 1
    by_gpu: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in replicas:
        by_gpu.setdefault((r.node, r.gpu), []).append((pods[names[r.model]], 1.0 / count[r.model]))
    return list(by_gpu.values())


def placements(problem: Problem, pods: list[int], percentile: float) -> list[Placement]:
    """First-fit decreasing and the CP-SAT plan of the pods, demand at their `percentile` busy fraction."""
    names = {served.name: i for i, served in enumerate(problem.models)}
    started = time.monotonic()
    greedy, unplaced = first_fit_decreasing(problem)
    assert not unplaced, unplaced
    ffd_replicas, _, _ = concretize(problem, greedy, [])
    label = f"p{percentile:g}"
    ffd = Placement(f"first-fit decreasing, {label}", tenants(ffd_replicas, pods, names), time.monotonic() - started)
    plan = solve(problem)
    cp = Placement(f"CP-SAT plan, {label}", tenants(list(plan.replicas), pods, names), plan.solve_seconds, plan.gap)
    return [ffd, cp]


def memory_only(models: list[ServedModel], options: PlannerOptions, replicas: list[int]) -> int:
    """The fewest GPUs that hold `replicas` of each pod by declared memory alone (CP-SAT with no demand, so
    compute never binds): one replica each is what the declared memory allows."""
    free = [ServedModel(m.spec, 0.0, min_replicas=r) for m, r in zip(models, replicas, strict=True)]
    return solve(build_problem(free, fleet(2 * sum(replicas)), options, [])).gpus_used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learn-hours", type=float, default=2.0, help="history behind each plan")
    parser.add_argument("--replan-hours", type=float, default=4.0, help="time between plans")
    parser.add_argument("--percentiles", default="99,95,90,75", help="of a pod's duty cycle, as its demand (arms)")
    parser.add_argument("--margin", type=float, default=0.1, help="compute kept free on every GPU")
    parser.add_argument("--time-limit", type=float, default=10.0, help="solver seconds per plan")
    args = parser.parse_args(argv)
    data = shared_data()
    trace = load_duty_trace(data / DUTY_CYCLE_CSV, data / MEMORY_USED_CSV)
    learn = max(1, round(args.learn_hours * 3600 / trace.step_s))
    every = max(1, round(args.replan_hours * 3600 / trace.step_s))
    options = PlannerOptions(margin=args.margin, time_limit_s=args.time_limit)
    percentiles = [float(p) for p in args.percentiles.split(",")]
    tallies: dict[str, Tally] = {}
    allowed = allowed_steps = proven = replans = 0
    split_floor: dict[float, int] = dict.fromkeys(percentiles, 0)
    hot_by_pod = np.zeros(len(trace.pods), dtype=np.int64)  # steps a pod of a plan was above 90 % on its own
    print(
        f"{len(trace.pods)} pods, {trace.steps} steps of {trace.step_s:.0f} s; a plan every {args.replan_hours:g} h "
        f"from the last {args.learn_hours:g} h; margin {args.margin}; {GPU_MODEL}"
    )
    for at in range(learn, trace.steps, every):
        pods = [p for p in range(len(trace.pods)) if trace.first[p] < at <= trace.last[p]]
        busy = np.full((min(every, trace.steps - at), len(trace.pods)), np.nan)
        busy[:, pods] = trace.busy[at : at + len(busy), pods]  # only this plan's pods count
        alone = Placement("one replica per GPU (allocation-only)", [[(p, 1.0)] for p in pods])
        tallies.setdefault(alone.name, Tally()).add(alone, busy)
        window_allows = None
        for percentile in percentiles:
            models = served_models(trace, pods, at, learn, percentile)
            if window_allows is None:
                window_allows = memory_only(models, options, [1] * len(models))
            problem = build_problem(models, fleet(2 * len(pods)), options, histories(trace, pods, at, learn))
            for placement in placements(problem, pods, percentile):
                tallies.setdefault(placement.name, Tally()).add(placement, busy)
            fewest = [max(1, math.ceil(m.requests_per_second * 1000 / options.usable_milli - 1e-9)) for m in models]
            split_floor[percentile] += memory_only(models, options, fewest)
        assert window_allows is not None
        allowed += window_allows
        allowed_steps += window_allows * len(busy)
        hot_by_pod += (np.nan_to_num(busy) > INTERFERENCE_BUSY).sum(axis=0)
        proven += max(math.ceil(int(trace.memory_mib[pods].sum()) / GPU_MIB), 1)
        replans += 1
        print(f"  plan at {at * trace.step_s / 3600:5.1f} h: {len(pods)} pods; declared memory allows {window_allows}")
    print(
        f"\n{'placement':<38} {'GPUs':>6} {'vs memory':>9} {'occupied':>8} {'busy':>6} {'>90% busy':>9} {'solve s':>7}"
    )
    for name, tally in tallies.items():
        occupied = tally.gpu_steps / max(tally.steps, 1)
        print(
            f"{name:<38} {tally.planned / replans:>6.1f} {tally.planned / allowed - 1:>+9.1%} {occupied:>8.1f} "
            f"{tally.busy / max(tally.gpu_steps, 1):>6.3f} {tally.hot / max(tally.gpu_steps, 1):>9.2%} "
            f"{tally.seconds / replans:>7.2f}"
        )
    base = tallies[alone.name]
    print(
        f"\nGPUs: mean over {replans} plans. Declared memory allows {allowed / replans:.1f} GPUs per plan (CP-SAT "
        f"packing by memory alone; total memory / GPU memory: {proven / replans:.1f}).\n"
        f"Pods busier than 90 % on their own make {base.hot} GPU-steps above 90 % wherever they run whole (fewer "
        f"only where two of them spike in the same step on one GPU): on the {allowed / replans:.1f} GPUs memory "
        f"allows that alone is {base.hot / allowed_steps:.2%} of GPU-time, against "
        f"{base.hot / max(base.gpu_steps, 1):.2%} with one replica per GPU. Splitting the pods whose demand exceeds "
        f"1 - margin over two replicas (as the plan does) raises what memory allows to "
        + ", ".join(f"{split_floor[p] / replans:.1f} (p{p:g})" for p in percentiles)
        + "."
    )
    print(both_targets(trace, base, hot_by_pod, allowed / replans, allowed_steps))
    return 0


def both_targets(trace: DutyTrace, base: Tally, hot_by_pod: np.ndarray, allowed: float, allowed_steps: int) -> str:
    """Whether any plan within 5 % of what memory allows can keep the share above 90 % busy at allocation-only's:
    at most that share of the plan's GPU-time may be hot, so splits must remove the rest of the pods' own hot
    steps; the 5 % of memory pays for splitting the hottest pods only (each split adds a replica of its memory),
    counted as if a split removed all of its pod's hot steps (it halves them, and sharing adds hot time)."""
    share = base.hot / max(base.gpu_steps, 1)
    budget = share * allowed_steps * 1.05
    slack_mib = 0.05 * allowed * GPU_MIB
    removed = splits = 0
    for pod in np.argsort(-hot_by_pod, kind="stable").tolist():
        if hot_by_pod[pod] == 0 or trace.memory_mib[pod] > slack_mib:
            break
        slack_mib -= int(trace.memory_mib[pod])
        removed += int(hot_by_pod[pod])
        splits += 1
    verdict = "can" if base.hot - removed <= budget else "cannot"
    return (
        f"Within 5 % of memory ({1.05 * allowed:.1f} GPUs) at most {budget:.0f} GPU-steps may be above 90 % busy; "
        f"the memory left splits the {splits} hottest pods, which removes at most {removed} of the {base.hot} hot "
        f"steps pods make on their own: both targets together {verdict} be met by splitting."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
