"""Published GPU placement baselines, written from their definitions on the shared decision primitives.

These are the comparison policies of the FGD paper (Weng et al., USENIX ATC'23) and of its simulator: Random,
DotProd (Tetris), GpuClustering, GpuPacking, BestFit and FGD. Each one uses the same feasibility check, the same
fragmentation measure and the same GPU assignment rules as the extender, and differs only in how it ranks the
feasible placements. `default` is the extender's own engine.

A policy answers three questions for one pod:
- `evaluate(snapshot, demand, rows)`: feasibility and a score for each row, plus the preferred GPU on that row
  (an `engine.Evaluation`). A row's result depends on that row's state only, so a caller may keep results and
  recompute just the rows that changed.
- `choose(evaluation, rng)`: which row gets the pod. The published simulator sums integer plugin scores and breaks
  ties by a fixed node order for the whole run; with rows in that order, ties go to the earliest row.
- `assign(snapshot, demand, evaluation, index, rng)`: the concrete GPUs (whole-GPU pods take the lowest-index free
  GPUs; a GPU share goes to the GPU `evaluate` preferred).

Scores that the published plugins truncate to integers are truncated here too: which nodes tie matters, because
ties are where the fixed node order acts as first-fit packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from policies.config import PlacementPolicy
from policies.demand import Demand, DemandKind
from policies.engine import Evaluation, assign, evaluate
from policies.feasibility import Reason, feasibility, mig_slots, usable_gpus
from policies.fragmentation import TypicalShapes, fragmentation_delta, fragmentation_points
from policies.inventory import MILLI_PER_GPU, Assignment
from policies.mig import MIG_TABLES, free_starts
from policies.state import MIG_TABLE_NAMES, ClusterSnapshot

MAX_NODE_SCORE = 100  # a kube-scheduler score plugin answers 0..100


def _evaluation(rows: np.ndarray, reasons: np.ndarray, ok: np.ndarray, node_scores, columns) -> Evaluation:
    n = len(rows)
    scores = np.full(n, -np.inf)
    choice = np.full(n, -1, dtype=np.int64)
    scores[ok] = node_scores
    choice[ok] = columns
    return Evaluation(rows, reasons, scores, choice, np.full(n, -1, dtype=np.int64), {})


def _feasible(snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand) -> tuple[np.ndarray, np.ndarray]:
    reasons = feasibility(snapshot, rows, demand)
    return reasons, np.flatnonzero(reasons == Reason.FITS)


def tightest_gpu(snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand) -> np.ndarray:
    """For a GPU share: per row the usable GPU with the least room left (lowest index among equals)."""
    usable = usable_gpus(snapshot, rows, demand)
    free = np.where(usable, snapshot.gpu_free[rows], np.iinfo(np.int32).max)
    return np.argmin(free, axis=1)


@dataclass
class BasePolicy:
    """Common behaviour: first best row wins; the GPU comes from `evaluate`."""

    name: str = ""
    label: str = ""
    randomized: bool = False  # `choose` or `assign` draw from the random generator

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        raise NotImplementedError

    def choose(self, evaluation: Evaluation, rng: np.random.Generator) -> int | None:
        return evaluation.best()

    def assign(
        self,
        snapshot: ClusterSnapshot,
        demand: Demand,
        evaluation: Evaluation,
        index: int,
        rng: np.random.Generator,
    ) -> Assignment:
        return assign(snapshot, demand, evaluation, index)

    def observe(self, snapshot: ClusterSnapshot, row: int, demand: Demand, assignment: Assignment) -> None:
        """Called after a pod was placed on `row` (for policies that remember what runs where)."""


@dataclass
class RandomPolicy(BasePolicy):
    """Any feasible node, uniformly; a GPU share goes to a uniformly random GPU with room."""

    name: str = "random"
    label: str = "01-Random"
    randomized: bool = True

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        reasons, ok = _feasible(snapshot, rows, demand)
        return _evaluation(rows, reasons, ok, 0.0, 0)

    def choose(self, evaluation: Evaluation, rng: np.random.Generator) -> int | None:
        feasible = np.flatnonzero(evaluation.feasible)
        if not len(feasible):
            return None
        return int(feasible[rng.integers(len(feasible))])

    def assign(self, snapshot, demand, evaluation, index, rng):
        if demand.kind is DemandKind.SHARE:
            row = np.array([evaluation.rows[index]])
            usable = np.flatnonzero(usable_gpus(snapshot, row, demand)[0])
            choice = evaluation.choice.copy()
            choice[index] = usable[rng.integers(len(usable))]
            evaluation = replace(evaluation, choice=choice)
        return assign(snapshot, demand, evaluation, index)


@dataclass
class DotProductPolicy(BasePolicy):
    """Tetris's alignment score on (CPU, GPU) normalised by the largest node: the smallest dot product of the
    node's free vector and the pod's demand wins (score = 100 × (1 − dot / 2), truncated). Shares: tightest GPU."""

    name: str = "dotprod"
    label: str = "02-DotProd"

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        reasons, ok = _feasible(snapshot, rows, demand)
        sub = rows[ok]
        cpu_max, gpu_max = snapshot.largest_node_cpu, snapshot.largest_node_gpu_milli
        node_cpu = snapshot.cpu_free[sub] / cpu_max
        node_gpu = snapshot.gpu_free[sub].sum(axis=1) / gpu_max
        dot = node_cpu * (demand.cpu_milli / cpu_max) + node_gpu * (demand.gpu_milli_total / gpu_max)
        score = np.trunc(MAX_NODE_SCORE * (1.0 - dot / 2.0))
        columns = tightest_gpu(snapshot, sub, demand) if demand.kind is DemandKind.SHARE else 0
        return _evaluation(rows, reasons, ok, score, columns)


# GpuClustering groups pods by their GPU request class: a share of one GPU, or k whole GPUs.
def gpu_request_class(demand: Demand) -> str | None:
    if demand.gpu_count == 0 or demand.mig_profile:
        return None
    if demand.kind is DemandKind.SHARE:
        return "share-gpu"
    return f"{demand.gpu_count}-gpu"


@dataclass
class GpuClusteringPolicy(BasePolicy):
    """Keep pods with the same GPU request together: nodes holding only that class score 75–100, mixed nodes
    with it 50–75, idle nodes 25–50, nodes of other classes 0–25; within a band, the fuller node wins."""

    name: str = "gpu-clustering"
    label: str = "03-GpuClustering"
    _classes: dict[str, int] = field(default_factory=dict, repr=False)
    _counts: np.ndarray | None = field(default=None, repr=False)  # [N, K] pods of each class per node

    def _table(self, n: int) -> np.ndarray:
        if self._counts is None or self._counts.shape[0] != n:
            self._counts = np.zeros((n, 16), dtype=np.int64)
        return self._counts

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        reasons, ok = _feasible(snapshot, rows, demand)
        sub = rows[ok]
        klass = gpu_request_class(demand)
        if klass is None:
            score = np.zeros(len(sub))
        else:
            counts = self._table(snapshot.size)[sub]
            kinds = (counts > 0).sum(axis=1)
            column = self._classes.get(klass)
            has = counts[:, column] > 0 if column is not None else np.zeros(len(sub), dtype=bool)
            gpu_max = snapshot.largest_node_gpu_milli
            fullness = (MAX_NODE_SCORE // 4) * (gpu_max - snapshot.gpu_free[sub].sum(axis=1)) // gpu_max
            band = np.where(has, np.where(kinds == 1, 75, 50), np.where(kinds == 0, 25, 0))
            score = (fullness + band).astype(np.float64)
        columns = tightest_gpu(snapshot, sub, demand) if demand.kind is DemandKind.SHARE else 0
        return _evaluation(rows, reasons, ok, score, columns)

    def observe(self, snapshot: ClusterSnapshot, row: int, demand: Demand, assignment: Assignment) -> None:
        klass = gpu_request_class(demand)
        if klass is None:
            return
        table = self._table(snapshot.size)
        column = self._classes.setdefault(klass, len(self._classes))
        if column >= table.shape[1]:
            self._counts = table = np.concatenate([table, np.zeros_like(table)], axis=1)
        table[row, column] += 1


@dataclass
class GpuPackingPolicy(BasePolicy):
    """Prefer GPUs already partly used (score 50–100, fuller first), then fully free GPUs on a used node
    (33–50), then idle nodes (0–33, smaller first). Shares go to the tightest GPU."""

    name: str = "gpu-packing"
    label: str = "04-GpuPacking"

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        reasons, ok = _feasible(snapshot, rows, demand)
        sub = rows[ok]
        columns = tightest_gpu(snapshot, sub, demand) if demand.kind is DemandKind.SHARE else 0
        if demand.gpu_count == 0 or demand.mig_profile:
            return _evaluation(rows, reasons, ok, 0.0, columns)
        present = snapshot.gpu_present[sub]
        free = snapshot.gpu_free[sub].astype(np.int64)
        gpus = present.sum(axis=1)
        fully_free = ((free == MILLI_PER_GPU) & present).sum(axis=1)
        idle_node = np.maximum(MAX_NODE_SCORE // 3 - fully_free, fully_free)
        if demand.kind is DemandKind.SHARE:
            left = free[np.arange(len(sub)), columns]
            on_used_gpu = np.maximum(MAX_NODE_SCORE - (left * 100 // MILLI_PER_GPU) // 10, MAX_NODE_SCORE // 2)
            on_free_gpu = max(MAX_NODE_SCORE // 2 - 1, MAX_NODE_SCORE // 3)
            used_node = np.where(left == MILLI_PER_GPU, on_free_gpu, on_used_gpu)
        else:
            used_node = np.full(len(sub), max(MAX_NODE_SCORE // 2 - demand.gpu_count, MAX_NODE_SCORE // 3))
        score = np.where(fully_free == gpus, idle_node, used_node).astype(np.float64)
        return _evaluation(rows, reasons, ok, score, columns)


@dataclass
class BestFitPolicy(BasePolicy):
    """Least weighted leftover after placement: CPU and GPU, half each, relative to the largest node
    (score = 100 × (1 − leftover), truncated). Shares go to the tightest GPU."""

    name: str = "best-fit"
    label: str = "05-BestFit"

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        reasons, ok = _feasible(snapshot, rows, demand)
        sub = rows[ok]
        cpu_left = (snapshot.cpu_free[sub] - demand.cpu_milli) / snapshot.largest_node_cpu
        gpu_left = (snapshot.gpu_free[sub].sum(axis=1) - demand.gpu_milli_total) / snapshot.largest_node_gpu_milli
        score = np.trunc((1.0 - (0.5 * cpu_left + 0.5 * gpu_left)) * MAX_NODE_SCORE)
        columns = tightest_gpu(snapshot, sub, demand) if demand.kind is DemandKind.SHARE else 0
        return _evaluation(rows, reasons, ok, score, columns)


fgd_score = fragmentation_points  # FGD's published plugin score


@dataclass
class FgdPolicy(BasePolicy):
    """Fragmentation gradient descent: the placement that increases the node's expected fragmentation least.
    A share goes to the GPU with the best (integer) score, the lowest index among equals."""

    shapes: TypicalShapes | None = None
    name: str = "fgd"
    label: str = "06-FGD"

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        assert self.shapes is not None
        reasons, ok = _feasible(snapshot, rows, demand)
        sub = rows[ok]
        if not len(sub):
            return _evaluation(rows, reasons, ok, 0.0, 0)
        score = fgd_score(fragmentation_delta(snapshot, sub, demand, self.shapes))
        if demand.kind is DemandKind.SHARE:
            score = np.where(usable_gpus(snapshot, sub, demand), score, -1.0)
            columns = np.argmax(score, axis=1)
            return _evaluation(rows, reasons, ok, score[np.arange(len(sub)), columns], columns)
        return _evaluation(rows, reasons, ok, score[:, 0], 0)


@dataclass
class EnginePolicy(BasePolicy):
    """The extender's own decision: `policies.engine.evaluate` with a placement policy (weights, shapes)."""

    shapes: TypicalShapes | None = None
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    name: str = "default"
    label: str = "default"

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        assert self.shapes is not None
        return evaluate(snapshot, demand, rows, self.policy, self.shapes)


@dataclass
class FirstFitPolicy(BasePolicy):
    """The first feasible node in order; on it the lowest-index GPU with room and, for MIG, the lowest free start
    slot. What a scheduler without placement knowledge does."""

    name: str = "first-fit"
    label: str = "FirstFit"

    def evaluate(self, snapshot: ClusterSnapshot, demand: Demand, rows: np.ndarray) -> Evaluation:
        reasons, ok = _feasible(snapshot, rows, demand)
        evaluation = _evaluation(rows, reasons, ok, 0.0, 0)
        sub = rows[ok]
        if demand.kind is DemandKind.SHARE:
            evaluation.choice[ok] = np.argmax(usable_gpus(snapshot, sub, demand), axis=1)
        elif demand.kind is DemandKind.MIG and len(sub):
            assert demand.mig_profile is not None
            _, free = mig_slots(snapshot, sub, demand.mig_profile)
            gpus = np.argmax(free, axis=1)
            evaluation.choice[ok] = gpus
            tables = snapshot.mig_table[sub, gpus]
            occupied = snapshot.mig_occupied[sub, gpus]
            for i, (t, occ) in enumerate(zip(tables.tolist(), occupied.tolist(), strict=True)):
                profile = MIG_TABLES[MIG_TABLE_NAMES[t]].profile(demand.mig_profile)
                assert profile is not None
                evaluation.mig_start[ok[i]] = free_starts(profile, occ)[0]
        return evaluation


POLICY_NAMES: tuple[str, ...] = ("random", "dotprod", "gpu-clustering", "gpu-packing", "best-fit", "fgd", "default")
OTHER_POLICY_NAMES: tuple[str, ...] = ("first-fit",)


def shapes_count_memory(name: str) -> bool:
    """Whether the policy of that name wants typical shapes that count the pods' memory: the extender's engine
    does; the published baselines keep FGD's definition of a shape (CPU, GPUs, GPU models)."""
    return name == "default"


def make_policy(name: str, shapes: TypicalShapes, placement: PlacementPolicy | None = None) -> BasePolicy:
    """A fresh policy instance by its command-line name (policies may keep per-run state)."""
    if name == "random":
        return RandomPolicy()
    if name == "dotprod":
        return DotProductPolicy()
    if name == "gpu-clustering":
        return GpuClusteringPolicy()
    if name == "gpu-packing":
        return GpuPackingPolicy()
    if name == "best-fit":
        return BestFitPolicy()
    if name == "fgd":
        return FgdPolicy(shapes=shapes)
    if name == "first-fit":
        return FirstFitPolicy()
    if name == "default":
        return EnginePolicy(shapes=shapes, policy=placement or PlacementPolicy())
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES + OTHER_POLICY_NAMES)}")
