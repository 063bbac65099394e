"""Allocation-only against utilization-aware placement, replayed on the genai-serving per-pod GPU duty cycles.

    python -m scheduler.simulator.duty_cycle [--gpu h100|h200] [--arms 0.1:2000,0.15:2000:0.75] [--window 60]

Each recorded pod is an inference replica that asks for a whole GPU as a share (`gpu-extender.io/gpu-milli:
1000`) and declares the GPU memory it was seen to use at peak (rounded up to GiB, plus 1 GiB). The first
`--learn-hours` of the trace are history: the pods ran one per GPU, as they did, and each pod's 99th percentile
busy fraction over that time becomes its `expected-busy` declaration (the profile a workload carries from its
previous run; pods first seen later declare nothing and count at their whole share). From then on the pods are
redeployed through the scheduler one per sample interval (a rolling update); pods that start later arrive at
their first sample; each leaves after its last sample. Only the time after the history is measured.

Every step replays what the live extender does: the GPUs' measured busy fraction (the sum of their tenants'
duty cycles), smoothed over the last `--window` samples the same way the telemetry store smooths (`--smoothing`),
plus pods bound in the last `--grace` steps at their whole share (the store's estimate with its grace); then the
same `evaluate` and `assign` the extender serves place each arriving pod on the best node, and the ledger records
it with the pod's declaration (which an arm with `declaredBusy` also judges lenders by). Every arm places every
pod (the fleet has a GPU per pod to spare); they differ in how many GPUs the pods occupy and how busy those are.

Printed per arm: GPUs in use (time mean and peak), the mean busy fraction of occupied GPUs, and the share of
occupied GPU-time above 90 % busy (the risk that co-located replicas slow each other down), split into time one
tenant was above 90 % on its own and time only the sum of tenants was, and the part of it on GPUs that held two
tenants or more ('co-located': the only time one replica can slow another down). The last row is `foresight`, a
placement made knowing every replica's future, for reference. Then the most any placement could consolidate while
keeping every pod's declared memory: first-fit decreasing of the pods alive at each step.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.config import Overcommit, PlacementPolicy
from policies.demand import Demand
from policies.engine import assign, evaluate
from policies.fragmentation import TypicalShapes, typical_shapes
from policies.inventory import MILLI_PER_GPU, GpuDevice, NodeInventory
from policies.state import ClusterState
from scheduler.agent.traces import DUTY_CYCLE_CSV, MEMORY_USED_CSV, load_trace, shared_data
from scheduler.telemetry import Smoothing, smooth

GIB_MIB = 1024
GPU_MODELS = {"h100": ("NVIDIA-H100-80GB-HBM3", 81_559), "h200": ("NVIDIA-H200", 143_771)}  # MiB as NVML says
GPUS_PER_NODE = 8
INTERFERENCE_BUSY = 0.9


@dataclass(frozen=True)
class DutyTrace:
    """Pods by sample step: busy fraction [T, P] (NaN outside a pod's life), declared memory and lifetimes."""

    step_s: float
    busy: np.ndarray
    memory_mib: np.ndarray
    first: np.ndarray  # [P] first step with a sample
    last: np.ndarray  # [P] last step with a sample
    pods: tuple[str, ...]

    @property
    def steps(self) -> int:
        return self.busy.shape[0]


def load_duty_trace(duty_csv: Path, memory_csv: Path) -> DutyTrace:
    duty = load_trace(duty_csv)
    memory = {s.pod: max(s.values) for s in load_trace(memory_csv)}
    times = np.unique(np.concatenate([np.asarray(s.times) for s in duty]))
    step_s = float(np.median(np.diff(times)))
    busy = np.full((len(times), len(duty)), np.nan)
    for p, series in enumerate(duty):
        at = np.searchsorted(times, np.asarray(series.times))
        busy[at, p] = np.clip(np.asarray(series.values) / 100.0, 0.0, 1.0)
    alive = ~np.isnan(busy)
    first = alive.argmax(axis=0)
    last = len(times) - 1 - alive[::-1].argmax(axis=0)
    for p in range(len(duty)):  # a gap inside a pod's life keeps its last value (the agent keeps exporting it)
        life = busy[first[p] : last[p] + 1, p]
        holes = np.isnan(life)
        if holes.any():
            index = np.where(~holes, np.arange(len(life)), 0)
            life[:] = life[np.maximum.accumulate(index)]
    declared = np.array([math.ceil(memory.get(s.pod, 0.0) / 2**30) * GIB_MIB + GIB_MIB for s in duty], dtype=np.int64)
    return DutyTrace(step_s, busy, declared, first, last, tuple(s.pod for s in duty))


@dataclass(frozen=True)
class ArmResult:
    name: str
    placed: int
    failed: int
    gpus_mean: float
    gpus_peak: int
    busy_mean: float
    hot_share: float  # occupied GPU-time above 90 % busy
    shared_hot_share: float  # of it, time no single tenant was above 90 % on its own (caused by sharing)
    colocated_hot_share: float  # of it, time on GPUs holding two tenants or more (where one can slow another)


@dataclass
class _Tally:
    """Occupied GPU-time and how busy it was, summed one step at a time: the measures every arm reports."""

    gpu_steps: int = 0
    peak: int = 0
    busy: float = 0.0
    hot: int = 0  # GPU-steps above 90 % busy
    shared_hot: int = 0  # of them, steps no single tenant was above 90 % on its own
    colocated_hot: int = 0  # of them, steps on GPUs holding two tenants or more

    def add(self, load: np.ndarray, solo: np.ndarray, residents: np.ndarray) -> None:
        """One step: per GPU the summed busy fraction of its tenants, the busiest one's, and how many there are."""
        occupied = residents > 0
        count = int(occupied.sum())
        self.gpu_steps += count
        self.peak = max(self.peak, count)
        self.busy += float(np.minimum(load[occupied], 1.0).sum())
        hot = load[occupied] > INTERFERENCE_BUSY
        self.hot += int(hot.sum())
        self.shared_hot += int((hot & (solo[occupied] <= INTERFERENCE_BUSY)).sum())
        self.colocated_hot += int((hot & (residents[occupied] > 1)).sum())

    def result(self, name: str, placed: int, failed: int, steps: int) -> ArmResult:
        per_gpu_step = max(self.gpu_steps, 1)
        return ArmResult(
            name,
            placed,
            failed,
            gpus_mean=self.gpu_steps / steps,
            gpus_peak=self.peak,
            busy_mean=self.busy / per_gpu_step,
            hot_share=self.hot / per_gpu_step,
            shared_hot_share=self.shared_hot / per_gpu_step,
            colocated_hot_share=self.colocated_hot / per_gpu_step,
        )


def arrival_steps(trace: DutyTrace, start: int) -> np.ndarray:
    """Pods alive at `start` roll out one per step from there; later pods arrive at their first sample; pods
    gone by then never arrive (-1)."""
    arrival = np.where(trace.first >= start, trace.first, -1)
    rolling = np.flatnonzero((trace.first < start) & (trace.last >= start))
    arrival[rolling] = start + np.arange(len(rolling))
    return arrival


def declared_busy(trace: DutyTrace, start: int) -> list[float | None]:
    """Each pod's p99 busy fraction over the history before `start`; None for pods without history."""
    out: list[float | None] = []
    for p in range(len(trace.pods)):
        seen = trace.busy[:start, p]
        seen = seen[~np.isnan(seen)]
        out.append(float(np.percentile(seen, 99)) if len(seen) else None)
    return out


def first_fit_gpus(memory_mib: np.ndarray, capacity_mib: int) -> int:
    """GPUs that first-fit decreasing needs to hold these memory declarations (memory is never lent)."""
    room = np.empty(0, dtype=np.int64)
    for need in np.sort(memory_mib)[::-1].tolist():
        fits = np.flatnonzero(room >= need)
        if len(fits):
            room[fits[0]] -= need
        else:
            room = np.append(room, capacity_mib - need)
    return len(room)


def memory_bound(trace: DutyTrace, start: int, capacity_mib: int) -> float:
    """How many times fewer GPUs than one pod per GPU the declared memory alone allows, over the measured time:
    the pods alive at each step packed afresh by memory (first-fit decreasing), busy fractions ignored. No
    placement that keeps the pods' memory whole can consolidate more than this."""
    pods = gpus = 0
    for t in range(start, trace.steps):
        alive = trace.memory_mib[(trace.first <= t) & (trace.last >= t)]
        pods += len(alive)
        gpus += first_fit_gpus(alive, capacity_mib)
    return pods / max(gpus, 1)


def foresight(trace: DutyTrace, start: int, capacity_mib: int) -> ArmResult:
    """A reference, not a policy: the placement someone who knew every replica's whole future could make.

    Each replica, the busiest on average first, goes to the first GPU whose replicas it fits beside in memory and
    where their summed busy fraction is never above 90 % at a step where none of them is above 90 % alone (sharing
    never causes such time); else to a GPU of its own. Replicas arrive and leave as in `replay`. Greedy, so not
    the best possible; it shows how far foresight, which no scheduler has, could take consolidation."""
    arrival = arrival_steps(trace, start)
    steps = np.arange(start, trace.steps)[:, None]
    alive = (steps >= arrival) & (steps <= trace.last) & (arrival >= 0)  # [T, P] over the measured time
    busy = np.where(alive, np.nan_to_num(trace.busy[start:]), 0.0)
    load: list[np.ndarray] = []  # per GPU: summed busy fraction [T]
    solo: list[np.ndarray] = []  # per GPU: its busiest replica [T]
    memory: list[int] = []
    members: list[list[int]] = []
    for pod in np.argsort(-busy.mean(axis=0), kind="stable").tolist():
        if not alive[:, pod].any():
            continue
        for g in range(len(load)):
            total, alone = load[g] + busy[:, pod], np.maximum(solo[g], busy[:, pod])
            if (
                memory[g] + trace.memory_mib[pod] <= capacity_mib
                and not ((total > INTERFERENCE_BUSY) & (alone <= INTERFERENCE_BUSY)).any()
            ):
                load[g], solo[g] = total, alone
                memory[g] += int(trace.memory_mib[pod])
                members[g].append(pod)
                break
        else:
            load.append(busy[:, pod].copy())
            solo.append(busy[:, pod].copy())
            memory.append(int(trace.memory_mib[pod]))
            members.append([pod])
    residents = np.array([alive[:, m].sum(axis=1) for m in members]).T  # [T, G]
    total, alone = np.array(load).T, np.array(solo).T
    tally = _Tally()
    for t in range(len(steps)):
        tally.add(total[t], alone[t], residents[t])
    return tally.result("foresight (offline reference)", sum(len(m) for m in members), 0, len(steps))


def replay(
    trace: DutyTrace,
    policy: PlacementPolicy,
    name: str,
    start: int,
    gpu: str,
    window: int,
    smoothing: Smoothing,
    shapes: TypicalShapes,
    grace: int,
) -> ArmResult:
    arrival = arrival_steps(trace, start)
    expected = declared_busy(trace, start)
    model, memory_mib = GPU_MODELS[gpu]
    nodes = math.ceil(len(trace.pods) / GPUS_PER_NODE) + 1
    devices = tuple(GpuDevice(g, model, memory_mib) for g in range(GPUS_PER_NODE))
    state = ClusterState(NodeInventory(f"gpu-{n:03d}", 256_000, 1 << 20, devices) for n in range(nodes))
    shape = state.gpu_present.shape
    history = np.zeros((window, *shape))  # measured busy of every GPU over the last `window` steps
    tenants: dict[int, tuple[int, int]] = {}  # pod -> (row, GPU)
    bound_at: dict[int, int] = {}
    placed = failed = 0
    tally = _Tally()
    for t in range(start, trace.steps):
        for pod in [p for p in tenants if trace.last[p] < t]:
            state.release(str(pod))
            del tenants[pod]
        # The store's own smoothing over the samples taken so far in the window; before the first, every GPU
        # reads idle.
        taken = np.arange(max(start, t - window), t) % window
        smoothed = smooth(history[taken], smoothing, axis=0) if len(taken) else np.zeros(shape)
        for pod in np.flatnonzero(arrival == t).tolist():
            if trace.last[pod] < t:
                continue
            state.set_utilization(_seen_by_extender(smoothed, tenants, bound_at, t, grace))
            demand = Demand(
                gpu_count=1,
                gpu_milli=MILLI_PER_GPU,
                shareable=True,
                gpu_memory_mib=int(trace.memory_mib[pod]),
                expected_busy=expected[pod],
            )
            snapshot = state.view()
            evaluation = evaluate(snapshot, demand, np.arange(snapshot.size), policy, shapes)
            best = evaluation.best()
            if best is None:
                failed += 1
                continue
            assignment = assign(snapshot, demand, evaluation, best)
            state.apply(str(pod), assignment)
            tenants[pod] = (snapshot.index[assignment.node], assignment.gpus[0])
            bound_at[pod] = t
            placed += 1
        load = np.zeros(shape)
        solo = np.zeros(shape)
        for pod, (row, gpu) in tenants.items():
            load[row, gpu] += trace.busy[t, pod]
            solo[row, gpu] = max(solo[row, gpu], trace.busy[t, pod])
        history[t % window] = np.minimum(load, 1.0)
        residents = np.zeros(shape, dtype=np.int64)
        for row, gpu in tenants.values():
            residents[row, gpu] += 1
        tally.add(load, solo, residents)
    return tally.result(name, placed, failed, trace.steps - start)


def _seen_by_extender(
    smoothed: np.ndarray, tenants: dict[int, tuple[int, int]], bound_at: dict[int, int], t: int, grace: int
) -> np.ndarray:
    """The busy fraction the extender would see: the smoothed samples, plus each pod bound since the last sample
    or in the `grace` steps before at its whole share (the store's estimate with `--telemetry-estimate-grace`;
    every replica asks a whole GPU), so a GPU is not judged only by samples taken before its newest tenant."""
    util = smoothed.copy()
    for pod, (row, gpu) in tenants.items():
        if t - bound_at[pod] < max(grace, 1):
            util[row, gpu] += 1.0
    return util.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.simulator.duty_cycle", description=__doc__.split("\n")[0]
    )
    data = shared_data()
    parser.add_argument("--duty", type=Path, default=data / DUTY_CYCLE_CSV)
    parser.add_argument("--memory", type=Path, default=data / MEMORY_USED_CSV)
    parser.add_argument("--gpu", choices=sorted(GPU_MODELS), default="h100", help="the fleet's GPU")
    parser.add_argument(
        "--arms",
        default="0.1:2000,0.15:2000:0.75,0.05:2000:0.75",
        help="utilization-aware arms as MARGIN[:MAX_BORROWED_MILLI_PER_GPU[:DECLARED_BUSY]], comma-separated "
        "(defaults 1000 and 0)",
    )
    parser.add_argument("--window", type=int, default=60, help="samples smoothed (one per trace step)")
    parser.add_argument("--smoothing", choices=["mean", "p90", "p99", "max"], default="p99")
    parser.add_argument("--grace", type=int, default=10, help="steps a new pod counts at its whole share")
    parser.add_argument("--learn-hours", type=float, default=2.0, help="history before the redeployment")
    args = parser.parse_args(argv)

    trace = load_duty_trace(args.duty, args.memory)
    start = max(1, round(args.learn_hours * 3600 / trace.step_s))
    shapes = typical_shapes([Demand(gpu_count=1, gpu_milli=MILLI_PER_GPU, shareable=True)])
    print(
        f"{len(trace.pods)} pods, {trace.steps} steps of {trace.step_s:.0f} s, measured after {start} steps of "
        f"history; fleet of {GPU_MODELS[args.gpu][0]}; telemetry {args.smoothing} over {args.window} samples, "
        f"estimate grace {args.grace}"
    )
    arms = [("allocation only", PlacementPolicy())]
    for arm in args.arms.split(","):
        parts = arm.split(":")
        margin, cap, declared = parts + ["1000", "0"][len(parts) - 1 :]
        overcommit = Overcommit(
            enabled=True, safetyMargin=float(margin), maxBorrowedMilliPerGpu=int(cap), declaredBusy=float(declared)
        )
        label = f"margin {margin}, borrow <= {cap}" + (f", declared {declared}" if float(declared) else "")
        arms.append((f"utilization-aware, {label}", PlacementPolicy(overcommit=overcommit)))
    results = [
        replay(trace, policy, name, start, args.gpu, args.window, args.smoothing, shapes, args.grace)
        for name, policy in arms
    ]
    results.append(foresight(trace, start, GPU_MODELS[args.gpu][1]))
    base = results[0].busy_mean
    width = max(len(r.name) for r in results)
    header = f"{'policy':<{width}} {'placed':>6} {'failed':>6} {'GPUs mean':>9} {'peak':>5} {'busy':>6} {'x':>5}"
    print(f"{header} {'>90%':>6} {'alone':>6} {'shared':>6} {'co-located':>10}")
    for r in results:
        print(
            f"{r.name:<{width}} {r.placed:>6} {r.failed:>6} {r.gpus_mean:>9.1f} {r.gpus_peak:>5} "
            f"{r.busy_mean:>6.3f} {r.busy_mean / base:>5.2f} {r.hot_share:>6.2%} "
            f"{r.hot_share - r.shared_hot_share:>6.2%} {r.shared_hot_share:>6.2%} {r.colocated_hot_share:>10.2%}"
        )
    print(
        f"'alone': above 90 % because one tenant was, whatever shares its GPU. The same spikes on x times fewer "
        f"GPUs make x times the share: at 2x, {2 * results[0].hot_share:.2%} of GPU-time above 90 % with no "
        f"sharing at all, unless two replicas spike together on one GPU.\nDeclared GPU memory alone allows at most "
        f"{memory_bound(trace, start, GPU_MODELS[args.gpu][1]):.2f}x (first-fit decreasing at every step)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
