"""The cluster as numpy columns: a mutable `ClusterState` and the immutable `ClusterSnapshot` it publishes.

Decisions read a snapshot only. The live model and the simulator both mutate a `ClusterState` through
`apply`/`release`, which are also the one place that refuses a double booking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from policies.inventory import MILLI_PER_GPU, Assignment, NodeInventory
from policies.mig import MIG_TABLES

MAX_GPUS_DEFAULT = 8
# The ledger's ceiling on borrowed shares per GPU, whatever the policy says: four extra full shares.
MAX_BORROWED_MILLI = 4 * MILLI_PER_GPU


class ConflictError(Exception):
    """An assignment asks for capacity that is no longer free (someone else took it first)."""


@dataclass(frozen=True, eq=False)
class ClusterSnapshot:
    """A consistent, read-only view of every node. Row i of each array is node `names[i]`."""

    generation: int
    names: tuple[str, ...]
    index: Mapping[str, int]
    inventories: tuple[NodeInventory, ...]
    models: tuple[str, ...]
    model_id: np.ndarray  # int16 [N], -1 for a node without GPUs
    cpu_total: np.ndarray  # int64 [N] milli-CPU
    mem_total: np.ndarray  # int64 [N] MiB
    cpu_free: np.ndarray
    mem_free: np.ndarray
    gpu_present: np.ndarray  # bool [N, G]: a GPU usable whole or shared (not in MIG mode)
    gpu_free: np.ndarray  # int32 [N, G] milli-GPU free; 0 where no usable GPU
    gpu_mem_total: np.ndarray  # int32 [N, G] MiB
    gpu_mem_free: np.ndarray  # int32 [N, G] MiB
    gpu_util: np.ndarray  # float32 [N, G] measured busy fraction 0..1, NaN where unknown
    gpu_mem_free_measured: np.ndarray  # float32 [N, G] MiB measured free, NaN where unknown
    gpu_borrowed: np.ndarray  # int32 [N, G] milli-GPU of shares running on borrowed idle capacity
    gpu_guarded: np.ndarray  # int16 [N, G] tenants whose latency class forbids borrowing on the GPU
    gpu_declared_busy: np.ndarray  # float32 [N, G] sum of the tenants' expected busy fractions
    mig_table: np.ndarray  # int8 [N, G] index into MIG_TABLE_NAMES, -1 where the GPU is not in MIG mode
    mig_occupied: np.ndarray  # uint8 [N, G] bitmask of memory slices held by pods
    serving_starting: np.ndarray  # int16 [N] serving replicas still loading (herd control)
    # int64 [N]: the generation at which each row last changed, so a result computed over some rows can tell
    # whether it still holds (a rebuilt node set renews every row).
    row_version: np.ndarray
    # Fixed until the node set changes, computed once per build: what per-node scores compare nodes by.
    node_gpus: np.ndarray  # int16 [N] GPUs of each node, in MIG mode or not
    largest_node_cpu: int  # milli-CPU of the largest node (at least 1)
    largest_node_gpu_milli: int  # milli-GPU of the node with the most whole or shared GPUs (at least one GPU's)
    # GPUs whose MIG instances already exist (a static layout): (row, gpu) -> ((profile, start), ...). A pod can
    # only take one of these; GPUs not listed here are carved on demand.
    mig_layout: Mapping[tuple[int, int], tuple[tuple[str, int], ...]] = field(default_factory=dict)
    # Serving replicas by (served model, row, GPU): which planned slots are filled (`policies.plan_targets`).
    model_replicas: Mapping[tuple[str, int, int], int] = field(default_factory=dict)
    # Served model -> its replicas loading (bound, not Ready) anywhere in the fleet: herd control per model.
    model_loading: Mapping[str, int] = field(default_factory=dict)
    # Served model -> bool [N]: the node has the model's weights on its disk (fixed until the node set changes).
    cached_on: Mapping[str, np.ndarray] = field(default_factory=dict)
    ready: bool = True

    @property
    def size(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Row indices of known names (in the order given), and the names this snapshot does not know."""
        found = list(map(self.index.get, names))
        if None not in found:
            return np.array(found, dtype=np.int64), []
        known = [i for i in found if i is not None]
        return np.array(known, dtype=np.int64), [n for n, i in zip(names, found, strict=True) if i is None]

    def gpu_capacity_milli(self) -> int:
        return int(self.gpu_present.sum()) * MILLI_PER_GPU

    def gpu_allocated_milli(self) -> int:
        return self.gpu_capacity_milli() - int(self.gpu_free.sum())


MIG_TABLE_NAMES: tuple[str, ...] = tuple(MIG_TABLES)


def _read_only_copy(column: np.ndarray) -> np.ndarray:
    copy = column.copy()
    copy.flags.writeable = False
    return copy


class ClusterState:
    """Mutable columns plus the assignments that produced them. Not thread-safe: one writer owns it."""

    def __init__(self, nodes: Iterable[NodeInventory] = (), max_gpus: int = MAX_GPUS_DEFAULT) -> None:
        self._max_gpus = max_gpus
        self._generation = 0
        self.assignments: dict[str, Assignment] = {}
        self._model_replicas: dict[tuple[str, int, int], int] = {}
        self._model_loading: dict[str, int] = {}
        self._replicas_published = False  # a snapshot holds the two model counts: copy them before the next change
        self._build(list(nodes))

    # -- construction ------------------------------------------------------------------------------------
    def _build(self, nodes: list[NodeInventory]) -> None:
        n = len(nodes)
        g = max([self._max_gpus, *(len(node.gpus) for node in nodes)])
        # Fixed until the next build, so every snapshot shares them instead of copying.
        self._names = tuple(node.name for node in nodes)
        self._inventories = tuple(nodes)
        self._index = {node.name: i for i, node in enumerate(nodes)}
        models = sorted({gpu.model for node in nodes for gpu in node.gpus})
        model_pos = {m: i for i, m in enumerate(models)}
        self._models = tuple(models)
        self.model_id = np.full(n, -1, dtype=np.int16)
        self.cpu_total = np.zeros(n, dtype=np.int64)
        self.mem_total = np.zeros(n, dtype=np.int64)
        self.gpu_present = np.zeros((n, g), dtype=bool)
        self.gpu_mem_total = np.zeros((n, g), dtype=np.int32)
        self.mig_table = np.full((n, g), -1, dtype=np.int8)
        self._mig_layout: dict[tuple[int, int], tuple[tuple[str, int], ...]] = {}
        for i, node in enumerate(nodes):
            self.cpu_total[i] = node.cpu_milli
            self.mem_total[i] = node.memory_mib
            if node.gpus:
                self.model_id[i] = model_pos[node.gpu_model]
            for gpu in node.gpus:
                self.gpu_mem_total[i, gpu.index] = gpu.memory_mib
                if gpu.mig_table:
                    self.mig_table[i, gpu.index] = MIG_TABLE_NAMES.index(gpu.mig_table)
                    if gpu.mig_instances:
                        self._mig_layout[i, gpu.index] = tuple((m.profile, m.start) for m in gpu.mig_instances)
                else:
                    self.gpu_present[i, gpu.index] = True
        self.cpu_free = self.cpu_total.copy()
        self.mem_free = self.mem_total.copy()
        self.gpu_free = np.where(self.gpu_present, MILLI_PER_GPU, 0).astype(np.int32)
        self.gpu_mem_free = np.where(self.gpu_present, self.gpu_mem_total, 0).astype(np.int32)
        self.gpu_util = np.full((n, g), np.nan, dtype=np.float32)
        self.gpu_mem_free_measured = np.full((n, g), np.nan, dtype=np.float32)
        self.node_gpus = (self.gpu_present | (self.mig_table >= 0)).sum(axis=1).astype(np.int16)
        self.largest_node_cpu = max(int(self.cpu_total.max(initial=1)), 1)
        self.largest_node_gpu_milli = max(int(self.gpu_present.sum(axis=1).max(initial=1)), 1) * MILLI_PER_GPU
        # Replaced, never edited, until the next build (telemetry replaces `gpu_util` whole): snapshots share them.
        shared = (
            self.model_id,
            self.cpu_total,
            self.mem_total,
            self.gpu_present,
            self.gpu_mem_total,
            self.mig_table,
            self.node_gpus,
        )
        for array in (*shared, self.gpu_util, self.gpu_mem_free_measured):
            array.flags.writeable = False
        self.gpu_borrowed = np.zeros((n, g), dtype=np.int32)
        self.gpu_guarded = np.zeros((n, g), dtype=np.int16)
        self.gpu_declared_busy = np.zeros((n, g), dtype=np.float32)
        self.mig_occupied = np.zeros((n, g), dtype=np.uint8)
        self.serving_starting = np.zeros(n, dtype=np.int16)
        self._model_replicas = {}
        self._model_loading = {}
        self._replicas_published = False
        cached_on: dict[str, np.ndarray] = {}
        for i, node in enumerate(nodes):
            for name in node.cached_models:
                cached_on.setdefault(name, np.zeros(n, dtype=bool))[i] = True
        for column in cached_on.values():
            column.flags.writeable = False
        self._cached_on = MappingProxyType(cached_on)
        self._generation += 1
        self.row_version = np.full(n, self._generation, dtype=np.int64)

    def set_nodes(self, nodes: Iterable[NodeInventory]) -> list[str]:
        """Replace the node set, keeping assignments on nodes that still exist. Returns the pod keys dropped."""
        previous = self.assignments
        self.assignments = {}
        self._build(list(nodes))
        dropped = []
        for key, assignment in previous.items():
            try:
                self.apply(key, assignment)
            except (ConflictError, KeyError):
                dropped.append(key)
        return dropped

    # -- mutation ----------------------------------------------------------------------------------------
    def apply(self, key: str, assignment: Assignment) -> None:
        """Record that pod `key` holds `assignment`. Idempotent for the same assignment; refuses overbooking."""
        existing = self.assignments.get(key)
        if existing is not None:
            if existing == assignment:
                return
            raise ConflictError(f"pod {key} already holds resources on {existing.node}")
        i = self._index.get(assignment.node)
        if i is None:
            raise KeyError(f"unknown node {assignment.node}")
        self._check_free(i, assignment)
        self._change(i, assignment, sign=-1)
        self.assignments[key] = assignment
        self._generation += 1
        self.row_version[i] = self._generation

    def row_of(self, node: str) -> int | None:
        return self._index.get(node)

    def loading(self, model: str) -> int:
        """The model's replicas loading (bound, not Ready) in the fleet."""
        return self._model_loading.get(model, 0)

    def release(self, key: str) -> Assignment | None:
        assignment = self.assignments.pop(key, None)
        if assignment is not None:
            i = self._index.get(assignment.node)
            self._generation += 1
            if i is not None:
                self._change(i, assignment, sign=+1)
                self.row_version[i] = self._generation
        return assignment

    def set_utilization(self, util: np.ndarray, memory_free_mib: np.ndarray | None = None) -> None:
        """Replace measured GPU busy fractions and, when given, measured free GPU memory ([N, G], NaN = unknown;
        without it, free memory becomes unknown everywhere)."""
        self.gpu_util = util.astype(np.float32, copy=True)
        self.gpu_util.flags.writeable = False
        if memory_free_mib is None:
            memory_free_mib = np.full(util.shape, np.nan)
        self.gpu_mem_free_measured = memory_free_mib.astype(np.float32, copy=True)
        self.gpu_mem_free_measured.flags.writeable = False
        self._generation += 1
        self.row_version[:] = self._generation

    def _check_free(self, i: int, a: Assignment) -> None:
        gpus = list(a.gpus)
        if a.cpu_milli > self.cpu_free[i] or a.memory_mib > self.mem_free[i]:
            raise ConflictError(f"node {a.node} has too little CPU or memory left")
        for g in gpus:
            if g >= self.gpu_present.shape[1] or not self.gpu_present[i, g]:
                raise ConflictError(f"node {a.node} has no shareable GPU {g}")
            if a.borrowed and self.gpu_guarded[i, g]:
                raise ConflictError(f"GPU {g} on {a.node} runs a pod that forbids borrowing on its GPU")
            if a.guarded and self.gpu_borrowed[i, g]:
                raise ConflictError(f"GPU {g} on {a.node} runs borrowed shares; this pod may not share with them")
            if a.borrowed:
                if self.gpu_borrowed[i, g] + a.milli > MAX_BORROWED_MILLI:
                    raise ConflictError(f"GPU {g} on {a.node} already carries {self.gpu_borrowed[i, g]} milli borrowed")
            elif self.gpu_free[i, g] < a.milli:
                raise ConflictError(f"GPU {g} on {a.node} has {self.gpu_free[i, g]} milli free, {a.milli} asked")
            if a.gpu_memory_mib and self.gpu_mem_free[i, g] < a.gpu_memory_mib:
                raise ConflictError(f"GPU {g} on {a.node} has too little memory free")
        if a.mig is not None:
            table_idx = self.mig_table[i, a.mig.gpu]
            if table_idx < 0:
                raise ConflictError(f"GPU {a.mig.gpu} on {a.node} is not in MIG mode")
            profile = MIG_TABLES[MIG_TABLE_NAMES[table_idx]].profile(a.mig.profile)
            if profile is None or a.mig.start not in profile.starts:
                raise ConflictError(f"MIG {a.mig.profile} at slot {a.mig.start} is invalid on {a.node}")
            layout = self._mig_layout.get((i, a.mig.gpu))
            if layout is not None and (a.mig.profile, a.mig.start) not in layout:
                raise ConflictError(f"no MIG instance {a.mig.profile}@{a.mig.start} exists on {a.node}")
            if int(self.mig_occupied[i, a.mig.gpu]) & profile.mask_at(a.mig.start):
                raise ConflictError(f"MIG slices of {a.mig.profile}@{a.mig.start} on {a.node} are taken")

    def _change(self, i: int, a: Assignment, sign: int) -> None:
        self.cpu_free[i] += sign * a.cpu_milli
        self.mem_free[i] += sign * a.memory_mib
        for g in a.gpus:
            if a.borrowed:
                self.gpu_borrowed[i, g] -= sign * a.milli
            else:
                self.gpu_free[i, g] += sign * a.milli
            self.gpu_mem_free[i, g] += sign * a.gpu_memory_mib
            if a.guarded:
                self.gpu_guarded[i, g] -= sign
            self.gpu_declared_busy[i, g] -= sign * a.expected_busy
        if a.mig is not None:
            profile = MIG_TABLES[MIG_TABLE_NAMES[self.mig_table[i, a.mig.gpu]]].profile(a.mig.profile)
            assert profile is not None
            self.mig_occupied[i, a.mig.gpu] ^= profile.mask_at(a.mig.start)
        if a.model:
            self._count_replica(a, i, -sign)

    def _count_replica(self, a: Assignment, i: int, change: int) -> None:
        """Keep the served-model count of each GPU the replica holds and, while it loads, of its node and its
        model fleet-wide; published snapshots keep their copy."""
        assert a.model is not None
        if self._replicas_published:
            self._model_replicas, self._model_loading = dict(self._model_replicas), dict(self._model_loading)
            self._replicas_published = False
        for g in (a.mig.gpu,) if a.mig is not None else a.gpus:
            _bump(self._model_replicas, (a.model, i, g), change)
        if a.starting:
            self.serving_starting[i] += change
            _bump(self._model_loading, a.model, change)

    # -- publication -------------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._generation

    @property
    def nodes(self) -> list[NodeInventory]:
        return list(self._inventories)

    def view(self) -> ClusterSnapshot:
        """A snapshot that shares this state's arrays: for a single-threaded caller (the simulator)."""
        return self._as_snapshot(lambda column: column)

    def snapshot(self) -> ClusterSnapshot:
        """An independent read-only copy, safe to hand to concurrent request handlers. Columns that only a new node
        set or new telemetry replace (never edit in place) are shared, read-only; the rest are copied."""
        return self._as_snapshot(_read_only_copy)

    def _as_snapshot(self, edited: Callable[[np.ndarray], np.ndarray]) -> ClusterSnapshot:
        """The state as a snapshot; `edited` turns each column that `apply`/`release` edit in place into what the
        snapshot holds of it."""
        return ClusterSnapshot(
            generation=self._generation,
            names=self._names,
            index=self._index,
            inventories=self._inventories,
            models=self._models,
            model_id=self.model_id,
            cpu_total=self.cpu_total,
            mem_total=self.mem_total,
            cpu_free=edited(self.cpu_free),
            mem_free=edited(self.mem_free),
            gpu_present=self.gpu_present,
            gpu_free=edited(self.gpu_free),
            gpu_mem_total=self.gpu_mem_total,
            gpu_mem_free=edited(self.gpu_mem_free),
            gpu_util=self.gpu_util,
            gpu_mem_free_measured=self.gpu_mem_free_measured,
            gpu_borrowed=edited(self.gpu_borrowed),
            gpu_guarded=edited(self.gpu_guarded),
            gpu_declared_busy=edited(self.gpu_declared_busy),
            mig_table=self.mig_table,
            mig_occupied=edited(self.mig_occupied),
            serving_starting=edited(self.serving_starting),
            row_version=edited(self.row_version),
            node_gpus=self.node_gpus,
            largest_node_cpu=self.largest_node_cpu,
            largest_node_gpu_milli=self.largest_node_gpu_milli,
            mig_layout=MappingProxyType(self._mig_layout),
            model_replicas=self._replicas_for_snapshot(),
            model_loading=MappingProxyType(self._model_loading),
            cached_on=self._cached_on,
        )

    def _replicas_for_snapshot(self) -> Mapping[tuple[str, int, int], int]:
        """The model counts, read-only: the next change copies them first, so a snapshot's counts never move."""
        self._replicas_published = True
        return MappingProxyType(self._model_replicas)


def _bump(counts: dict[Any, int], key: Any, change: int) -> None:
    """Add `change` to a count, dropping it at zero (a mapping of what is there, not of everything ever seen)."""
    count = counts.get(key, 0) + change
    if count:
        counts[key] = count
    else:
        counts.pop(key, None)
