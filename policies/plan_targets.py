"""Where the co-location plan wants each model's replicas, in the form the scorers read.

The planner (`policies.colocation`) decides slots: a model's replica on a GPU, a MIG slice of it, or a share.
Serving pods carry their model's name (`gpu-extender.io/model`); a pod scores its model's planned slots that are
not yet filled above every other placement, so replicas that scale up land where the plan packed them. What is
filled is read from the snapshot (`ClusterSnapshot.model_replicas`): a row's planned-and-open slots depend only on
that row's state, as every scorer's terms must.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from policies.state import ClusterSnapshot

__all__ = ["PlanTargets", "PlannedSlot"]


@dataclass(frozen=True)
class PlannedSlot:
    """One planned replica: a model on a GPU of a node (whole, shared, or on a MIG instance of that GPU)."""

    model: str
    node: str
    gpu: int


@dataclass(frozen=True, eq=False)
class PlanTargets:
    """The planned replica count of each model per (node, GPU), fixed once built; compared by identity, as a new
    plan is a new object."""

    counts: Mapping[str, Mapping[tuple[str, int], int]]
    version: int = 0  # the plan's publication number, for logs and explanations
    # model -> (the node index it was resolved against, rows, GPUs, counts)
    _positions: dict[str, tuple[Mapping[str, int], np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def of(cls, slots: Iterable[PlannedSlot], version: int = 0) -> PlanTargets:
        per_model: dict[str, Counter[tuple[str, int]]] = {}
        for slot in slots:
            per_model.setdefault(slot.model, Counter())[slot.node, slot.gpu] += 1
        frozen = {model: MappingProxyType(dict(c)) for model, c in per_model.items()}
        return cls(MappingProxyType(frozen), version)

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self.counts)

    def planned(self, model: str) -> int:
        return sum(self.counts.get(model, {}).values())

    def open_slots(self, snapshot: ClusterSnapshot, rows: np.ndarray, model: str | None) -> np.ndarray:
        """int [R, G]: the model's planned replicas on each GPU of `rows` less those running or held there now
        (never below 0); all zero for a model the plan does not place."""
        width = snapshot.gpu_present.shape[1]
        if model is None or model not in self.counts:
            return np.zeros((len(rows), width), dtype=np.int32)
        at_row, at_gpu, planned = self._planned_positions(snapshot, model)
        full = np.zeros((snapshot.size, width), dtype=np.int32)
        filled = snapshot.model_replicas
        running = np.array([filled.get((model, int(r), int(g)), 0) for r, g in zip(at_row, at_gpu, strict=True)])
        full[at_row, at_gpu] = np.maximum(planned - running, 0)
        return full[rows]

    def _planned_positions(self, snapshot: ClusterSnapshot, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's planned (row, GPU, count) on this node set; remembered until the node set (its index) changes."""
        found = self._positions.get(model)
        if found is None or found[0] is not snapshot.index:
            rows, gpus, counts = [], [], []
            width = snapshot.gpu_present.shape[1]
            for (node, gpu), count in self.counts[model].items():
                row = snapshot.index.get(node)
                if row is not None and gpu < width:  # a node gone since the plan was made holds no slot
                    rows.append(row)
                    gpus.append(gpu)
                    counts.append(count)
            arrays = np.array(rows, dtype=np.int64), np.array(gpus, dtype=np.int64), np.array(counts, dtype=np.int32)
            found = self._positions[model] = (snapshot.index, *arrays)
        return found[1], found[2], found[3]
