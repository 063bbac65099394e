"""Running many replays (pod lists × policies × modes × seeds), in parallel, with progress and outputs."""

from __future__ import annotations

import csv
import gzip
import multiprocessing
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TextIO

import numpy as np

from policies.baselines import make_policy, shapes_count_memory
from policies.config import PlacementPolicy, load_policy
from policies.fragmentation import TypicalShapes, typical_shapes
from scheduler.plotting import pyplot
from scheduler.simulator.metrics import MAX_BIN, SUMMARY_COLUMNS, allocation_curve, summarize, write_csv
from scheduler.simulator.replay import KubeSchedulerOptions, RunResult, replay
from scheduler.simulator.trace import PodList, arrival_sequence, gpu_capacity_milli, node_order, read_nodes, read_pods

SHAPE_COVERAGE = 0.95  # typical shapes: the most frequent shapes covering 95 % of the pod list


@dataclass(frozen=True)
class Task:
    nodes: str
    pods: str
    policy: str
    mode: str
    seed: int
    inflation: float = 1.3
    kube: KubeSchedulerOptions = field(default_factory=KubeSchedulerOptions)
    policy_file: str | None = None
    verify: bool = False

    @property
    def workload(self) -> str:
        return Path(self.pods).stem


@cache
def _nodes(path: str):
    return read_nodes(path)


@cache
def _pods(path: str) -> PodList:
    return read_pods(path)


@cache
def _shapes(path: str, memory: bool = True) -> TypicalShapes:
    return typical_shapes(_pods(path).demands, coverage=SHAPE_COVERAGE, memory=memory)


@cache
def _placement(path: str | None) -> PlacementPolicy:
    return load_policy(path) if path else PlacementPolicy()


def workload_for_seed(task: Task):
    """The fleet in the run's node order and the arrival sequence: the same for every policy of one seed."""
    nodes = _nodes(task.nodes)
    pods = _pods(task.pods)
    rng = np.random.default_rng(task.seed)
    sequence = arrival_sequence(pods, gpu_capacity_milli(nodes), task.inflation, rng)
    ordered = node_order(nodes, rng)
    return ordered, [pods.demands[i] for i in sequence]


def run_task(task: Task) -> RunResult:
    ordered, demands = workload_for_seed(task)
    # The reported fragmentation follows FGD's definition of a shape, whatever the policy's own.
    published = _shapes(task.pods, memory=False)
    placement = _placement(task.policy_file)
    policy = make_policy(task.policy, _shapes(task.pods, memory=shapes_count_memory(task.policy)), placement)
    kube = task.kube.serving(placement.extender_scoring)
    rng = np.random.default_rng([task.seed, 1])  # the policy's and the scheduler's own draws
    return replay(
        task.workload, ordered, demands, policy, published, task.seed, rng, task.mode, kube, verify=task.verify
    )


class Progress:
    """One status line (rewritten in place on a terminal, every few seconds otherwise)."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.stream = stream or sys.stderr  # looked up now: a default bound at import outlives a replaced stderr
        self.enabled = enabled
        self.tty = getattr(stream, "isatty", lambda: False)()
        self._last = 0.0

    def update(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done)
        line = f"[{self.done}/{self.total}] {elapsed:6.0f}s elapsed, ~{eta:5.0f}s left  {label}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                self.stream.write("\n")
        elif now - self._last > 10 or self.done == self.total:
            self.stream.write(line + "\n")
            self._last = now
        self.stream.flush()


def run_tasks(
    tasks: list[Task], jobs: int = 1, on_result: Callable[[RunResult], None] | None = None, progress: bool = True
) -> list[RunResult]:
    bar = Progress(len(tasks), enabled=progress)
    results: list[RunResult] = []

    def accept(result: RunResult) -> None:
        results.append(result)
        bar.update(f"{result.workload} {result.policy} {result.mode} seed {result.seed}: {result.elapsed_s:.1f}s")
        if on_result is not None:
            on_result(result)

    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            accept(run_task(task))
    else:
        with multiprocessing.get_context("fork").Pool(jobs, maxtasksperchild=20) as pool:
            for result in pool.imap_unordered(run_task, tasks):
                accept(result)
    return results


# -- outputs ------------------------------------------------------------------------------------------------


def policy_name(result: RunResult) -> str:
    return result.policy if result.mode == "sim" else f"{result.policy}@{result.mode}"


def write_steps(result: RunResult, out: Path) -> Path:
    """The per-arrival curve of one run (gzip CSV)."""
    folder = out / "steps" / result.workload
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{policy_name(result)}-seed{result.seed}.csv.gz"
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["step", "arrived_gpu_milli", "allocated_gpu_milli", "placed", "arrived_pct", "alloc_pct", "frag_pct"]
        )
        cap = result.capacity_milli
        for i in range(len(result.arrived_milli)):
            frag = result.frag_milli[i]
            w.writerow(
                [
                    i,
                    int(result.arrived_milli[i]),
                    int(result.allocated_milli[i]),
                    int(result.placed[i]),
                    f"{100 * result.arrived_milli[i] / cap:.3f}",
                    f"{100 * result.allocated_milli[i] / cap:.3f}",
                    "" if np.isnan(frag) else f"{100 * frag / cap:.3f}",
                ]
            )
    return path


def group(results: Iterable[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for r in results:
        groups[(r.workload, policy_name(r))].append(r)
    for runs in groups.values():
        runs.sort(key=lambda r: r.seed)
    return dict(sorted(groups.items()))


def write_summary(results: list[RunResult], out: Path) -> list[dict[str, object]]:
    rows = [summarize(workload, policy, runs) for (workload, policy), runs in group(results).items()]
    write_csv(out / "summary.csv", rows, SUMMARY_COLUMNS)
    return rows


def write_curves(results: list[RunResult], out: Path) -> dict[tuple[str, str], np.ndarray]:
    """`curves.csv`: per workload, policy and integer arrival bin, the allocation % (mean and std over seeds)."""
    curves = {}
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "policy", "arrived_pct", "alloc_pct_mean", "alloc_pct_std", "n_seeds"])
        for (workload, policy), runs in group(results).items():
            stack = np.vstack([allocation_curve(r) for r in runs])
            with np.errstate(all="ignore"):
                mean = np.nanmean(stack, axis=0)
                std = np.nanstd(stack, axis=0)
            curves[(workload, policy)] = mean
            for b in range(MAX_BIN + 1):
                if not np.isnan(mean[b]):
                    w.writerow([workload, policy, b, f"{mean[b]:.3f}", f"{std[b]:.3f}", len(runs)])
    return curves


def read_reference(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {(r["workload"], r["policy"]): r for r in csv.DictReader(f)}


def write_comparison(rows: list[dict[str, object]], reference: Path, out: Path) -> list[dict[str, object]]:
    """`vs_published.csv`: our numbers beside the published ones (and beside published FGD for ours)."""
    ref = read_reference(reference)
    table = []
    for row in rows:
        workload, policy = str(row["workload"]), str(row["policy"])
        base = policy.split("@")[0]
        published = ref.get((workload, base)) or ref.get((workload, "06-FGD"))
        entry: dict[str, object] = {"workload": workload, "policy": policy, "compared_to": ""}
        for key in ("alloc_pct_at_arrival100", "alloc_pct_at_arrival130", "frag_pct_at_arrival90"):
            entry[key] = row[key]
            entry[f"{key}_published"] = published[key] if published else ""
            entry[f"{key}_delta"] = (
                round(float(row[key]) - float(published[key]), 2) if published and row[key] != "" else ""
            )
        if published:
            entry["compared_to"] = published["policy"]
        table.append(entry)
    write_csv(out / "vs_published.csv", table)
    return table


def plot_curves(
    curves: dict[tuple[str, str], np.ndarray],
    out: Path,
    reference: dict[tuple[str, str], dict[str, str]] | None = None,
) -> list[Path]:
    """One PNG per workload: allocation ratio against arrived GPU request for every policy (kube-scheduler mode
    dashed), with the published values at 100 % and 130 % as crosses in the policy's colour."""
    plt = pyplot("alloc_*.png")
    if plt is None:
        return []
    reference = reference or {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bases = sorted({policy.split("@")[0] for _, policy in curves} | {p for _, p in reference})
    colour = {base: palette[i % len(palette)] for i, base in enumerate(bases)}
    paths = []
    for workload in sorted({w for w, _ in curves}):
        fig, (full, zoom) = plt.subplots(1, 2, figsize=(14, 5.5))
        x = np.arange(MAX_BIN + 1)
        for (w, policy), mean in sorted(curves.items()):
            if w != workload:
                continue
            base = policy.split("@")[0]
            style = "--" if "@" in policy else "-"
            for ax in (full, zoom):
                ax.plot(x, mean, style, label=policy, linewidth=1.4, color=colour[base])
        for (w, policy), row in sorted(reference.items()):
            if w != workload:
                continue
            points = [float(row["alloc_pct_at_arrival100"]), float(row["alloc_pct_at_arrival130"])]
            zoom.plot([100, 130], points, "x", color=colour[policy], markersize=8, label=f"{policy} (published)")
        for ax in (full, zoom):
            ax.plot(x, np.minimum(x, 100), color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("arrived GPU request (% of cluster GPU capacity)")
            ax.set_ylabel("GPU allocation ratio (%)")
            ax.grid(alpha=0.3)
        full.set_xlim(0, MAX_BIN)
        full.set_ylim(0, 100)
        zoom.set_xlim(80, MAX_BIN + 2)
        zoom.set_ylim(84, 98)
        zoom.set_title("80–130 % arrived; crosses: published values")
        full.set_title(workload)
        full.legend(loc="lower right", fontsize=8)
        zoom.legend(loc="lower right", fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"alloc_{workload}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
