"""Hard fit: can a pod go on a node at all, and if not, why (and could evicting pods change that)."""

from __future__ import annotations

from enum import IntEnum
from functools import lru_cache

import numpy as np

from policies.config import Overcommit
from policies.demand import Demand, DemandKind, model_allowed
from policies.mig import MIG_TABLES, free_starts
from policies.state import MIG_TABLE_NAMES, ClusterSnapshot


class Reason(IntEnum):
    """Why a node was rejected. Order matters only for reporting; 0 means the pod fits."""

    FITS = 0
    NO_GPU = 1
    GPU_MODEL = 2
    TOO_FEW_GPUS = 3
    NO_MIG_PROFILE = 4
    GPU_MEMORY_TOO_SMALL = 5
    COLD_LOADS = 9  # transient, but evicting pods would not end it
    MODEL_LOADS = 8
    CPU = 10
    MEMORY = 11
    GPUS_BUSY = 12
    NO_GPU_SHARE = 13
    MIG_SLICES_BUSY = 14


# Rejections below this value cannot be cured by evicting pods: the node lacks the hardware.
_RESOLVABLE_FROM = Reason.CPU

REASON_TEXT: dict[Reason, str] = {
    Reason.FITS: "fits",
    Reason.NO_GPU: "node has no GPU usable by this pod",
    Reason.GPU_MODEL: "GPU model not allowed by the pod",
    Reason.TOO_FEW_GPUS: "node has fewer GPUs than requested",
    Reason.NO_MIG_PROFILE: "no MIG-enabled GPU on the node supports the requested profile",
    Reason.GPU_MEMORY_TOO_SMALL: "GPU memory smaller than requested",
    Reason.COLD_LOADS: "serving replicas still loading on the node reach the policy's limit (coldLoads.maxPerNode)",
    Reason.MODEL_LOADS: "replicas of this model still loading reach the policy's limit (coldLoads.maxPerModel)",
    Reason.CPU: "insufficient CPU",
    Reason.MEMORY: "insufficient memory",
    Reason.GPUS_BUSY: "not enough fully free GPUs",
    Reason.NO_GPU_SHARE: "no single GPU has the requested share free",
    Reason.MIG_SLICES_BUSY: "no free MIG slices for the requested profile",
}


FITS = int(Reason.FITS)
"""`Reason.FITS` as a plain int: numpy compares an enum member through slow attribute lookups on every call."""


def is_resolvable(reason: Reason) -> bool:
    """Whether preemption could make the node fit (the node has the hardware, others hold it)."""
    return reason >= _RESOLVABLE_FROM


def model_mask(snapshot: ClusterSnapshot, demand: Demand) -> np.ndarray:
    """bool [M + 1]: which GPU models (last entry: no GPU) the demand accepts (read-only)."""
    return _model_mask(snapshot.models, demand.allowed_models)


@lru_cache(maxsize=256)
def _model_mask(models: tuple[str, ...], allowed: frozenset[str]) -> np.ndarray:
    mask = np.array([*(model_allowed(m, allowed) for m in models), False], dtype=bool)
    mask.flags.writeable = False
    return mask


def mig_starts(snapshot: ClusterSnapshot, row: int, gpu: int, profile: str) -> list[int]:
    """Start slots where an instance of `profile` can go now: a free existing instance on a GPU with a static
    layout, else any free slot the placement rules allow."""
    table = snapshot.mig_table[row, gpu]
    spec = MIG_TABLES[MIG_TABLE_NAMES[table]].profile(profile) if table >= 0 else None
    if spec is None:
        return []
    occupied = int(snapshot.mig_occupied[row, gpu])
    layout = snapshot.mig_layout.get((row, gpu))
    if layout is None:
        return free_starts(spec, occupied)
    return [start for name, start in layout if name == profile and not spec.mask_at(start) & occupied]


def mig_slots(snapshot: ClusterSnapshot, rows: np.ndarray, profile: str) -> tuple[np.ndarray, np.ndarray]:
    """For each (row, GPU): whether the GPU can host `profile` at all, and whether it can host one now."""
    tables = snapshot.mig_table[rows]
    occupied = snapshot.mig_occupied[rows]
    known = np.zeros(tables.shape, dtype=bool)
    free = np.zeros(tables.shape, dtype=bool)
    for t, name in enumerate(MIG_TABLE_NAMES):
        p = MIG_TABLES[name].profile(profile)
        if p is None:
            continue
        on_table = tables == t
        known |= on_table
        has_room = np.zeros(tables.shape, dtype=bool)
        for start in p.starts:
            has_room |= (occupied & p.mask_at(start)) == 0
        free |= on_table & has_room
    if snapshot.mig_layout:
        position = {int(r): i for i, r in enumerate(rows)}
        for (row, gpu), layout in snapshot.mig_layout.items():
            i = position.get(row)
            if i is not None:
                known[i, gpu] = any(name == profile for name, _ in layout)
                free[i, gpu] = bool(mig_starts(snapshot, row, gpu, profile))
    return known, free


def feasibility(snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand) -> np.ndarray:
    """Reason per row (uint8), `Reason.FITS` where the pod can be placed now.

    Checks are ordered so the reported reason is the most permanent one: hardware before capacity.
    """
    checks: list[tuple[np.ndarray, Reason]] = []  # (rows failing, why), most permanent first
    kind = demand.kind
    if kind is DemandKind.WHOLE or kind is DemandKind.SHARE:
        present = snapshot.gpu_present[rows]
        gpus = present.sum(axis=1)
        checks.append((gpus == 0, Reason.NO_GPU))
        checks.append((~model_mask(snapshot, demand)[snapshot.model_id[rows]], Reason.GPU_MODEL))
        checks.append((gpus < demand.gpu_count, Reason.TOO_FEW_GPUS))
        if demand.gpu_memory_mib:
            big_enough = present & (snapshot.gpu_mem_total[rows] >= demand.gpu_memory_mib)
            checks.append((big_enough.sum(axis=1) < demand.gpu_count, Reason.GPU_MEMORY_TOO_SMALL))
    elif kind is DemandKind.MIG:
        assert demand.mig_profile is not None
        known, free = mig_slots(snapshot, rows, demand.mig_profile)
        checks.append((~known.any(axis=1), Reason.NO_MIG_PROFILE))
        checks.append((~model_mask(snapshot, demand)[snapshot.model_id[rows]], Reason.GPU_MODEL))

    checks.append((snapshot.cpu_free[rows] < demand.cpu_milli, Reason.CPU))
    checks.append((snapshot.mem_free[rows] < demand.memory_mib, Reason.MEMORY))

    if kind is DemandKind.WHOLE or kind is DemandKind.SHARE:
        usable = usable_gpus(snapshot, rows, demand)
        reason = Reason.GPUS_BUSY if kind is DemandKind.WHOLE else Reason.NO_GPU_SHARE
        checks.append((usable.sum(axis=1) < demand.gpu_count, reason))
    elif kind is DemandKind.MIG:
        checks.append((~free.any(axis=1), Reason.MIG_SLICES_BUSY))
    return _first_failed(checks, len(rows))


def _first_failed(checks: list[tuple[np.ndarray, Reason]], n: int) -> np.ndarray:
    """Per row, the reason of the first check it fails, `Reason.FITS` where it passes them all."""
    failed = np.array([*(mask for mask, _ in checks), np.ones(n, dtype=bool)])  # the last row: passed every check
    codes = np.array([*(int(reason) for _, reason in checks), FITS], dtype=np.uint8)
    return codes[failed.argmax(axis=0)]  # argmax finds the first True


def gpu_memory_room(snapshot: ClusterSnapshot, rows: np.ndarray, need_mib: int) -> np.ndarray:
    """bool [R, G]: GPUs with `need_mib` of memory free, both by what their tenants declared and, where telemetry
    has a fresh reading, by what is measured free: a tenant that declared nothing, or an inference server that
    took most of the memory up front, leaves less than the declarations say."""
    room = snapshot.gpu_mem_free[rows] >= need_mib
    with np.errstate(invalid="ignore"):
        return room & ~(snapshot.gpu_mem_free_measured[rows] < need_mib)  # NaN (not measured) compares False


def usable_gpus(snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand) -> np.ndarray:
    """bool [R, G]: GPUs with room for one unit of the demand (a whole GPU, or its share and memory).

    Borrowed shares take allocation as it frees up: once their lender leaves, the capacity they run on is no
    longer idle, so it is not offered to new pods as free."""
    usable = snapshot.gpu_free[rows] - snapshot.gpu_borrowed[rows] >= demand.gpu_milli
    if demand.gpu_memory_mib:
        usable &= gpu_memory_room(snapshot, rows, demand.gpu_memory_mib)
    if demand.guards_gpu:
        usable &= snapshot.gpu_borrowed[rows] == 0
    return usable & snapshot.gpu_present[rows]


def may_borrow(demand: Demand, overcommit: Overcommit) -> bool:
    """Whether the pod may run on borrowed idle capacity at all (see `Overcommit`)."""
    return (
        overcommit.enabled
        and demand.gpu_count == 1
        and demand.shares_gpu
        and not demand.guards_gpu
        and demand.gpu_memory_mib > 0  # memory is never lent, so it must be declared
        and demand.gpu_milli <= overcommit.max_borrowed_milli_per_gpu
    )


def lender_busy(snapshot: ClusterSnapshot, rows: np.ndarray, overcommit: Overcommit) -> np.ndarray:
    """float [R, G]: the busy fraction a GPU is judged by when it lends: measured, but no less than the policy's
    part of what its tenants declare (see `Overcommit`). NaN where nothing was measured."""
    return np.maximum(snapshot.gpu_util[rows], overcommit.declared_busy * snapshot.gpu_declared_busy[rows])


def borrowable_gpus(snapshot: ClusterSnapshot, rows: np.ndarray, demand: Demand, overcommit: Overcommit) -> np.ndarray:
    """bool [R, G]: GPUs that can lend measured idle capacity to the demand's share. Unknown load lends nothing."""
    with np.errstate(invalid="ignore"):
        idle_enough = lender_busy(snapshot, rows, overcommit) + demand.busy_estimate <= 1.0 - overcommit.safety_margin
    return (
        snapshot.gpu_present[rows]
        & idle_enough
        & (snapshot.gpu_guarded[rows] == 0)
        # Shares placed on the GPU, allocated and borrowed, may exceed it by at most the policy's limit.
        & (
            snapshot.gpu_borrowed[rows] - snapshot.gpu_free[rows] + demand.gpu_milli
            <= overcommit.max_borrowed_milli_per_gpu
        )
        & gpu_memory_room(snapshot, rows, demand.gpu_memory_mib)
    )
