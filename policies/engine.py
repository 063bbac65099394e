"""The one decision core: feasibility, scores and the concrete placement, for every caller.

The extender's verbs, the simulator, the planner and `explain` all call `evaluate` and `assign`; nothing else
decides where a pod goes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, partial

import numpy as np

from policies.config import PlacementPolicy
from policies.demand import Demand, DemandKind
from policies.feasibility import FITS, Reason, borrowable_gpus, feasibility, lender_busy, may_borrow, usable_gpus
from policies.fragmentation import TypicalShapes
from policies.inventory import MILLI_PER_GPU, Assignment, MigPlacement
from policies.plan_targets import PlanTargets
from policies.scoring import FRAGMENTATION_SCORERS, SCORERS, Candidates
from policies.state import ClusterSnapshot

MAX_EXTENDER_SCORE = 10


@dataclass(frozen=True)
class Evaluation:
    """Everything decided about one pod over a set of rows of a snapshot."""

    rows: np.ndarray  # [R] snapshot rows, in request order
    reasons: np.ndarray  # uint8 [R], Reason.FITS where feasible
    scores: np.ndarray  # float [R], -inf where infeasible (only when scored)
    choice: np.ndarray  # int [R], best placement column per row (-1 where none)
    mig_start: np.ndarray  # int [R], chosen MIG start slot (-1 where none)
    components: dict[str, np.ndarray]  # per-scorer value at the chosen column, for explanations
    borrowed: np.ndarray | None = None  # bool [R], the placement runs on borrowed idle capacity (overcommit)

    @cached_property
    def feasible(self) -> np.ndarray:
        return self.reasons == FITS

    def is_borrowed(self, index: int) -> bool:
        return self.borrowed is not None and bool(self.borrowed[index])

    def take(self, at: np.ndarray) -> Evaluation:
        """The evaluation of the rows at positions `at` only."""
        return Evaluation(
            self.rows[at],
            self.reasons[at],
            self.scores[at],
            self.choice[at],
            self.mig_start[at],
            {name: value[at] for name, value in self.components.items()},
            None if self.borrowed is None else self.borrowed[at],
        )

    def best(self) -> int | None:
        """Index (into `rows`) of the preferred placement; ties go to the lowest snapshot row (see `shortlist`)."""
        if not self.feasible.any():
            return None
        return int(self.shortlist(1)[0])

    def shortlist(self, limit: int) -> np.ndarray:
        """Indices (into `rows`) of the `limit` preferred feasible placements, best first (`best()` leads).

        Equal scores are ordered by snapshot row, not by where the names stood in the request: kube-scheduler
        lists the nodes its parallel filters passed in no fixed order, and the same cluster state should get the
        same decision. Ties are common (fragmentation in integer steps makes near-equal placements tie), and a
        fixed order fills tied nodes one after the other."""
        feasible = np.flatnonzero(self.feasible)
        return feasible[top_positions(self.scores[feasible], limit, self.rows[feasible])]


def top_positions(scores: np.ndarray, limit: int, tie_order: np.ndarray | None = None) -> np.ndarray:
    """Positions of the `limit` highest scores, highest first; equal scores by ascending `tie_order` (default:
    their position)."""
    if not len(scores):
        return np.empty(0, dtype=np.int64)
    if tie_order is None:
        tie_order = np.arange(len(scores))
    if limit == 1:
        top = np.flatnonzero(scores == scores.max())
        return top[[int(np.argmin(tie_order[top]))]]
    return np.lexsort((tie_order, -scores))[:limit]


def evaluate(
    snapshot: ClusterSnapshot,
    demand: Demand,
    rows: np.ndarray,
    policy: PlacementPolicy,
    shapes: TypicalShapes,
    score: bool = True,
    components: bool = False,
    plan: PlanTargets | None = None,
) -> Evaluation:
    """Feasibility of `rows` for `demand` and, with `score`, each feasible row's best placement and its score.
    With `components`, also each scorer's part of that score (what `explain` shows; the hot path has no use for
    them). `plan`: the co-location plan's slots, which serving pods are drawn to."""
    reasons = feasibility(snapshot, rows, demand)
    _limit_cold_loads(snapshot, rows, demand, policy, reasons)
    n = len(rows)
    scores = np.full(n, -np.inf)
    choice = np.full(n, -1, dtype=np.int64)
    mig_start = np.full(n, -1, dtype=np.int64)
    parts: dict[str, np.ndarray] = {}
    lend, borrowed = _borrowing(snapshot, rows, demand, policy, reasons)
    fits = reasons == FITS
    ok = np.flatnonzero(fits if borrowed is None else fits & ~borrowed)
    if score and len(ok):
        candidates = Candidates(snapshot, rows[ok], demand, shapes, plan)
        total = np.zeros(candidates.valid.shape)
        values: dict[str, np.ndarray] = {}
        how = policy.fragmentation_scoring
        fragmentation = partial(FRAGMENTATION_SCORERS[how.mode], cpu_stranding=how.cpu_stranding)
        start = policy.model_start
        model_cache = partial(
            SCORERS["model_cache"], local_s=start.local_weights_seconds, remote_s=start.remote_pull_seconds
        )
        scorers = {**SCORERS, "fragmentation": fragmentation, "model_cache": model_cache}
        for name, scorer in scorers.items():
            weight = getattr(policy.weights, name)
            if weight:
                values[name] = scorer(candidates)
                total = total + weight * values[name]
        total = np.where(candidates.valid, total, -np.inf)
        best_col = np.argmax(total, axis=1)
        picked = np.arange(len(ok))
        scores[ok] = total[picked, best_col]
        choice[ok] = best_col
        if demand.kind is DemandKind.MIG:
            mig_start[ok] = candidates.mig_choice[0][picked, best_col]
        for name, value in values.items() if components else ():
            full = np.full(n, np.nan)
            full[ok] = np.broadcast_to(value, total.shape)[picked, best_col]
            parts[name] = full
    if score and borrowed is not None and borrowed.any():
        _score_borrowed(snapshot, rows, lend, borrowed, policy, scores, choice, parts if components else None)
    return Evaluation(rows, reasons, scores, choice, mig_start, parts, borrowed)


def _limit_cold_loads(
    snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, policy: PlacementPolicy, reasons: np.ndarray
) -> None:
    """A serving replica does not go where `coldLoads.maxPerNode` replicas are loading already, nor anywhere while
    `coldLoads.maxPerModel` of its model's are."""
    limit = policy.cold_loads.max_per_node
    if limit and demand.model_name is not None:
        reasons[(reasons == FITS) & (snapshot.serving_starting[rows] >= limit)] = int(Reason.COLD_LOADS)
    if model_loads_full(snapshot, demand, policy):
        reasons[reasons == FITS] = int(Reason.MODEL_LOADS)


def model_loads_full(snapshot: ClusterSnapshot, demand: Demand, policy: PlacementPolicy) -> bool:
    """The pod's model has `coldLoads.maxPerModel` replicas loading in the fleet. Not a property of any node, so
    callers that reuse per-node results apply it afresh (`gate_model_loads`)."""
    limit = policy.cold_loads.max_per_model
    model = demand.model_name
    return bool(limit and model is not None and snapshot.model_loading.get(model, 0) >= limit)


def gate_model_loads(
    snapshot: ClusterSnapshot, demand: Demand, policy: PlacementPolicy, evaluation: Evaluation
) -> Evaluation:
    """The evaluation, with every feasible row refused while the model's fleet-wide loads are at their limit."""
    if not model_loads_full(snapshot, demand, policy) or not evaluation.feasible.any():
        return evaluation
    reasons = np.where(evaluation.feasible, np.uint8(Reason.MODEL_LOADS), evaluation.reasons).astype(np.uint8)
    return replace(evaluation, reasons=reasons, scores=np.full(len(reasons), -np.inf))


# GPU capacity rejections that measured idle capacity can cure.
_CAPACITY_REASONS = (int(Reason.NO_GPU_SHARE), int(Reason.GPUS_BUSY))


def _borrowing(
    snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, policy: PlacementPolicy, reasons: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """GPUs that lend to the demand ([R, G]) and the rows placed on borrowed capacity ([R]), None for a demand that
    may not borrow; marks cured rows feasible in `reasons`. Only GPUs whose allocation cannot hold the share lend:
    free allocation is used first."""
    overcommit = policy.overcommit
    if not may_borrow(demand, overcommit):
        return None, None
    lend = borrowable_gpus(snapshot, rows, demand, overcommit) & ~usable_gpus(snapshot, rows, demand)
    can_borrow = lend.any(axis=1)
    cured = can_borrow & np.isin(reasons, _CAPACITY_REASONS)
    reasons[cured] = FITS
    borrowed = cured
    if overcommit.prefer == "borrow":
        borrowed = can_borrow & (reasons == FITS)
    return lend, borrowed


def _score_borrowed(
    snapshot: ClusterSnapshot,
    rows: np.ndarray,
    lend: np.ndarray,
    borrowed: np.ndarray,
    policy: PlacementPolicy,
    scores: np.ndarray,
    choice: np.ndarray,
    components: dict[str, np.ndarray] | None,
) -> None:
    """Borrowed placements go on the lending GPU with the most headroom (least interference), judged as the safety
    check judges it, and rank as a block above (`prefer: borrow`) or below (`allocation`) every placement on
    allocated capacity."""
    at = np.flatnonzero(borrowed)
    headroom = np.where(lend[at], 1.0 - lender_busy(snapshot, rows[at], policy.overcommit), -np.inf)
    best_col = np.argmax(headroom, axis=1)
    best = headroom[np.arange(len(at)), best_col]
    allocated = scores[np.isfinite(scores)]
    if not len(allocated):
        offset = 0.0
    elif policy.overcommit.prefer == "borrow":
        offset = float(allocated.max()) + 1.0
    else:
        offset = float(allocated.min()) - 2.0
    scores[at] = offset + best
    choice[at] = best_col
    if components is not None:
        full = np.full(len(rows), np.nan)
        full[at] = best
        components["borrowed_headroom"] = full


def extender_scores(evaluation: Evaluation, mode: str = "rank") -> np.ndarray:
    """Integers 0..10 for kube-scheduler. The single best placement gets 10 and only it does.

    kube-scheduler breaks ties among equal totals at random and adds its own plugins' scores, so a decisive
    answer needs a unique maximum; the rest keep their order, spread over 0..9.
    """
    out = np.zeros(len(evaluation.rows), dtype=np.int64)
    feasible = np.flatnonzero(evaluation.feasible)
    if not len(feasible):
        return out
    values = evaluation.scores[feasible]
    best = evaluation.best()
    lo, hi = float(values.min()), float(values.max())
    if mode == "linear" and hi > lo:
        scaled = np.floor((values - lo) / (hi - lo) * (MAX_EXTENDER_SCORE - 1)).astype(np.int64)
    else:
        # Rank: distinct values ordered, spread evenly over 0..9, so small raw gaps still separate nodes.
        distinct = np.unique(values)
        position = np.searchsorted(distinct, values)
        top = max(len(distinct) - 1, 1)
        scaled = np.floor(position / top * (MAX_EXTENDER_SCORE - 1)).astype(np.int64)
    out[feasible] = np.clip(scaled, 0, MAX_EXTENDER_SCORE - 1)
    out[best] = MAX_EXTENDER_SCORE
    return out


def assign(
    snapshot: ClusterSnapshot, demand: Demand, evaluation: Evaluation, index: int, plan: PlanTargets | None = None
) -> Assignment:
    """The concrete resources for the placement at `index` of an evaluation (which must be feasible). Whole GPUs
    go to the model's planned GPUs on the node first (`plan`); shares and MIG slices were scored per GPU."""
    if evaluation.reasons[index] != FITS:
        raise ValueError("cannot assign an infeasible placement")
    row = int(evaluation.rows[index])
    # Built once with all its fields: `dataclasses.replace` costs more than the rest of this function.
    common = {
        "node": snapshot.names[row],
        "cpu_milli": demand.cpu_milli,
        "memory_mib": demand.memory_mib,
        "guarded": demand.guards_gpu,
        "expected_busy": demand.busy_estimate,
        "model": demand.model_name,
        "starting": demand.model_name is not None,  # a serving replica loads from its bind until it is Ready
    }
    kind = demand.kind
    if kind is DemandKind.NONE:
        return Assignment(**common)
    column = int(evaluation.choice[index])
    if kind is DemandKind.MIG:
        start = int(evaluation.mig_start[index])
        if column < 0 or start < 0:
            raise ValueError("evaluation was not scored; cannot choose a MIG slot")
        assert demand.mig_profile is not None
        return Assignment(**common, mig=MigPlacement(gpu=column, profile=demand.mig_profile, start=start))
    borrowed = evaluation.is_borrowed(index)
    if kind is DemandKind.SHARE or borrowed:
        if column < 0:
            raise ValueError("evaluation was not scored; cannot choose a GPU")
        return Assignment(
            **common, gpus=(column,), milli=demand.gpu_milli, gpu_memory_mib=demand.gpu_memory_mib, borrowed=borrowed
        )
    usable = np.flatnonzero(usable_gpus(snapshot, np.array([row]), demand)[0])
    if plan is not None and demand.model_name in plan.counts:  # the model's planned GPUs first
        wanted = plan.open_slots(snapshot, np.array([row]), demand.model_name)[0, usable]
        usable = usable[np.argsort(-wanted, kind="stable")]
    gpus = tuple(int(g) for g in usable[: demand.gpu_count])
    return Assignment(**common, gpus=gpus, milli=MILLI_PER_GPU, gpu_memory_mib=demand.gpu_memory_mib)


def place_on_node(
    snapshot: ClusterSnapshot,
    demand: Demand,
    node: str,
    policy: PlacementPolicy,
    shapes: TypicalShapes,
    plan: PlanTargets | None = None,
) -> tuple[Assignment | None, Reason]:
    """The concrete resources `demand` would get on one given node (the scheduler already chose it), or None and
    why it does not fit. Raises KeyError for a node the snapshot does not know."""
    rows, unknown = snapshot.rows([node])
    if unknown:
        raise KeyError(node)
    evaluation = evaluate(snapshot, demand, rows, policy, shapes, plan=plan)
    reason = Reason(int(evaluation.reasons[0]))
    if reason != Reason.FITS:
        return None, reason
    return assign(snapshot, demand, evaluation, 0, plan), reason
