"""The cluster model every verb reads: one writer mutates a `ClusterState`, readers get immutable snapshots.

Feeders (the API-server watches, or a static fleet file) call the mutators; request handlers call `view()`, which
returns the last published snapshot, policy and typical shapes together, without taking a lock. Reservations hold
capacity between our decision and the moment the watch shows the bound pod, so two pods never get the same GPU
share: from bind, or already from prioritize (an assumption, as kube-scheduler assumes a pod before binding it) for
the node we scored best.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from policies.config import PlacementPolicy
from policies.demand import Demand, DemandKind, Shape
from policies.engine import place_on_node
from policies.fragmentation import TypicalShapes, typical_shapes_of
from policies.inventory import Assignment, NodeInventory
from policies.plan_targets import PlanTargets
from policies.state import ClusterSnapshot, ClusterState, ConflictError

__all__ = ["ClusterModel", "ConflictError", "ModelView", "Reservation"]


@dataclass(frozen=True)
class ModelView:
    """What one decision is made from, published as one object: a policy reload, a new shape mix or a new
    co-location plan can never pair with a snapshot or with each other halfway through a decision."""

    snapshot: ClusterSnapshot
    policy: PlacementPolicy
    shapes: TypicalShapes
    plan: PlanTargets | None = None


@dataclass(frozen=True)
class Reservation:
    assignment: Assignment
    expires_at: float
    assumed: bool = False  # held since prioritize; bind has not asked for it yet


class ClusterModel:
    """Thread-safe owner of the cluster state. Mutations are short and never do I/O under the lock."""

    def __init__(self, policy: PlacementPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._state = ClusterState()
        self._clock = clock
        self._reservations: dict[str, Reservation] = {}
        # (expires_at, tie, key, reservation), earliest first; an entry whose reservation was dropped or renewed
        # since is skipped when it comes up, so expiring costs nothing while nothing is due.
        self._expiry: list[tuple[float, int, str, Reservation]] = []
        self._tie = itertools.count()
        self._observed: dict[str, Demand] = {}  # bound pods' demands, for the typical-shape mix
        self._observed_shapes: Counter[Shape] = Counter()  # their shapes, kept as pods come and go
        self._guessed: dict[str, Demand] = {}  # pods bound without our record, whose GPUs we chose ourselves
        self._ready = False
        self._view = ModelView(self._state.snapshot(), policy, self._compute_shapes(policy))

    # -- readers (lock-free) -----------------------------------------------------------------------------
    def view(self) -> ModelView:
        return self._view

    def snapshot(self) -> ClusterSnapshot:
        return self._view.snapshot

    def shapes(self) -> TypicalShapes:
        return self._view.shapes

    @property
    def policy(self) -> PlacementPolicy:
        return self._view.policy

    @property
    def ready(self) -> bool:
        return self._ready

    def assignment_of(self, key: str) -> Assignment | None:
        return self._state.assignments.get(key)

    def assignments(self) -> dict[str, Assignment]:
        """A copy of every held assignment (bound or reserved), keyed by pod UID."""
        with self._lock:
            return dict(self._state.assignments)

    # -- feeders -----------------------------------------------------------------------------------------
    def mark_ready(self, ready: bool = True) -> None:
        self._ready = ready

    def set_policy(self, policy: PlacementPolicy) -> None:
        with self._lock:
            self._view = replace(self._view, policy=policy, shapes=self._compute_shapes(policy))

    def set_plan(self, plan: PlanTargets | None) -> None:
        """Publish the co-location plan's slots (None: no plan, serving pods placed like any other)."""
        with self._lock:
            self._view = replace(self._view, plan=plan)

    def replace_nodes(self, nodes: Iterable[NodeInventory]) -> list[str]:
        """Swap in a new node set; returns keys of pods whose assignments no longer fit (node gone or shrunk)."""
        with self._lock:
            dropped = self._state.set_nodes(nodes)
            for key in dropped:
                self._reservations.pop(key, None)
            self._publish()
            return dropped

    def replace_pods(self, bound: dict[str, tuple[Assignment, Demand]]) -> list[str]:
        """Reset every bound pod at once (after a full list). Returns keys that could not be applied."""
        with self._lock:
            for key in list(self._state.assignments):
                if key not in self._reservations:
                    self._forget(key)
            failed = self._apply_all_bound(bound)
            self._view = replace(self._view, shapes=self._compute_shapes(self.policy))
            self._publish()
            return failed

    def pod_bound(self, key: str, assignment: Assignment, demand: Demand) -> bool:
        """The watch saw a bound pod. Confirms our reservation or records someone else's binding."""
        with self._lock:
            ok = self._apply_bound(key, assignment, demand)
            self._publish()
            return ok

    def apply_pod_events(self, bound: dict[str, tuple[Assignment, Demand]], gone: list[str]) -> list[str]:
        """A batch of watch events under one lock and one publication: releases first, so capacity freed in the
        batch is free for the bindings that follow. Returns the keys of bindings that could not be applied."""
        with self._lock:
            for key in gone:
                self._forget(key)
            failed = self._apply_all_bound(bound)
            self._publish()
            return failed

    def pod_gone(self, key: str) -> None:
        with self._lock:
            if self._forget(key):
                self._publish()

    def set_utilization(self, util, memory_free_mib=None) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self._state.set_utilization(util, memory_free_mib)
            self._publish()

    # -- bind-time reservations --------------------------------------------------------------------------
    def reserve(self, key: str, assignment: Assignment) -> None:
        """Hold `assignment` for pod `key`; raises ConflictError when the capacity is no longer free."""
        with self._lock:
            self._expire_locked()
            self._check_cold_loads(assignment)
            self._state.apply(key, assignment)
            self._hold_locked(key, assignment)
            self._publish()

    def assume(self, key: str, assignment: Assignment) -> bool:
        """Hold the placement prioritize (or a filter that shortlists one node) recommends until bind asks for it.
        Holds nothing and returns False when the pod already holds capacity or this capacity has been taken
        meanwhile."""
        with self._lock:
            self._expire_locked()
            if key in self._state.assignments:
                return False
            try:
                self._check_cold_loads(assignment)
                self._state.apply(key, assignment)
            except (ConflictError, KeyError):
                return False
            self._hold_locked(key, assignment, assumed=True)
            self._publish()
            return True

    def release_assumed(self, key: str) -> None:
        """Give back what an earlier prioritize held for a pod now being decided again, which must not count
        against itself."""
        held = self._reservations.get(key)  # most pods hold nothing: no lock for them
        if held is None or not held.assumed:
            return
        with self._lock:
            held = self._reservations.get(key)
            if held is not None and held.assumed:
                self._give_back_locked(key)

    def take_assumed(self, key: str, node: str) -> Assignment | None:
        """Bind asks for `node`: an assumption there becomes the bind's reservation without touching the state (so
        answers scored since stay valid) and is returned; one on another node is given back."""
        with self._lock:
            held = self._reservations.get(key)
            if held is None or not held.assumed:
                return None
            if held.assignment.node == node:
                self._hold_locked(key, held.assignment)
                return held.assignment
            self._give_back_locked(key)
            return None

    def unreserve(self, key: str) -> None:
        """Give back a reservation whose binding failed."""
        with self._lock:
            self._give_back_locked(key)

    def _check_cold_loads(self, assignment: Assignment) -> None:
        """Herd control, checked again where capacity is taken: a decision made from a snapshot that predates
        another pod's hold (its answer was still being written when this pod was asked about) must not add a load
        beyond `coldLoads`. Raises ConflictError, as for capacity taken meanwhile."""
        limits = self.policy.cold_loads
        model = assignment.model
        if not (assignment.starting and model):
            return
        row = self._state.row_of(assignment.node)
        if limits.max_per_node and row is not None and int(self._state.serving_starting[row]) >= limits.max_per_node:
            raise ConflictError(f"{limits.max_per_node} serving replica(s) already loading on {assignment.node}")
        if limits.max_per_model and self._state.loading(model) >= limits.max_per_model:
            raise ConflictError(f"{limits.max_per_model} replica(s) of {model} already loading")

    def _hold_locked(self, key: str, assignment: Assignment, assumed: bool = False) -> None:
        """Record the reservation of capacity already applied to the state, with its timeout."""
        spec = self.policy.reservations
        ttl = spec.assumed_ttl_seconds if assumed else spec.ttl_seconds
        held = self._reservations[key] = Reservation(assignment, self._clock() + ttl, assumed)
        heapq.heappush(self._expiry, (held.expires_at, next(self._tie), key, held))

    def _give_back_locked(self, key: str) -> None:
        """Drop a reservation and free its capacity (nothing when the pod holds none)."""
        if self._reservations.pop(key, None) is not None:
            self._state.release(key)
            self._publish()

    def refresh_shapes(self) -> None:
        """Re-learn the typical pod shapes from the pods bound now (cheap; call every few seconds). Unchanged
        shapes keep their object, so answers and evaluations that depend on them stay reusable."""
        with self._lock:
            shapes = self._compute_shapes(self.policy)
            if not shapes.same_as(self._view.shapes):
                self._view = replace(self._view, shapes=shapes)

    def expire_reservations(self) -> list[str]:
        with self._lock:
            expired = self._expire_locked()
            if expired:
                self._publish()
            return expired

    def reservation_count(self) -> int:
        return len(self._reservations)

    # -- internals ---------------------------------------------------------------------------------------
    def _forget(self, key: str) -> bool:
        """Drop every trace of a pod; True if it held resources."""
        self._reservations.pop(key, None)
        self._observe(key, None)
        self._guessed.pop(key, None)
        return self._state.release(key) is not None

    def _apply_all_bound(self, bound: dict[str, tuple[Assignment, Demand]]) -> list[str]:
        """Pods whose GPUs are recorded first: a guess for an unrecorded pod must not take their GPUs."""
        order = sorted(bound.items(), key=lambda item: _gpus_unplaced(*item[1]))
        return [key for key, (a, d) in order if not self._apply_bound(key, a, d)]

    def _apply_bound(self, key: str, assignment: Assignment, demand: Demand) -> bool:
        if demand.model_name and assignment.model is None:
            assignment = replace(assignment, model=demand.model_name)  # the record of a bound pod has no label
        self._reservations.pop(key, None)
        self._observe(key, demand)
        current = self._state.assignments.get(key)
        if current == assignment and current.starting == assignment.starting:
            return True
        if current is not None:
            if _gpus_unplaced(assignment, demand) and current.node == assignment.node:
                return True  # keep the placement we chose for it earlier
            self._state.release(key)
        unplaced = _gpus_unplaced(assignment, demand)
        try:
            if unplaced:
                assignment = self._place_unannotated(assignment, demand)
                self._guessed[key] = demand
            self._state.apply(key, assignment)
        except ConflictError:
            if unplaced:  # no room left to guess: count what we know it holds
                self._state.apply(key, replace(assignment, gpus=(), milli=0, mig=None))
                return True
            return self._make_room_for(key, assignment)
        except (KeyError, ValueError):
            return False
        return True

    def _make_room_for(self, key: str, assignment: Assignment) -> bool:
        """A recorded assignment collides with GPUs we only guessed for unrecorded pods: the record wins and the
        guesses move elsewhere on their node."""
        moved = [k for k in self._guessed if (a := self._state.assignments.get(k)) and a.node == assignment.node]
        if not moved:
            return False
        held = {k: self._state.release(k) for k in moved}
        try:
            self._state.apply(key, assignment)
            ok = True
        except ConflictError:
            ok = False
        for k, previous in held.items():
            assert previous is not None
            self._apply_bound(k, replace(previous, gpus=(), milli=0, mig=None), self._guessed.pop(k))
        return ok

    def _place_unannotated(self, assignment: Assignment, demand: Demand) -> Assignment:
        """A pod bound without our assignment record (another scheduler placed it) still holds GPUs: we do not
        know which, so we charge the ones our own policy would have picked. The count is what matters."""
        placed, _ = place_on_node(self._state.view(), demand, assignment.node, self.policy, self.shapes())
        if placed is None:
            raise ConflictError(f"no room left on {assignment.node} for a pod placed there by someone else")
        return placed

    def _expire_locked(self) -> list[str]:
        now, due, expired = self._clock(), self._expiry, []
        while due and due[0][0] <= now:
            _, _, key, held = heapq.heappop(due)
            if self._reservations.get(key) is held:
                del self._reservations[key]
                self._state.release(key)
                expired.append(key)
        return expired

    def _observe(self, key: str, demand: Demand | None) -> None:
        """Record (or with None, forget) a bound pod's demand for the typical-shape mix."""
        previous = self._observed.pop(key, None)
        if previous is not None:
            shape = previous.shape
            self._observed_shapes[shape] -= 1
            if not self._observed_shapes[shape]:
                del self._observed_shapes[shape]
        if demand is not None:
            self._observed[key] = demand
            self._observed_shapes[demand.shape] += 1

    def _compute_shapes(self, policy: PlacementPolicy) -> TypicalShapes:
        """The learnt mix once enough pods are bound, else the policy's default. Costs the number of distinct
        shapes, not of pods: it runs every few seconds under the lock, with tens of thousands of pods bound."""
        spec = policy.typical_shapes
        if spec.learn_from_cluster and len(self._observed) >= spec.min_observed_pods:
            return typical_shapes_of(self._observed_shapes, spec.coverage)
        weighted: Counter[Shape] = Counter()
        for shape in spec.default:
            weighted[shape.demand().shape] += max(1, round(shape.weight * 1000))
        return typical_shapes_of(weighted, coverage=1.0)

    def _publish(self) -> None:
        """Swap in a new snapshot if the state changed (every change bumps its generation)."""
        view = self._view
        if self._state.generation != view.snapshot.generation:
            self._view = ModelView(self._state.snapshot(), view.policy, view.shapes, view.plan)


def _gpus_unplaced(assignment: Assignment, demand: Demand) -> bool:
    return demand.kind is not DemandKind.NONE and not assignment.gpus and assignment.mig is None
