"""The scheduler's verbs over the cluster model: filter, prioritize, bind, preempt and explain.

This is where a pod and a list of node names meet the decision core; the HTTP layer only translates the wire
format. Filter and prioritize read one immutable snapshot and do no I/O. Once its answer is sent, prioritize (or
filter, when the policy has it shortlist the best nodes) holds the placement it recommends until bind asks for it;
bind holds capacity in the model before it talks to the API server, and gives it back if the binding fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from itertools import compress
from typing import Any, Protocol

import numpy as np

from policies.config import PlacementPolicy
from policies.demand import Demand
from policies.engine import Evaluation, assign, evaluate, extender_scores, gate_model_loads, place_on_node
from policies.feasibility import FITS, REASON_TEXT, Reason, is_resolvable, may_borrow
from policies.fragmentation import TypicalShapes
from policies.inventory import Assignment, NodeInventory
from policies.plan_targets import PlanTargets
from policies.reuse import EvaluationCache
from policies.state import ClusterSnapshot, ClusterState, ConflictError
from scheduler.annotations import assignment_annotations
from scheduler.binder import BindError  # one class: a binder's refusal is a bind error like the service's own
from scheduler.model import ClusterModel, ModelView
from scheduler.podspec import cached_demand
from scheduler.telemetry import RecentBindings

log = logging.getLogger("gpu_extender.decisions")

UNKNOWN_NODE = "node is not in the GPU extender's inventory (no GPU data yet)"


class NotReadyError(RuntimeError):
    """The cluster view is not complete yet; answering now could double-book."""


class Binder(Protocol):
    def bind(self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]) -> None: ...

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class _Decision:
    """One evaluation of a pod over requested names, with the view (snapshot, policy, shapes, plan) it was computed
    from."""

    view: ModelView
    demand: Demand
    evaluation: Evaluation
    names: list[str]  # as requested
    known: list[str]  # the requested names the snapshot knows, in request order (= evaluation.rows)
    unknown: list[str]
    scored: bool = True

    def feasible_part(self, passed: list[str]) -> _Decision:
        """The same decision over the names it found feasible (`passed`, in order): what prioritize is asked next."""
        return self.part(np.flatnonzero(self.evaluation.feasible), passed)

    def part(self, at: np.ndarray, names: list[str]) -> _Decision:
        """The same decision over the known names at positions `at` (`names`, in that order)."""
        return replace(self, evaluation=self.evaluation.take(at), names=names, known=names, unknown=[])


@dataclass(frozen=True)
class FilterOutcome:
    passed: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    unresolvable: dict[str, str] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    decision: _Decision | None = field(default=None, repr=False, compare=False)
    shortlisted: bool = False  # only the best-scored feasible nodes passed (`decision` covers just those)


@dataclass(frozen=True)
class _Cached:
    """A prioritize answer and everything it depended on: reusable while none of it has changed."""

    generation: int
    policy: PlacementPolicy
    shapes: TypicalShapes
    plan: PlanTargets | None
    demand: Demand
    names: list[str]
    rows: np.ndarray  # the snapshot rows of `names`; empty when some name was unknown
    answer: tuple[tuple[str, int], ...]
    planned: Assignment | None = None  # the placement on the node scored 10, which bind will most likely get
    planned_row: int = -1

    def still_valid(self, view: ModelView, demand: Demand, names: list[str]) -> bool:
        """Scores depend on the policy, the typical shapes, the plan, the pod and the state of the scored rows only
        (ranks are relative among them), so changes to other nodes since leave the answer exact."""
        if not (self._same_inputs(view, demand) and self.names == names):
            return False
        snapshot = view.snapshot
        if snapshot.generation == self.generation:
            return True
        rows = self.rows
        if not len(rows) or int(rows.max()) >= snapshot.size:  # a name unknown then may be known now
            return False
        return int(snapshot.row_version[rows].max()) <= self.generation

    def _same_inputs(self, view: ModelView, demand: Demand) -> bool:
        return (
            self.policy is view.policy
            and self.shapes is view.shapes
            and self.plan is view.plan
            and self.demand == demand
        )

    def placement_on(self, node: str, view: ModelView, demand: Demand) -> Assignment | None:
        """The planned placement, if bind asks for its node and nothing it depends on has changed: the choice
        of GPUs on a node depends only on that node's state, the pod, the policy and the typical shapes."""
        planned, row = self.planned, self.planned_row
        if planned is None or planned.node != node or not 0 <= row < view.snapshot.size:
            return None
        if not self._same_inputs(view, demand):
            return None
        return planned if int(view.snapshot.row_version[row]) <= self.generation else None


class RowLookup:
    """Snapshot rows of requested node names, remembered for the last few lists asked.

    A list asked again in the same order (a retried pod, or a scheduler that returns its feasible nodes in a stable
    order) is found by comparison, a fraction of the cost of looking each name up (every lookup hashes a new
    string and misses the CPU cache). kube-scheduler v1.36 collects feasible nodes from parallel workers, so its
    order often differs between pods; a differing list usually fails the comparison at its first name. Rows stay
    valid while the snapshots share their name index, which only a change of the node set replaces.
    """

    def __init__(self, size: int = 4) -> None:
        self._recent: deque[tuple[Mapping[str, int], list[str], np.ndarray, list[str]]] = deque(maxlen=size)

    def lookup(self, snapshot: ClusterSnapshot, names: list[str]) -> tuple[np.ndarray, list[str]]:
        index = snapshot.index
        for seen_index, seen_names, rows, unknown in self._recent:
            if seen_index is index and seen_names == names:
                return rows, unknown
        rows, unknown = snapshot.rows(names)
        rows.flags.writeable = False
        self._recent.appendleft((index, names, rows, unknown))
        return rows, unknown


class ScoreCache:
    """The last prioritize answers by pod, so that a prioritize call can find its answer computed ahead.

    An answer is reused only for the same names, policy, typical shapes and demand, and while none of the rows it
    scored has changed: a hit is the same computation, done once. Binds and watch events on other nodes, which
    arrive all the time during a burst, leave it valid. A small lock guards the dict operations only.
    """

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._entries: OrderedDict[str, _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.planned_hits = 0  # binds that took prioritize's placement instead of deciding again

    def get(self, uid: str) -> _Cached | None:
        with self._lock:
            return self._entries.get(uid)

    def put(self, uid: str, entry: _Cached) -> None:
        with self._lock:
            current = self._entries.get(uid)
            if current is not None and current.generation > entry.generation:
                return  # a newer answer is already there
            self._entries[uid] = entry
            self._entries.move_to_end(uid)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# Reason code -> (text, whether preemption could cure it): one lookup per reason instead of one per node.
_VERDICTS: dict[int, tuple[str, bool]] = {int(r): (REASON_TEXT[r], is_resolvable(r)) for r in Reason}


def pod_uid(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return str(metadata.get("uid") or f"{metadata.get('namespace', 'default')}/{metadata.get('name', '')}")


def _nominated_node(pod: Mapping[str, Any]) -> str:
    status = pod.get("status")
    node = status.get("nominatedNodeName") if isinstance(status, dict) else None
    return node if isinstance(node, str) else ""


class Evictions:
    """The victims each preemptor was last granted, per node, for a while.

    kube-scheduler nominates the pod to one of those nodes and deletes the victims there, then tries the pod again
    as soon as it sees them deleted. Our watch may show the deletion a few milliseconds later: filter then still
    finds the node full, and kube-scheduler, seeing nothing terminating there, preempts again on another node. A
    preemptor whose nominated node holds it once its granted victims are gone therefore gets no new victims.
    """

    def __init__(self, ttl_s: float = 30.0, size: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s, self._size, self._clock = ttl_s, size, clock
        self._granted: OrderedDict[str, tuple[float, dict[str, list[str]]]] = OrderedDict()
        self._lock = threading.Lock()

    def grant(self, uid: str, victims: dict[str, list[str]]) -> None:
        with self._lock:
            self._granted[uid] = (self._clock() + self._ttl_s, victims)
            self._granted.move_to_end(uid)
            while len(self._granted) > self._size:
                self._granted.popitem(last=False)

    def granted(self, uid: str, node: str) -> list[str] | None:
        with self._lock:
            entry = self._granted.get(uid)
        if entry is None or entry[0] < self._clock():
            return None
        return entry[1].get(node)


class PlacementService:
    def __init__(
        self, model: ClusterModel, binder: Binder, confirm_on_bind: bool = False, demand_cache_size: int = 20_000
    ) -> None:
        """`confirm_on_bind`: no watch will report the binding back (a static fleet), so a successful bind is
        recorded as final at once instead of as a reservation waiting for the watch."""
        self.model = model
        self.binder = binder
        self._confirm_on_bind = confirm_on_bind
        self.recent_bindings = RecentBindings()  # load estimates until telemetry shows the new pods
        self._demands: OrderedDict[str, Demand] = OrderedDict()
        self._demand_cache_size = demand_cache_size
        self.score_cache = ScoreCache()
        self._rows = RowLookup()
        self.evaluations = EvaluationCache()
        self._reuse_basis: tuple[object, ...] = (None, None, None, None)
        self.evictions = Evictions()

    # -- read-only verbs ---------------------------------------------------------------------------------
    def demand(self, pod: Mapping[str, Any]) -> Demand:
        """Parse (and remember, for bind) what a pod asks for. Raises PodSpecError on a malformed pod."""
        demand = cached_demand(dict(pod))  # replicas of one workload ask the same
        uid = pod_uid(pod)
        self._demands[uid] = demand
        self._demands.move_to_end(uid)
        while len(self._demands) > self._demand_cache_size:
            self._demands.popitem(last=False)
        return demand

    def _evaluate(
        self,
        pod: Mapping[str, Any],
        names: list[str],
        score: bool = True,
        reuse: bool = True,
        view: ModelView | None = None,
    ) -> _Decision:
        """One view for the whole call: the names, rows and verdicts come from one snapshot, scored under the policy
        and shapes published with it. A caller that has read the view already passes it."""
        self._check_ready()
        demand = self.demand(pod)
        return self._fresh(demand, view or self.model.view(), names, score, reuse)

    def _check_ready(self) -> None:
        if not self.model.ready:
            raise NotReadyError("the GPU extender's cluster view is not ready yet (initial list in progress)")

    def _fresh(
        self, demand: Demand, view: ModelView, names: list[str], score: bool = True, reuse: bool = True
    ) -> _Decision:
        """The evaluation of `names`; with `reuse`, rows unchanged since this demand last met them are not
        evaluated again (their per-scorer components are then left out)."""
        rows, unknown = self._rows.lookup(view.snapshot, names)
        evaluation = self._evaluation(view, demand, rows, score, reuse)
        known = names if not unknown else [view.snapshot.names[r] for r in rows.tolist()]
        return _Decision(view, demand, evaluation, names, known, unknown, score)

    def _evaluation(
        self, view: ModelView, demand: Demand, rows: np.ndarray, score: bool, reuse: bool = True
    ) -> Evaluation:
        snapshot, policy, shapes, plan = view.snapshot, view.policy, view.shapes, view.plan
        if not reuse:  # explain: afresh, with every scorer's part
            return evaluate(snapshot, demand, rows, policy, shapes, score=score, components=True, plan=plan)
        if may_borrow(demand, policy.overcommit):  # borrowed placements are ranked against each other
            return evaluate(snapshot, demand, rows, policy, shapes, score=score, plan=plan)
        evaluation = self._reusable(view).evaluate(
            demand,
            rows,
            snapshot.row_version,
            snapshot.generation,
            lambda redo, scored: evaluate(snapshot, demand, redo, policy, shapes, score=scored, plan=plan),
            score,
        )
        return gate_model_loads(snapshot, demand, policy, evaluation)  # fleet-wide: not in per-node results

    def _reusable(self, view: ModelView) -> EvaluationCache:
        """The per-row results for this node set, policy, typical shapes and plan (started afresh when one
        changes)."""
        basis = (view.snapshot.index, view.policy, view.shapes, view.plan)
        if not all(a is b for a, b in zip(basis, self._reuse_basis, strict=True)):
            self.evaluations.reset(view.snapshot.size)
            self._reuse_basis = basis
        return self.evaluations

    def filter(self, pod: Mapping[str, Any], names: list[str]) -> FilterOutcome:
        uid = pod_uid(pod)
        self.model.release_assumed(uid)  # a retried pod: what it held must not count against it
        # A shortlist is chosen by score: then feasibility and scores are evaluated in one pass. The view is read
        # once, so a reload in between cannot ask for a shortlist of an evaluation made without scores.
        view = self.model.view()
        limit = view.policy.extender_scoring.shortlist
        decision = self._evaluate(pod, names, score=limit > 0, view=view)
        outcome = _outcome(decision, name_failures=not limit or not decision.evaluation.feasible.any())
        if limit and len(outcome.passed) > limit:
            outcome = self._shortlist(decision, outcome, limit)
        if not outcome.passed:
            outcome = self._pass_nominated(pod, uid, view, outcome)
        if len(outcome.passed) == 1 and outcome.decision is not None and outcome.decision.scored:
            # kube-scheduler binds a lone node without asking prioritize: hold its placement until bind
            # (`assumeBest`) before answering, so no filter answered meanwhile (binds run on other connections
            # while the scheduler moves on) can give the same room to another pod.
            part = outcome.decision.feasible_part(outcome.passed)
            self._hold_best(uid, view.policy, assign(view.snapshot, part.demand, part.evaluation, 0, view.plan))
        return outcome

    def _pass_nominated(
        self, pod: Mapping[str, Any], uid: str, view: ModelView, outcome: FilterOutcome
    ) -> FilterOutcome:
        """Pass the node a preemptor is nominated to when it fits there once the victims granted to it are gone.

        kube-scheduler deletes the victims and tries the pod again as soon as it sees them deleted; our watch may
        see it milliseconds later. Refused then, the pod waits for another event that may not come for minutes
        (preempt does not grant it new victims, see `Evictions`). Passed, it is bound, and bind decides on the
        view of that moment: a failed bind is retried within a second."""
        node = _nominated_node(pod)
        if not node or (node not in outcome.failed and node not in outcome.unresolvable):
            return outcome
        victims = self.evictions.granted(uid, node)
        snapshot = view.snapshot
        if victims is None or node not in snapshot.index:
            return outcome
        on_node = {k: a for k, a in self.model.assignments().items() if a.node == node and k != uid}
        inventory = snapshot.inventories[snapshot.index[node]]
        if not self._fits_without(view, inventory, on_node, [v for v in victims if v in on_node], self.demand(pod)):
            return outcome
        failed = {n: r for n, r in outcome.failed.items() if n != node}
        unresolvable = {n: r for n, r in outcome.unresolvable.items() if n != node}
        return replace(outcome, passed=[node], failed=failed, unresolvable=unresolvable, decision=None)

    def _shortlist(self, decision: _Decision, outcome: FilterOutcome, limit: int) -> FilterOutcome:
        """Let through only the `limit` best-scored feasible nodes, best first.

        The other nodes are left out of the answer, feasible or not (`_outcome`): kube-scheduler gives a node an
        extender leaves out the status unschedulable-and-unresolvable, as listing it would, and is spared decoding
        thousands of entries per pod. A pod that fits nowhere never gets here: it gets every node's reason."""
        assert decision.scored  # a shortlisting filter scores as it evaluates
        at = decision.evaluation.shortlist(limit)
        kept = decision.part(at, [decision.known[i] for i in at.tolist()])
        return replace(outcome, passed=kept.names, decision=kept, shortlisted=True)

    def after_filter(self, pod: Mapping[str, Any], outcome: FilterOutcome) -> None:
        """What filter's answer need not wait for, done right after it is sent: the scheduling loop waits on the
        answer, and this overlaps what the scheduler does next.

        The rejections are logged (a write the answer should not wait for). Several nodes passed: kube-scheduler
        asks prioritize about exactly those next, so their answer is scored ahead (a lone node's placement is held
        by filter itself, before it answers)."""
        if outcome.reasons:
            meta = pod.get("metadata") or {}
            log.info(
                "rejected nodes",
                extra={"pod": f"{meta.get('namespace')}/{meta.get('name')}", "reasons": dict(outcome.reasons)},
            )
        decision = outcome.decision
        if decision is not None and len(outcome.passed) > 1:
            self._score(pod_uid(pod), decision.feasible_part(outcome.passed))

    def prioritize(self, pod: Mapping[str, Any], names: list[str]) -> list[tuple[str, int]]:
        """Scores 0..10 for `names`: the answer computed ahead when nothing it depends on has changed since,
        else a fresh one; the placement on the node scored 10 is held until bind asks for it, before answering
        (as for a lone node at filter)."""
        self._check_ready()
        demand = self.demand(pod)
        uid = pod_uid(pod)
        self.model.release_assumed(uid)
        view = self.model.view()
        entry = self.score_cache.get(uid)
        if entry is not None and entry.still_valid(view, demand, names):
            self.score_cache.hits += 1
        else:
            self.score_cache.misses += 1
            entry = self._score(uid, self._fresh(demand, view, names))
        if entry.planned is not None:
            self._hold_best(uid, entry.policy, entry.planned)
        return list(entry.answer)

    def _hold_best(self, uid: str, policy: PlacementPolicy, placement: Assignment) -> None:
        """Hold the recommended placement until bind asks for it, as kube-scheduler assumes a pod (`assumeBest`)."""
        if policy.extender_scoring.assume_best:
            self.model.assume(uid, placement)

    def _score(self, uid: str, decision: _Decision) -> _Cached:
        """Prioritize's answer for a decision, and the placement on its best node; remembered for the pod."""
        evaluation = self._scored(decision)
        view = decision.view
        scores = extender_scores(evaluation, view.policy.extender_scoring.mode)
        answer = (*zip(decision.known, scores.tolist(), strict=True), *((name, 0) for name in decision.unknown))
        rows = evaluation.rows if not decision.unknown else np.empty(0, dtype=np.int64)
        best = evaluation.best()
        planned = assign(view.snapshot, decision.demand, evaluation, best, view.plan) if best is not None else None
        entry = _Cached(
            view.snapshot.generation,
            view.policy,
            view.shapes,
            view.plan,
            decision.demand,
            decision.names,
            rows,
            answer,
            planned,
            int(evaluation.rows[best]) if best is not None else -1,
        )
        self.score_cache.put(uid, entry)
        return entry

    def _scored(self, decision: _Decision) -> Evaluation:
        """The decision's evaluation with scores (computed now if the decision was made without them)."""
        if decision.scored:
            return decision.evaluation
        return self._evaluation(decision.view, decision.demand, decision.evaluation.rows, score=True)

    def explain(self, pod: Mapping[str, Any], names: list[str] | None = None) -> list[dict[str, Any]]:
        """Why each node would or would not take the pod: reason, raw score, each scorer's part, placement."""
        view = self.model.view()  # every node of the snapshot the pod is then decided on
        names = list(view.snapshot.names) if names is None else names
        decision = self._evaluate(pod, names, reuse=False, view=view)  # with every scorer's part
        evaluation = decision.evaluation
        scores = extender_scores(evaluation, view.policy.extender_scoring.mode)
        out: list[dict[str, Any]] = []
        order: dict[str, tuple[bool, float, int]] = {}  # best first, ties as `Evaluation.best` breaks them
        for i, name in enumerate(decision.known):
            entry: dict[str, Any] = {
                "node": name,
                "fits": bool(evaluation.feasible[i]),
                "reason": REASON_TEXT[Reason(int(evaluation.reasons[i]))],
                "score": int(scores[i]),
            }
            if evaluation.feasible[i]:
                entry["raw"] = float(evaluation.scores[i])
                entry["components"] = {k: float(v[i]) for k, v in evaluation.components.items()}
                entry["placement"] = _describe(assign(view.snapshot, decision.demand, evaluation, i, view.plan))
            order[name] = (not entry["fits"], -entry.get("raw", 0.0), int(evaluation.rows[i]))
            out.append(entry)
        out.sort(key=lambda e: order[e["node"]])
        out.extend({"node": name, "fits": False, "reason": UNKNOWN_NODE, "score": 0} for name in decision.unknown)
        return out

    # -- bind --------------------------------------------------------------------------------------------
    def bind(self, namespace: str, name: str, uid: str, node: str) -> Assignment:
        """Choose concrete GPUs on `node`, hold them, annotate the pod and create the Binding. Idempotent."""
        if not self.model.ready:
            raise BindError("the GPU extender's cluster view is not ready yet")
        key = uid or f"{namespace}/{name}"
        assignment, taken = self._hold(key, namespace, name, uid, node)
        snapshot = self.model.snapshot()
        inventory = snapshot.inventories[snapshot.index[node]]
        try:
            self.binder.bind(namespace, name, uid, node, assignment_annotations(assignment, inventory))
        except Exception as exc:
            if taken:
                self.model.unreserve(key)
            raise BindError(f"binding {namespace}/{name} to {node} failed: {exc}") from exc
        if taken:
            self.recent_bindings.record(assignment)
            if self._confirm_on_bind:
                self.model.pod_bound(key, assignment, self._demands.get(uid) or Demand())
        return assignment

    def _hold(self, key: str, namespace: str, name: str, uid: str, node: str) -> tuple[Assignment, bool]:
        """The GPUs the pod gets on `node`, held in the model, and whether this call took hold of them (a failed
        binding then gives them back; a retried bind writes the same decision again)."""
        assumed = self.model.take_assumed(key, node)
        if assumed is not None:
            self.score_cache.planned_hits += 1
            return assumed, True
        existing = self.model.assignment_of(key)
        if existing is not None:
            if existing.node != node:
                raise BindError(f"pod {namespace}/{name} already holds GPUs on {existing.node}, not {node}")
            return existing, False
        assignment = self._decide(namespace, name, uid, node)
        try:
            self.model.reserve(key, assignment)
        except ConflictError as exc:
            raise BindError(f"capacity on {node} changed before binding: {exc}") from exc
        return assignment, True

    def _decide(self, namespace: str, name: str, uid: str, node: str) -> Assignment:
        demand = self._demands.get(uid)
        if demand is None:  # we restarted since filter, or another replica filtered: read the pod
            demand = self.demand(self.binder.get_pod(namespace, name))
        view = self.model.view()
        entry = self.score_cache.get(uid)
        planned = entry.placement_on(node, view, demand) if entry is not None else None
        if planned is not None:
            self.score_cache.planned_hits += 1
            return planned
        try:
            assignment, reason = place_on_node(view.snapshot, demand, node, view.policy, view.shapes, view.plan)
        except KeyError:
            raise BindError(f"{UNKNOWN_NODE}: {node}") from None
        if assignment is None:
            raise BindError(f"pod {namespace}/{name} no longer fits on {node}: {REASON_TEXT[reason]}")
        return assignment

    # -- preempt -----------------------------------------------------------------------------------------
    def preempt(self, pod: Mapping[str, Any], candidates: Mapping[str, list[str]]) -> dict[str, list[str]]:
        """Keep the nodes where evicting the proposed victims really frees what the pod needs on one GPU set,
        and drop victims whose GPUs the pod would not use. Victims unknown to us are kept (the scheduler chose
        them for CPU or memory). A node where the pod fits with no victim at all is dropped, not answered with
        none: kube-scheduler fails the whole preemption on a node without victims ("expected at least one
        victim pod"), and the pod fits there on its next attempt anyway. So does a pod already nominated to a node
        that holds it once the victims granted there are gone (`Evictions`)."""
        if not self.model.ready:
            raise NotReadyError("the GPU extender's cluster view is not ready yet")
        demand = self.demand(pod)
        view = self.model.view()
        snapshot = view.snapshot
        assignments = self.model.assignments()
        uid = pod_uid(pod)
        assignments.pop(uid, None)  # what the pod itself holds is no obstacle to it
        nominated = _nominated_node(pod)
        earlier = self.evictions.granted(uid, nominated) if nominated in snapshot.index else None
        if earlier is not None:
            on_node = {k: a for k, a in assignments.items() if a.node == nominated}
            inventory = snapshot.inventories[snapshot.index[nominated]]
            if self._fits_without(view, inventory, on_node, [v for v in earlier if v in on_node], demand):
                log.info("preemption already under way", extra={"pod": uid, "node": nominated})
                return {}
        result: dict[str, list[str]] = {}
        for node, victims in candidates.items():
            if node not in snapshot.index:
                continue
            on_node = {k: a for k, a in assignments.items() if a.node == node}
            known = [v for v in victims if v in on_node]
            if not self._fits_without(view, snapshot.inventories[snapshot.index[node]], on_node, known, demand):
                continue
            needed = list(known)
            for victim in known:  # greedily spare victims the pod does not need gone
                trial = [v for v in needed if v != victim]
                if self._fits_without(view, snapshot.inventories[snapshot.index[node]], on_node, trial, demand):
                    needed = trial
            kept = [v for v in victims if v not in on_node or v in needed]
            if kept:
                result[node] = kept
        if result:
            self.evictions.grant(uid, result)
        return result

    def _fits_without(
        self,
        view: ModelView,
        inventory: NodeInventory,
        on_node: dict[str, Assignment],
        evicted: list[str],
        demand: Demand,
    ) -> bool:
        state = ClusterState([inventory])
        for key, assignment in on_node.items():
            if key not in evicted:
                state.apply(key, assignment)
        evaluation = evaluate(state.view(), demand, np.array([0]), view.policy, view.shapes, score=False)
        return bool(evaluation.feasible[0])


def _outcome(decision: _Decision, name_failures: bool = True) -> FilterOutcome:
    """Filter's verdicts, grouped by reason with whole-array operations (a Python step per node cost more than
    the decision itself). Without `name_failures`, rejected nodes are counted by reason but not listed: a
    shortlisting filter that passes a node leaves the rest out, and kube-scheduler binds the node it passed
    without looking at why the others failed."""
    known, evaluation = decision.known, decision.evaluation
    outcome = FilterOutcome(passed=list(compress(known, evaluation.feasible.tolist())), decision=decision)
    counts = np.bincount(evaluation.reasons)
    for code in np.flatnonzero(counts).tolist():
        if code == FITS:
            continue
        text, resolvable = _VERDICTS[code]
        outcome.reasons[text] += int(counts[code])
        if name_failures:
            (outcome.failed if resolvable else outcome.unresolvable).update(
                dict.fromkeys(compress(known, (evaluation.reasons == code).tolist()), text)
            )
    if decision.unknown:
        outcome.reasons[UNKNOWN_NODE] += len(decision.unknown)
        if name_failures:
            outcome.unresolvable.update(dict.fromkeys(decision.unknown, UNKNOWN_NODE))
    return outcome


def _describe(a: Assignment) -> dict[str, Any]:
    out: dict[str, Any] = {"gpus": list(a.gpus), "milli": a.milli}
    if a.mig is not None:
        out["mig"] = {"gpu": a.mig.gpu, "profile": a.mig.profile, "start": a.mig.start}
    return out
