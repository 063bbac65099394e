"""GPU fragmentation as defined by FGD (Weng et al., USENIX ATC'23), vectorised over nodes and candidate GPUs.

For one typical pod shape, a node's fragment is the idle GPU capacity that shape could not use: all of it when the
shape cannot be placed on the node at all (or asks no GPU), otherwise only the GPUs whose leftover is smaller than
the shape's per-GPU request. A node's fragmentation is the popularity-weighted sum over the typical shapes.
Placing a pod well means increasing it as little as possible.

FGD's shapes are CPU, GPUs and GPU model; ours add the pod's memory, so a node whose memory runs out before its GPUs
counts them as stranded (`typical_shapes(..., memory=False)` gives FGD's definition).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from policies.demand import Demand, Shape, model_allowed
from policies.mig_demand import MigMix
from policies.state import ClusterSnapshot


@dataclass(frozen=True, eq=False)
class TypicalShapes:
    """The pod shapes that usually arrive, with their popularity (weights sum to 1)."""

    cpu_milli: np.ndarray  # int64 [S]
    memory_mib: np.ndarray  # int64 [S], 0 where memory is not part of the shape
    gpu_count: np.ndarray  # int64 [S]
    gpu_milli: np.ndarray  # int64 [S], 0 for CPU-only shapes
    allowed_models: tuple[frozenset[str], ...]
    weight: np.ndarray  # float64 [S]
    _model_ok_cache: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict, repr=False)
    # The MIG profiles asked for lately; when present, MIG slice fit values what they keep placeable by it.
    mig_mix: MigMix | None = None

    @property
    def size(self) -> int:
        return len(self.weight)

    @cached_property
    def cpu_per_gpu_milli(self) -> float:
        """milli-CPU the typical GPU pods ask per milli-GPU, popularity-weighted (0 without GPU shapes)."""
        gpu = self.gpu_milli > 0
        asked = float((self.weight * self.gpu_count * self.gpu_milli)[gpu].sum())
        return float((self.weight * self.cpu_milli)[gpu].sum()) / asked if asked else 0.0

    def same_as(self, other: TypicalShapes) -> bool:
        """The same shapes with the same weights (whatever object holds them)."""
        return (
            self.allowed_models == other.allowed_models
            and self.mig_mix == other.mig_mix
            and all(
                np.array_equal(getattr(self, name), getattr(other, name))
                for name in ("cpu_milli", "memory_mib", "gpu_count", "gpu_milli", "weight")
            )
        )

    def model_ok(self, snapshot: ClusterSnapshot) -> np.ndarray:
        """bool [M + 1, S]: whether nodes of each model (last row: no GPU) may host each shape."""
        cached = self._model_ok_cache.get(snapshot.models)
        if cached is None:
            table = np.zeros((len(snapshot.models) + 1, self.size), dtype=bool)
            for s, allowed in enumerate(self.allowed_models):
                for m, model in enumerate(snapshot.models):
                    table[m, s] = model_allowed(model, allowed)
            self._model_ok_cache[snapshot.models] = cached = table
        return cached


def typical_shapes(demands: Iterable[Demand], coverage: float = 0.95, memory: bool = True) -> TypicalShapes:
    """The most frequent shapes that together cover `coverage` of the pods, weights renormalised.

    CPU-only shapes are included: they consume the CPU that GPU pods need, which strands GPUs too. Without
    `memory`, pods that differ only in memory count as one shape, as FGD defines them.
    """
    return typical_shapes_of(Counter(d.shape for d in demands), coverage, memory)


def typical_shapes_of(counts: Counter[Shape], coverage: float = 0.95, memory: bool = True) -> TypicalShapes:
    """`typical_shapes` from pod counts per shape (`Demand.shape`), for a caller that keeps them up to date."""
    if not counts:
        raise ValueError("typical shapes need at least one pod")
    if not memory:
        merged: Counter[Shape] = Counter()
        for shape, count in counts.items():
            merged[shape._replace(memory_mib=0)] += count
        counts = merged
    total = sum(counts.values())
    chosen, covered = [], 0
    for shape, count in counts.most_common():
        if covered >= coverage * total:
            break
        chosen.append((shape, count))
        covered += count
    weights = np.array([c for _, c in chosen], dtype=np.float64)
    return TypicalShapes(
        cpu_milli=np.array([s.cpu_milli for s, _ in chosen], dtype=np.int64),
        memory_mib=np.array([s.memory_mib for s, _ in chosen], dtype=np.int64),
        gpu_count=np.array([s.gpu_count for s, _ in chosen], dtype=np.int64),
        gpu_milli=np.array([s.gpu_milli for s, _ in chosen], dtype=np.int64),
        allowed_models=tuple(s.allowed_models for s, _ in chosen),
        weight=weights / weights.sum(),
    )


def _frag_terms(free: np.ndarray, shapes: TypicalShapes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (node, shape): GPUs the shape fits on, idle milli on GPUs too small for it, and total idle milli."""
    ge = free[:, :, None] >= shapes.gpu_milli[None, None, :]  # [R, G, S]
    count = ge.sum(axis=1)  # [R, S]
    below = np.where(ge, 0, free[:, :, None]).sum(axis=1)  # [R, S]
    idle = free.sum(axis=1)  # [R]
    return count, below, idle


def _combine(
    count: np.ndarray,
    below: np.ndarray,
    idle: np.ndarray,
    cpu_free: np.ndarray,
    mem_free: np.ndarray,
    accessible: np.ndarray,
    shapes: TypicalShapes,
) -> np.ndarray:
    """Weighted fragmentation from the per-shape terms; broadcasts over any leading candidate axes."""
    fits = (count >= shapes.gpu_count) & accessible & (shapes.gpu_milli > 0)
    fits &= (cpu_free[..., None] >= shapes.cpu_milli) & (mem_free[..., None] >= shapes.memory_mib)
    frag = np.where(fits, below, idle[..., None])
    # An elementwise product summed along the last axis gives each node the same bits whatever the batch it is
    # evaluated in (a matrix product may not), so identical nodes tie exactly.
    return (frag * shapes.weight).sum(axis=-1)


def _accessible(snapshot: ClusterSnapshot, rows: np.ndarray, shapes: TypicalShapes) -> np.ndarray:
    return shapes.model_ok(snapshot)[snapshot.model_id[rows]]  # -1 (no GPU) picks the last row


def node_fragmentation(snapshot: ClusterSnapshot, rows: np.ndarray, shapes: TypicalShapes) -> np.ndarray:
    """Expected fragmented GPU capacity (milli-GPU) of each node in `rows` for the typical shapes."""
    accessible = _accessible(snapshot, rows, shapes)
    count, below, idle = _frag_terms(snapshot.gpu_free[rows], shapes)
    return _combine(count, below, idle, snapshot.cpu_free[rows], snapshot.mem_free[rows], accessible, shapes)


def _node_terms(snapshot: ClusterSnapshot, rows: np.ndarray, shapes: TypicalShapes):
    free = snapshot.gpu_free[rows].astype(np.int64)
    accessible = _accessible(snapshot, rows, shapes)
    count, below, idle = _frag_terms(free, shapes)
    return free, accessible, count, below, idle


def _after(snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, shapes: TypicalShapes, terms) -> np.ndarray:
    free, accessible, count, below, idle = terms
    cpu_after = snapshot.cpu_free[rows] - demand.cpu_milli
    mem_after = snapshot.mem_free[rows] - demand.memory_mib
    m = shapes.gpu_milli
    if demand.gpu_count == 0 or demand.mig_profile:
        return _combine(count, below, idle, cpu_after, mem_after, accessible, shapes)[:, None]
    if demand.gpu_milli >= 1000:
        taken = demand.gpu_count * 1000
        # Full GPUs fit every shape (m <= 1000), so each one taken lowers every shape's count by one.
        result = _combine(count - demand.gpu_count, below, idle - taken, cpu_after, mem_after, accessible, shapes)
        return result[:, None]
    # A share on GPU j changes only GPU j's terms.
    before = free[:, :, None]  # [R, G, 1]
    after = before - demand.gpu_milli
    count_j = count[:, None, :] - (before >= m) + (after >= m)  # [R, G, S]
    below_j = below[:, None, :] - np.where(before < m, before, 0) + np.where(after < m, after, 0)
    idle_j = (idle - demand.gpu_milli)[:, None]  # [R, 1]: the same whichever GPU takes the share
    frag = _combine(count_j, below_j, idle_j, cpu_after[:, None], mem_after[:, None], accessible[:, None, :], shapes)
    return np.where(free >= demand.gpu_milli, frag, np.inf)


def fragmentation_after(
    snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, shapes: TypicalShapes
) -> np.ndarray:
    """Fragmentation of each node after hypothetically placing `demand` there.

    Returns float [R, G] for a GPU share (one column per GPU it could go to; inf where it does not fit) and
    float [R, 1] otherwise (whole GPUs take the lowest-index free GPUs, which never changes which GPUs are
    partly used, so only counts and idle capacity move).
    """
    return _after(snapshot, rows, demand, shapes, _node_terms(snapshot, rows, shapes))


# Below this many rows, finding identical ones costs more than it saves. Half-full, the openb fleet's feasible rows
# for a GPU share fall into a few dozen states at most: from 128 rows on, a share's evaluation takes 20-38 % less
# time, a whole GPU's about the same.
DEDUPLICATE_FROM = 128


def fragmentation_delta(
    snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, shapes: TypicalShapes
) -> np.ndarray:
    """How much each candidate placement increases fragmentation ([R, G] or [R, 1], milli-GPU).

    Large fleets hold many nodes in the same state; each distinct state is evaluated once.
    """
    if len(rows) >= DEDUPLICATE_FROM:
        first, inverse = _distinct_states(snapshot, rows, demand, shapes)
        if len(first) < len(rows):
            return _delta(snapshot, rows[first], demand, shapes)[inverse]
    return _delta(snapshot, rows, demand, shapes)


def _distinct_states(
    snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, shapes: TypicalShapes
) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose fragmentation terms are identical: same model, same free milli on every GPU, and CPU and memory
    on the same side of every shape's request before and after the placement (they enter only through those
    comparisons). Returns the index of one row per state and, for every row, its state."""
    sides = []
    for free, asked, requests in (
        (snapshot.cpu_free[rows], demand.cpu_milli, shapes.cpu_milli),
        (snapshot.mem_free[rows], demand.memory_mib, shapes.memory_mib),
    ):
        thresholds = np.sort(requests)
        sides += [np.searchsorted(thresholds, left, side="right") for left in (free, free - asked)]
    key = np.column_stack((snapshot.model_id[rows].astype(np.int64), snapshot.gpu_free[rows].astype(np.int64), *sides))
    packed = np.ascontiguousarray(key).view(np.dtype((np.void, key.dtype.itemsize * key.shape[1]))).ravel()
    _, first, inverse = np.unique(packed, return_index=True, return_inverse=True)
    return first, inverse.ravel()


def _delta(snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, shapes: TypicalShapes) -> np.ndarray:
    terms = _node_terms(snapshot, rows, shapes)  # the per-GPU terms do not depend on CPU or memory: shared by both
    _, accessible, count, below, idle = terms
    before = _combine(count, below, idle, snapshot.cpu_free[rows], snapshot.mem_free[rows], accessible, shapes)
    return _after(snapshot, rows, demand, shapes, terms) - before[:, None]


def _unfed(gpu_free_milli: np.ndarray, cpu_free_milli: np.ndarray, cpu_per_gpu_milli: float) -> np.ndarray:
    return np.maximum(gpu_free_milli - cpu_free_milli / cpu_per_gpu_milli, 0.0)


def cpu_stranding(snapshot: ClusterSnapshot, rows: np.ndarray, shapes: TypicalShapes) -> np.ndarray:
    """float [R]: the idle GPU capacity (milli-GPU) of each node that its free CPU cannot feed, at the CPU per GPU
    the typical GPU pods ask (`TypicalShapes.cpu_per_gpu_milli`)."""
    ratio = shapes.cpu_per_gpu_milli
    if not ratio:
        return np.zeros(len(rows))
    return _unfed(snapshot.gpu_free[rows].sum(axis=1), snapshot.cpu_free[rows], ratio)


def cpu_stranding_delta(
    snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, shapes: TypicalShapes
) -> np.ndarray:
    """float [R]: how much placing `demand` on each node changes its `cpu_stranding` (milli-GPU).

    FGD asks whether one typical pod still fits a node. A node can pass that test pod after pod and still run out
    of CPU with GPUs idle, when the pods it takes ask more CPU per GPU than it has: a placement that takes more
    than its share of the node's CPU strands the GPUs that remain, one that takes less leaves CPU for them."""
    ratio = shapes.cpu_per_gpu_milli
    if not ratio:
        return np.zeros(len(rows))
    free = snapshot.gpu_free[rows].sum(axis=1)
    cpu = snapshot.cpu_free[rows]
    taken = 0 if demand.mig_profile else demand.gpu_milli_total
    return _unfed(free - taken, cpu - demand.cpu_milli, ratio) - _unfed(free, cpu, ratio)


FGD_POINTS = 100  # FGD answers as a kube-scheduler score plugin does: 0..100


def fragmentation_points(delta_milli: np.ndarray) -> np.ndarray:
    """FGD's score for a fragmentation change: 100 × sigmoid(−Δ in GPUs), truncated to an integer."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.trunc(FGD_POINTS / (1.0 + np.exp(delta_milli / 1000)))
