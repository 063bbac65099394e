"""Replaying an arrival sequence, one pod at a time, through a placement policy.

Every decision goes through the decision core the extender serves: `policies.feasibility`, the policy's scores
(`policies.engine.evaluate` for ours, `policies.baselines` for the published ones), `policies.engine.assign` for
the concrete GPUs and `ClusterState.apply`, which refuses any over-booking.

A row's evaluation depends on that node's state only, so results are kept per distinct demand and only the nodes
that changed since (one per placed pod) are evaluated again (`policies.reuse`, as the extender's filter does); the
decision is the same as evaluating every node.

Two ways to turn scores into a node:
- `sim`: the policy's own choice (best score, ties to the earliest node of the run's fixed order), as the
  published simulator decides;
- `kube-scheduler`: as kube-scheduler decides with this extender configured: the built-in filters (CPU, memory,
  and whole GPUs counted as `nvidia.com/gpu` requests; a GPU share asks `gpu-extender.io/gpu-milli`, which the
  shipped profile's NodeResourcesFit ignores), optionally the node sampling of `percentageOfNodesToScore`, our
  filter (and its shortlist), then the total of our prioritize answer (`extender_scores`, 0..10) × weight × 10 and
  the built-in scores (NodeResourcesFit LeastAllocated or MostAllocated and NodeResourcesBalancedAllocation on CPU
  and memory, weight 1 each; the other default scorers give every node the same score for these pods), ties at
  random.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from policies.baselines import BasePolicy
from policies.config import ExtenderScoring
from policies.demand import Demand, DemandKind
from policies.engine import MAX_EXTENDER_SCORE, Evaluation, extender_scores, top_positions
from policies.feasibility import Reason
from policies.fragmentation import TypicalShapes, node_fragmentation
from policies.inventory import NodeInventory
from policies.reuse import EvaluationCache
from policies.state import ClusterState

MAX_NODE_SCORE = 100
MIN_FEASIBLE_NODES_TO_FIND = 100  # kube-scheduler's floor for percentageOfNodesToScore
MIN_FEASIBLE_NODES_PERCENTAGE = 5


@dataclass(frozen=True)
class KubeSchedulerOptions:
    """How the simulated kube-scheduler profile is configured."""

    extender_weight: int = 30
    scoring_mode: str = "rank"  # the policy file's extenderScoring.mode
    shortlist: int = 0  # the policy file's extenderScoring.shortlist: our filter lets only the best through
    percentage_of_nodes_to_score: int = 0  # kube-scheduler's adaptive default, as shipped
    builtin_scores: bool = True
    fit_strategy: str = "LeastAllocated"  # NodeResourcesFit scoringStrategy.type: LeastAllocated or MostAllocated
    balanced_allocation: bool = True  # NodeResourcesBalancedAllocation enabled
    # A pod no node of its sample can take while a node outside it could is tried again on the next sample this
    # many times (a running kube-scheduler requeues it; the FGD protocol and the end-to-end replay count it failed).
    sample_retries: int = 0

    def serving(self, scoring: ExtenderScoring) -> KubeSchedulerOptions:
        """These options with the extender answering as a policy file's `extenderScoring` says."""
        return replace(self, scoring_mode=scoring.mode, shortlist=scoring.shortlist)

    @property
    def builtin_spread(self) -> int:
        """The most the enabled built-in scores can differ between two nodes."""
        return MAX_NODE_SCORE * (1 + int(self.balanced_allocation)) if self.builtin_scores else 0


@dataclass
class RunResult:
    """One replay: per arrival, the GPU request arrived so far and the GPU capacity allocated after it."""

    workload: str
    policy: str
    mode: str
    seed: int
    capacity_milli: int
    gpus: int
    arrived_milli: np.ndarray  # int64 [P], cumulative, failed pods included
    allocated_milli: np.ndarray  # int64 [P], cumulative, after the pod
    placed: np.ndarray  # bool [P]
    frag_milli: np.ndarray  # float [P], cluster fragmentation after the pod (NaN where not measured)
    elapsed_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def num_feasible_nodes_to_find(percentage: int, nodes: int) -> int:
    """kube-scheduler's cut-off for how many feasible nodes to look for before scoring."""
    if nodes < MIN_FEASIBLE_NODES_TO_FIND or percentage >= 100:
        return nodes
    if percentage <= 0:
        percentage = max(50 - nodes // 125, MIN_FEASIBLE_NODES_PERCENTAGE)
    return max(nodes * percentage // 100, MIN_FEASIBLE_NODES_TO_FIND)


def _asks_whole_gpus(demand: Demand) -> bool:
    """The pod asks for `nvidia.com/gpu`, which kube-scheduler's NodeResourcesFit counts per node."""
    return demand.kind is DemandKind.WHOLE and not demand.shareable


def least_allocated(state: ClusterState, rows: np.ndarray, demand: Demand, most: bool = False) -> np.ndarray:
    """NodeResourcesFit's LeastAllocated (or MostAllocated) score on CPU and memory (weight 1 each), with the
    pod counted in."""
    total = 0
    for alloc, free, asked in (
        (state.cpu_total[rows], state.cpu_free[rows], demand.cpu_milli),
        (state.mem_total[rows], state.mem_free[rows], demand.memory_mib),
    ):
        requested = alloc - free + asked
        safe = np.maximum(alloc, 1)
        if most:
            score = np.where(alloc > 0, np.minimum(requested, alloc) * MAX_NODE_SCORE // safe, 0)
        else:
            score = np.where((alloc > 0) & (requested <= alloc), (alloc - requested) * MAX_NODE_SCORE // safe, 0)
        total = total + score
    return total // 2


def balanced_allocation(state: ClusterState, rows: np.ndarray, demand: Demand) -> np.ndarray:
    """NodeResourcesBalancedAllocation on CPU and memory: 100 × (1 − std of the requested fractions)."""
    fractions = []
    for alloc, free, asked in (
        (state.cpu_total[rows], state.cpu_free[rows], demand.cpu_milli),
        (state.mem_total[rows], state.mem_free[rows], demand.memory_mib),
    ):
        requested = alloc - free + asked
        fractions.append(np.minimum(requested / np.maximum(alloc, 1), 1.0))
    std = np.abs(fractions[0] - fractions[1]) / 2
    return np.trunc((1.0 - std) * MAX_NODE_SCORE).astype(np.int64)


class Replay:
    """One policy over one arrival sequence on one fleet (nodes in the run's fixed order)."""

    def __init__(
        self,
        nodes: list[NodeInventory],
        policy: BasePolicy,
        shapes: TypicalShapes,
        rng: np.random.Generator,
        mode: str = "sim",
        kube: KubeSchedulerOptions | None = None,
        frag_window: tuple[float, float] | None = (89.5, 90.5),
        verify: bool = False,
    ) -> None:
        if mode not in ("sim", "kube-scheduler"):
            raise ValueError(f"unknown mode {mode!r}")
        self.state = ClusterState(nodes)
        self.snapshot = self.state.view()
        self.policy = policy
        self.shapes = shapes
        self.rng = rng
        self.mode = mode
        self.kube = kube or KubeSchedulerOptions()
        self.frag_window = frag_window
        self.verify = verify
        self.n = self.snapshot.size
        self.all_rows = np.arange(self.n, dtype=np.int64)
        # Every distinct demand of a pod list is kept (a few hundred at most).
        self._evaluations = EvaluationCache(size=4096)
        self._evaluations.reset(self.n)
        self._next_start = 0
        # nvidia.com/gpu requested per node: NodeResourcesFit counts whole GPUs by the pods asking for them (the
        # shares' gpu-milli is ignored), so a node whose GPUs are held whole fails kube-scheduler's own filter.
        self._whole_gpus_allocatable = self.snapshot.gpu_present.sum(axis=1)  # MIG-mode GPUs are not nvidia.com/gpu
        self._whole_gpus_requested = np.zeros(self.n, dtype=np.int64)
        self.capacity_milli = self.snapshot.gpu_capacity_milli()

    # -- evaluation with per-node reuse ---------------------------------------------------------------------
    def evaluation(self, demand: Demand) -> Evaluation:
        """The policy's evaluation of every node for `demand`, re-evaluating only nodes changed since last time."""
        snapshot = self.snapshot
        evaluation = self._evaluations.evaluate(
            demand,
            self.all_rows,
            self.state.row_version,
            self.state.generation,
            lambda redo, _score: self.policy.evaluate(snapshot, demand, redo),
        )
        if self.verify:
            full = self.policy.evaluate(self.snapshot, demand, self.all_rows)
            assert np.array_equal(full.reasons, evaluation.reasons), "cached feasibility differs"
            assert np.array_equal(full.scores, evaluation.scores), "cached scores differ"
            assert np.array_equal(full.choice, evaluation.choice), "cached GPU choice differs"
        return evaluation

    # -- choosing a node ------------------------------------------------------------------------------------
    def choose(self, demand: Demand, evaluation: Evaluation) -> int | None:
        if self.mode == "sim":
            return self.policy.choose(evaluation, self.rng)
        index = self._kube_choose(demand, evaluation)
        retries = self.kube.sample_retries
        while index is None and retries and evaluation.feasible.any():
            index = self._kube_choose(demand, evaluation)
            retries -= 1
        return index

    def _kube_choose(self, demand: Demand, evaluation: Evaluation) -> int | None:
        state = self.state
        order = self.all_rows
        k = num_feasible_nodes_to_find(self.kube.percentage_of_nodes_to_score, self.n)
        if k < self.n:
            # Built-in filters run from a rotating start and stop once enough feasible nodes are found.
            order = np.roll(self.all_rows, -self._next_start)
            fits = (state.cpu_free[order] >= demand.cpu_milli) & (state.mem_free[order] >= demand.memory_mib)
            if _asks_whole_gpus(demand):
                fits &= self._whole_gpus_allocatable[order] - self._whole_gpus_requested[order] >= demand.gpu_count
            found = np.flatnonzero(fits)
            processed = self.n if len(found) <= k else int(found[k - 1]) + 1
            order = order[:processed]
            self._next_start = (self._next_start + processed) % self.n
        candidates = order[evaluation.reasons[order] == Reason.FITS]  # our filter (CPU/memory included)
        if not len(candidates):
            return None
        if 0 < self.kube.shortlist < len(candidates):
            candidates = candidates[top_positions(evaluation.scores[candidates], self.kube.shortlist, candidates)]
        if len(candidates) == 1:  # prioritize is not called for a single node
            return int(candidates[0])
        weight = self.kube.extender_weight * 10
        if weight * (MAX_EXTENDER_SCORE - (MAX_EXTENDER_SCORE - 1)) > self.kube.builtin_spread:
            # Only one node gets 10 and the rest at most 9: with this weight no built-in score can overturn the
            # extender's best, its highest raw score (ties to the lowest row, as `Evaluation.best`).
            return int(candidates[top_positions(evaluation.scores[candidates], 1, candidates)[0]])
        sub = Evaluation(
            candidates,
            evaluation.reasons[candidates],
            evaluation.scores[candidates],
            evaluation.choice[candidates],
            evaluation.mig_start[candidates],
            {},
        )
        total = extender_scores(sub, self.kube.scoring_mode) * weight
        if self.kube.builtin_scores:
            total = total + least_allocated(state, candidates, demand, self.kube.fit_strategy == "MostAllocated")
            if self.kube.balanced_allocation:
                total = total + balanced_allocation(state, candidates, demand)
        best = np.flatnonzero(total == total.max())
        return int(candidates[best[self.rng.integers(len(best))]]) if len(best) > 1 else int(candidates[best[0]])

    # -- the run --------------------------------------------------------------------------------------------
    def place(self, key: str, demand: Demand):
        """Decide and apply one pod; returns the assignment or None if it fits nowhere."""
        evaluation = self.evaluation(demand)
        index = self.choose(demand, evaluation)
        if index is None:
            return None
        assignment = self.policy.assign(self.snapshot, demand, evaluation, index, self.rng)
        self.state.apply(key, assignment)
        row = int(evaluation.rows[index])
        if _asks_whole_gpus(demand):
            self._whole_gpus_requested[row] += demand.gpu_count
        self.policy.observe(self.snapshot, row, demand, assignment)
        return assignment

    def run(self, demands: list[Demand] | tuple[Demand, ...], progress=None) -> dict[str, np.ndarray]:
        p = len(demands)
        arrived = np.zeros(p, dtype=np.int64)
        allocated = np.zeros(p, dtype=np.int64)
        placed = np.zeros(p, dtype=bool)
        frag = np.full(p, np.nan)
        arrived_now = allocated_now = 0
        lo, hi = self.frag_window or (np.inf, -np.inf)
        for i, demand in enumerate(demands):
            arrived_now += demand.gpu_milli_total
            assignment = self.place(f"pod-{i}", demand)
            if assignment is not None:
                placed[i] = True
                allocated_now += assignment.gpu_milli_total
            arrived[i] = arrived_now
            allocated[i] = allocated_now
            pct = 100.0 * arrived_now / self.capacity_milli
            if lo <= pct < hi:
                frag[i] = float(node_fragmentation(self.snapshot, self.all_rows, self.shapes).sum())
            if progress is not None and i % 500 == 0:
                progress(i, p)
        return {"arrived": arrived, "allocated": allocated, "placed": placed, "frag": frag}


def replay(
    workload: str,
    nodes: list[NodeInventory],
    demands: list[Demand],
    policy: BasePolicy,
    shapes: TypicalShapes,
    seed: int,
    rng: np.random.Generator,
    mode: str = "sim",
    kube: KubeSchedulerOptions | None = None,
    verify: bool = False,
) -> RunResult:
    started = time.perf_counter()
    sim = Replay(nodes, policy, shapes, rng, mode=mode, kube=kube, verify=verify)
    out = sim.run(demands)
    gpus = int(sim.snapshot.gpu_present.sum())
    return RunResult(
        workload=workload,
        policy=policy.label,
        mode=mode,
        seed=seed,
        capacity_milli=sim.capacity_milli,
        gpus=gpus,
        arrived_milli=out["arrived"],
        allocated_milli=out["allocated"],
        placed=out["placed"],
        frag_milli=out["frag"],
        elapsed_s=time.perf_counter() - started,
    )
