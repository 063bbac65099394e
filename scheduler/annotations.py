"""The two annotation contracts, versioned: what the node agent publishes and what bind writes on the pod.

Both are JSON with a version field `v`; unknown fields are refused so a newer writer is noticed instead of being
half-read. The plain `gpu-extender.io/gpu-*` annotations written next to the assignment exist for the downward API
(a container reads them as files or environment variables without parsing JSON).

A bound pod without a readable assignment (placed by another scheduler, or by a binder that crashed between its
patch and its binding) still occupies its node. Which GPUs it holds cannot be derived in general (the device plugin
chose them), so `bound_assignment` accounts its CPU and memory and reports the GPU placement as unknown; the caller
counts such pods instead of inventing GPU indices that could block the wrong device.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from policies.demand import Demand, DemandKind
from policies.inventory import MILLI_PER_GPU, Assignment, MigPlacement, NodeInventory
from policies.mig import MIG_TABLES, mig_table_for

__all__ = [
    "ASSIGNMENT",
    "GPU_INDICES",
    "GPU_INVENTORY",
    "GPU_MEMORY_FRACTION",
    "GPU_UUIDS",
    "AssignmentDoc",
    "GpuDoc",
    "NodeInventoryDoc",
    "assignment_annotations",
    "assignment_from_annotations",
    "bound_assignment",
    "parse_node_inventory",
]

GPU_INVENTORY = "gpu-extender.io/gpu-inventory"
ASSIGNMENT = "gpu-extender.io/assignment"
GPU_UUIDS = "gpu-extender.io/gpu-uuids"
GPU_INDICES = "gpu-extender.io/gpu-indices"
GPU_MEMORY_FRACTION = "gpu-extender.io/gpu-memory-fraction"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# -- node inventory (node agent -> scheduler) ------------------------------------------------------------
class MigInstanceDoc(_Doc):
    profile: str
    start: int = Field(ge=0, le=7)
    uuid: str = ""


class MigDoc(_Doc):
    enabled: bool
    instances: list[MigInstanceDoc] = Field(default_factory=list)


class GpuDoc(_Doc):
    index: int = Field(ge=0, le=63)
    uuid: str = ""
    model: str = Field(min_length=1)
    memory_mib: int = Field(0, ge=0, alias="memoryMiB")
    mig: MigDoc | None = None

    @model_validator(mode="after")
    def _valid_instances(self) -> GpuDoc:
        """MIG instances must be real placements of this GPU's table and must not overlap."""
        if self.mig is None or not self.mig.enabled:
            return self
        table_name = mig_table_for(self.model, self.memory_mib)
        if table_name is None:
            raise ValueError(f"GPU {self.index}: MIG is enabled but {self.model!r} has no known MIG table")
        table = MIG_TABLES[table_name]
        occupied = 0
        for inst in self.mig.instances:
            profile = table.profile(inst.profile)
            if profile is None or inst.start not in profile.starts:
                raise ValueError(f"GPU {self.index}: no MIG placement {inst.profile}@{inst.start} on {table_name}")
            if occupied & profile.mask_at(inst.start):
                raise ValueError(f"GPU {self.index}: MIG instance {inst.profile}@{inst.start} overlaps another")
            occupied |= profile.mask_at(inst.start)
        return self


class NodeInventoryDoc(_Doc):
    v: Literal[1]
    gpus: list[GpuDoc]
    observed_at: datetime | None = Field(None, alias="observedAt")
    # Models whose weights are on the node's disk (`org/name`, as the hub names them): serving pods start faster here.
    cached_models: list[str] | None = Field(None, alias="cachedModels")

    @model_validator(mode="after")
    def _unique_indices(self) -> NodeInventoryDoc:
        indices = [g.index for g in self.gpus]
        if len(set(indices)) != len(indices):
            raise ValueError(f"duplicate GPU indices {sorted(indices)}")
        return self


def parse_node_inventory(text: str | None) -> NodeInventoryDoc | None:
    """The node agent's inventory, or None when the annotation is absent or does not follow schema v1."""
    if not text:
        return None
    try:
        return NodeInventoryDoc.model_validate_json(text)
    except ValidationError:
        return None


# -- pod assignment (bind -> pod, read back by the watch) ------------------------------------------------
class MigPlacementDoc(_Doc):
    gpu: int = Field(ge=0)
    profile: str
    start: int = Field(ge=0, le=7)


class AssignmentDoc(_Doc):
    v: Literal[1]
    node: str = Field(min_length=1)
    gpus: list[int] = Field(default_factory=list)
    milli: int = Field(0, ge=0, le=MILLI_PER_GPU)
    gpu_memory_mib: int = Field(0, ge=0, alias="gpuMemoryMiB")
    mig: MigPlacementDoc | None = None
    borrowed: bool | None = None  # written only when true: the share runs on borrowed idle capacity


def _fraction(numerator: int, denominator: int) -> str:
    """Two decimals, rounded down: a process told to use this fraction never exceeds what it was given."""
    value = (Decimal(numerator) / Decimal(denominator)).quantize(Decimal("0.01"), rounding=ROUND_FLOOR)
    return f"{value:.2f}"


def assignment_annotations(assignment: Assignment, node: NodeInventory | None = None) -> dict[str, str]:
    """Annotations bind writes on the pod: the versioned assignment plus downward-API conveniences.

    `gpu-memory-fraction` is written for GPU shares (the value for vLLM's `--gpu-memory-utilization`): the
    declared GPU memory over the GPU's memory when both are known, otherwise the compute share `milli/1000`.
    """
    mig = assignment.mig
    doc = AssignmentDoc(
        v=1,
        node=assignment.node,
        gpus=list(assignment.gpus),
        milli=assignment.milli,
        gpuMemoryMiB=assignment.gpu_memory_mib,
        mig=MigPlacementDoc(gpu=mig.gpu, profile=mig.profile, start=mig.start) if mig else None,
        borrowed=True if assignment.borrowed else None,
    )
    out = {ASSIGNMENT: doc.model_dump_json(by_alias=True, exclude_none=True)}
    indices = [mig.gpu] if mig else list(assignment.gpus)
    if indices:
        out[GPU_INDICES] = ",".join(str(i) for i in indices)
    devices = {g.index: g for g in node.gpus} if node is not None else {}
    if mig is not None:
        gpu = devices.get(mig.gpu)
        uuids = [i.uuid for i in gpu.mig_instances if (i.profile, i.start) == (mig.profile, mig.start)] if gpu else []
    else:
        uuids = [devices[i].uuid if i in devices else "" for i in assignment.gpus]
    if uuids and all(uuids):
        out[GPU_UUIDS] = ",".join(uuids)
    if assignment.gpus and (0 < assignment.milli < MILLI_PER_GPU or assignment.borrowed):
        gpu = devices.get(assignment.gpus[0])
        if assignment.gpu_memory_mib and gpu is not None and gpu.memory_mib:
            out[GPU_MEMORY_FRACTION] = _fraction(min(assignment.gpu_memory_mib, gpu.memory_mib), gpu.memory_mib)
        else:
            out[GPU_MEMORY_FRACTION] = _fraction(assignment.milli, MILLI_PER_GPU)
    return out


def _matches(doc: AssignmentDoc, demand: Demand) -> bool:
    """The recorded placement is of the shape the pod asks for (a stale or hand-edited record is not trusted)."""
    kind = demand.kind
    if kind is DemandKind.MIG:
        return doc.mig is not None and doc.mig.profile == demand.mig_profile and not doc.gpus
    if doc.mig is not None:
        return False
    if kind is DemandKind.NONE:
        return not doc.gpus
    if len(doc.gpus) != demand.gpu_count or len(set(doc.gpus)) != len(doc.gpus):
        return False
    if doc.borrowed and demand.guards_gpu:
        return False
    return doc.milli == (MILLI_PER_GPU if kind is DemandKind.WHOLE else demand.gpu_milli)


def assignment_from_annotations(
    annotations: Mapping[str, str] | None, node_name: str, demand: Demand
) -> Assignment | None:
    """The assignment bind recorded, or None when absent, malformed, for another node, or not the pod's shape."""
    text = (annotations or {}).get(ASSIGNMENT)
    if not text:
        return None
    try:
        doc = AssignmentDoc.model_validate_json(text)
    except ValidationError:
        return None
    if doc.node != node_name or not _matches(doc, demand):
        return None
    mig = MigPlacement(gpu=doc.mig.gpu, profile=doc.mig.profile, start=doc.mig.start) if doc.mig else None
    return Assignment(
        node=node_name,
        cpu_milli=demand.cpu_milli,
        memory_mib=demand.memory_mib,
        gpus=tuple(doc.gpus),
        milli=doc.milli,
        gpu_memory_mib=doc.gpu_memory_mib,
        mig=mig,
        borrowed=bool(doc.borrowed),
        guarded=demand.guards_gpu,
        expected_busy=demand.busy_estimate,
    )


def bound_assignment(annotations: Mapping[str, str] | None, node_name: str, demand: Demand) -> tuple[Assignment, bool]:
    """What a bound pod holds, and whether its GPU placement is known.

    Without a valid record the pod is accounted for CPU and memory only and `False` is returned when it asks for
    a GPU: the caller must not guess device indices (see the module note).
    """
    recorded = assignment_from_annotations(annotations, node_name, demand)
    if recorded is not None:
        return recorded, True
    host_only = Assignment(node=node_name, cpu_milli=demand.cpu_milli, memory_mib=demand.memory_mib)
    return host_only, demand.kind is DemandKind.NONE
