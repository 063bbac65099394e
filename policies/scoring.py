"""Soft preferences among feasible placements. Each scorer returns [R, C] values, higher is better, or [R, 1]
when a node's value is the same for all its columns (the caller broadcasts it).

Columns are the candidate placements on a node: one per GPU for a GPU share or a MIG instance (the pod goes on
that GPU), a single column otherwise. Invalid columns are masked by the caller.

A row's score may depend only on that row's own state, the demand and the typical shapes. Evaluations are kept
per row and only rows that changed are scored again (`policies.reuse`, the simulator's replay), so a term that
reads the whole fleet (how many GPUs have some free size, say) would be stale on every row not touched since.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from policies.demand import Demand, DemandKind
from policies.feasibility import mig_slots, mig_starts, usable_gpus
from policies.fragmentation import (
    FGD_POINTS,
    TypicalShapes,
    cpu_stranding_delta,
    fragmentation_delta,
    fragmentation_points,
)
from policies.inventory import MILLI_PER_GPU
from policies.mig import MIG_TABLES, MigProfile, learnt_placement_loss, placement_loss
from policies.mig_demand import MigMix
from policies.plan_targets import PlanTargets
from policies.state import MIG_TABLE_NAMES, ClusterSnapshot


@dataclass
class Candidates:
    """The feasible rows of one decision and which placement columns are valid on each."""

    snapshot: ClusterSnapshot
    rows: np.ndarray
    demand: Demand
    shapes: TypicalShapes
    plan: PlanTargets | None = None

    @cached_property
    def per_gpu(self) -> bool:
        return self.demand.kind in (DemandKind.SHARE, DemandKind.MIG)

    @cached_property
    def valid(self) -> np.ndarray:
        """bool [R, C]."""
        if self.demand.kind is DemandKind.SHARE:
            return usable_gpus(self.snapshot, self.rows, self.demand)
        if self.demand.kind is DemandKind.MIG:
            assert self.demand.mig_profile is not None
            return mig_slots(self.snapshot, self.rows, self.demand.mig_profile)[1]
        return np.ones((len(self.rows), 1), dtype=bool)

    @cached_property
    def mig_choice(self) -> tuple[np.ndarray, np.ndarray]:
        """For a MIG demand: per (row, GPU) the least-loss start slot and its loss (inf where none)."""
        shape = self.valid.shape
        starts = np.full(shape, -1, dtype=np.int16)
        losses = np.full(shape, np.inf)
        if self.demand.kind is not DemandKind.MIG:
            return starts, losses
        name = self.demand.mig_profile or ""
        mix = self.shapes.mig_mix
        for r, g in zip(*np.nonzero(self.valid), strict=True):
            row = int(self.rows[r])
            table = MIG_TABLE_NAMES[self.snapshot.mig_table[row, g]]
            profile = MIG_TABLES[table].profile(name)
            assert profile is not None
            occ = int(self.snapshot.mig_occupied[row, g])
            slots = tuple(mig_starts(self.snapshot, row, g, name))
            losses[r, g], starts[r, g] = _least_loss(table, occ, profile, slots, mix)
        return starts, losses


@lru_cache(maxsize=1 << 16)
def _least_loss(
    table: str, occupied: int, profile: MigProfile, slots: tuple[int, ...], mix: MigMix | None
) -> tuple[float, int]:
    """The least-loss start slot among `slots` and its loss (ties to the lowest slot); the same few GPU states
    recur, and a learnt mix is kept to the percent (`MigMix.of`), so most decisions are looked up."""
    if mix is None:
        return min((placement_loss(table, occupied, profile, s), s) for s in slots)
    return min((learnt_placement_loss(table, occupied, profile, s, mix), s) for s in slots)


def _fragmentation_change(c: Candidates, cpu_stranding: float) -> np.ndarray:
    """milli-GPU: FGD's fragmentation change, plus `cpu_stranding` times the change in GPU capacity the node's CPU
    can no longer feed (`cpu_stranding_delta`), which FGD's one-pod-at-a-time test does not see coming.

    Replayed on the five openb pod lists (10 seeds, shipped profile, 130 % arrived), counting the stranding at 1
    raised the GPU allocation by 0.21 to 0.41 points in kube-scheduler mode, 0.14 to 0.32 with pods the node
    sample turned away tried once more, and 0.29 to 0.49 with every node in view, in each of the 150 paired runs
    but one; the partly used GPUs left idle on nodes out of CPU fell to about a quarter (multigpu30)."""
    delta = fragmentation_delta(c.snapshot, c.rows, c.demand, c.shapes)
    if cpu_stranding:
        delta = delta + cpu_stranding * cpu_stranding_delta(c.snapshot, c.rows, c.demand, c.shapes)[:, None]
    return delta


def fragmentation_score(c: Candidates, cpu_stranding: float = 0.0) -> np.ndarray:
    """Minus the fragmentation a placement adds, in GPUs (FGD's criterion), exactly."""
    if c.demand.kind is DemandKind.MIG:
        return np.zeros(c.valid.shape)
    return -_fragmentation_change(c, cpu_stranding) / MILLI_PER_GPU


def fragmentation_steps_score(c: Candidates, cpu_stranding: float = 0.0) -> np.ndarray:
    """The same criterion in FGD's integer steps, scaled back to GPUs (0.04 GPU per step near no change).

    Exact values separate placements that differ by thousandths of a GPU, and pods then go wherever such noise
    points, spreading over many nodes. Steps make near-equal placements tie, and the weaker scorers and the
    fixed node order then fill the cluster node after node. Replayed on the Alibaba trace this is worth up to
    three points of GPU allocation at saturation (see the simulator).
    """
    if c.demand.kind is DemandKind.MIG:
        return np.zeros(c.valid.shape)
    points = fragmentation_points(_fragmentation_change(c, cpu_stranding))
    return (points - FGD_POINTS / 2) / (FGD_POINTS / 4)


TIGHT_FIT = 1e-3
"""Bonus for how full a GPU share leaves its GPU, per GPU (best fit and packing both add it): a tie-break among
GPUs, far below any other step of either score."""


def _share_leftover(free: np.ndarray, demand: Demand) -> np.ndarray:
    """[R, G]: what a GPU share would leave free on each GPU of `free`, in GPUs (negative where it does not fit)."""
    return (free - demand.gpu_milli) / MILLI_PER_GPU


def best_fit_score(c: Candidates) -> np.ndarray:
    """Minus what is left on the node afterwards: CPU and GPU, half each, relative to the largest node."""
    snap = c.snapshot
    free = snap.gpu_free[c.rows]
    cpu_left = (snap.cpu_free[c.rows] - c.demand.cpu_milli) / snap.largest_node_cpu
    gpu_left = (free.sum(axis=1) - c.demand.gpu_milli_total) / snap.largest_node_gpu_milli
    node = -(0.5 * cpu_left + 0.5 * gpu_left)
    if c.demand.kind is DemandKind.SHARE:
        # Among GPUs of one node, the tightest fit leaves the largest whole pieces elsewhere.
        return node[:, None] - TIGHT_FIT * _share_leftover(free, c.demand)
    return node[:, None]


def packing_score(c: Candidates) -> np.ndarray:
    """For a GPU share: 1 on a GPU already partly used, 0 on an idle one, plus up to `TIGHT_FIT` for how full it
    leaves its GPU. Other pods: 0.

    Among GPUs equal in every other way, the tightest fit (best fit per GPU) keeps the larger free pieces for the
    shares that come next. The preference is per GPU only: a node already in use is not preferred to an idle one.
    What a placement costs the pods that need whole GPUs or whole nodes is fragmentation's to measure, and a
    further pull towards nodes in use lost allocation under kube-scheduler's node sample. Replayed on the five
    openb pod lists (10 seeds, kube-scheduler mode, shipped profile), dropping that node level gained 0.08 to
    0.16 points of allocation at 130 % arrived on cpu100, default and gpushare40 and changed gpuspec10 and
    multigpu30 by under 0.01; with every node in view (sim mode) `default` moved by +0.02."""
    if c.demand.kind is not DemandKind.SHARE:
        return np.zeros((len(c.rows), 1))
    free = c.snapshot.gpu_free[c.rows]
    gpu_used = (free < MILLI_PER_GPU) & c.snapshot.gpu_present[c.rows]
    fill = 1.0 - _share_leftover(free, c.demand)  # each GPU's allocation after the share
    return gpu_used + TIGHT_FIT * fill


OPEN_EMPTY_GPU = 8.0
"""With a learnt MIG mix: the cost of carving an instance smaller than the whole GPU out of an empty GPU, above
any loss on a GPU in use, so an empty GPU is opened only when no GPU in use fits. Slice fit that opens empty GPUs
freely keeps every GPU a little carved and starves the whole-GPU profiles. Where whole GPUs are asked for, their
learnt value mostly does this already (on the MIG churn scenario, seeds 0-5 at load 1.0, dropping the rule moved
compute carried by under 0.1 points); the rule makes it hold whatever the mix."""


def mig_fit_score(c: Candidates) -> np.ndarray:
    """Minus the placeable MIG value a new instance destroys, in units of one compute slice (of 7).

    Without a learnt mix (`TypicalShapes.mig_mix`) each profile size is worth its compute slices; with one, each
    profile is worth its share of recent requests (`learnt_placeable_value`), and GPUs in use come before empty
    ones (`OPEN_EMPTY_GPU`), unless the instance takes the whole GPU."""
    if c.demand.kind is not DemandKind.MIG:
        return np.zeros(c.valid.shape)
    _, losses = c.mig_choice
    score = -np.where(np.isfinite(losses), losses, 0.0)
    if c.shapes.mig_mix is not None:
        tables = c.snapshot.mig_table[c.rows]
        opens = c.valid & (c.snapshot.mig_occupied[c.rows] == 0)
        for table in np.unique(tables[opens]).tolist():
            if not _smaller_than_gpu(table, c.demand.mig_profile or ""):
                opens &= tables != table
        score = score - OPEN_EMPTY_GPU * opens
    return score


@lru_cache(maxsize=256)
def _smaller_than_gpu(table: int, profile_name: str) -> bool:
    """Whether a profile of a MIG table leaves part of the GPU's compute to other instances."""
    profiles = MIG_TABLES[MIG_TABLE_NAMES[table]].profiles
    profile = next((p for p in profiles if p.name == profile_name), None)
    return profile is not None and profile.compute_slices < max(p.compute_slices for p in profiles)


def _measured_headroom(c: Candidates, headroom: np.ndarray) -> np.ndarray:
    """Per GPU for a share (its GPU), else the mean over the node's GPUs; neutral (0.5) where nothing is measured."""
    if not c.per_gpu:
        measured = c.snapshot.gpu_present[c.rows] & ~np.isnan(headroom)
        with np.errstate(invalid="ignore"):  # 0 / 0 where nothing is measured: NaN, then neutral
            headroom = (np.where(measured, headroom, 0.0).sum(axis=1) / measured.sum(axis=1))[:, None]
    return np.nan_to_num(headroom, nan=0.5)


def utilization_score(c: Candidates) -> np.ndarray:
    """Compute headroom by measured busy fraction (0..1); GPUs without fresh telemetry score neutral (0.5)."""
    return _measured_headroom(c, 1.0 - c.snapshot.gpu_util[c.rows])


def memory_headroom_score(c: Candidates) -> np.ndarray:
    """Measured free GPU memory as a fraction of the GPU's (0..1); GPUs without fresh telemetry score neutral.
    Room for a model's KV cache to grow, and for the next replica, which declarations alone can overstate."""
    with np.errstate(all="ignore"):
        free = c.snapshot.gpu_mem_free_measured[c.rows] / c.snapshot.gpu_mem_total[c.rows]
    return _measured_headroom(c, np.clip(free, 0.0, 1.0))


def small_node_score(c: Candidates) -> np.ndarray:
    """0..1, higher on nodes with fewer GPUs: at a small weight, ties go to small nodes, and large ones stay whole
    for the multi-GPU pods only they can hold."""
    width = max(c.snapshot.gpu_present.shape[1], 1)
    return (1.0 - c.snapshot.node_gpus[c.rows] / width)[:, None]


def plan_score(c: Candidates) -> np.ndarray:
    """1 on a GPU where the co-location plan wants another replica of the pod's model, else 0 (a node holding
    such a GPU, for a pod that takes whole GPUs). Pods without a model, or of a model the plan does not place,
    score 0 everywhere: the other scorers decide for them."""
    if c.plan is None or c.demand.model_name not in c.plan.counts:
        return np.zeros((len(c.rows), 1))
    wanted = c.plan.open_slots(c.snapshot, c.rows, c.demand.model_name) > 0
    if c.per_gpu:
        return wanted.astype(float)
    return wanted.any(axis=1, keepdims=True).astype(float)


def model_cache_score(c: Candidates, local_s: float = 23.0, remote_s: float = 120.0) -> np.ndarray:
    """0..1 by a serving replica's estimated start on each node: `local_s` where the node's disk holds the model's
    weights, `remote_s` where they must be pulled first, scored as the share of the pull it saves, `1 - local_s /
    remote_s` (0 where nothing is saved). 0 everywhere for pods without a model (`modelStart` in the policy sets
    the times)."""
    model = c.demand.model_name
    cached = c.snapshot.cached_on.get(model) if model else None
    if cached is None:
        return np.zeros((len(c.rows), 1))
    saved = 1.0 - local_s / remote_s if remote_s > 0 else 0.0
    return np.where(cached[c.rows], saved, 0.0)[:, None]


FRAGMENTATION_SCORERS = {"steps": fragmentation_steps_score, "exact": fragmentation_score}

SCORERS = {
    "fragmentation": fragmentation_steps_score,
    "best_fit": best_fit_score,
    "packing": packing_score,
    "mig_fit": mig_fit_score,
    "utilization": utilization_score,
    "memory_headroom": memory_headroom_score,
    "small_nodes": small_node_score,
    "plan": plan_score,
    "model_cache": model_cache_score,
}
