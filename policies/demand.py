"""What a pod asks for, reduced to the fields a placement decision needs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from policies.inventory import MILLI_PER_GPU


class DemandKind(StrEnum):
    NONE = "none"  # no GPU: still shapes fragmentation through CPU and memory
    WHOLE = "whole"  # N dedicated GPUs
    SHARE = "share"  # a fraction of one GPU
    MIG = "mig"  # one MIG instance of a profile


class LatencyClass(StrEnum):
    """How much interference a pod tolerates. Interactive pods never share a GPU beyond its allocation, in
    either direction; batch pods may borrow measured idle capacity when the policy allows overcommit."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class Shape(NamedTuple):
    """The key that groups pods into "typical shapes" for fragmentation."""

    cpu_milli: int
    gpu_count: int
    gpu_milli: int
    allowed_models: frozenset[str]
    memory_mib: int


@dataclass(frozen=True)
class Demand:
    """A pod's request. `gpu_milli` is per GPU: 1000 for whole GPUs, below 1000 for a share.

    `shareable`: asked through the fractional resource, so the pod runs on a shared GPU (even at 1000 milli) and
    may be placed on borrowed idle capacity. `expected_busy`: the busy fraction (0..1) the pod is expected to add
    to its GPU, when declared; without it the pod is assumed to use its whole share.
    """

    cpu_milli: int = 0
    memory_mib: int = 0
    gpu_count: int = 0
    gpu_milli: int = 0
    mig_profile: str | None = None
    gpu_memory_mib: int = 0
    allowed_models: frozenset[str] = frozenset()
    model_name: str | None = None
    latency_class: LatencyClass = LatencyClass.BATCH
    shareable: bool = False
    expected_busy: float | None = None

    @property
    def kind(self) -> DemandKind:
        if self.mig_profile:
            return DemandKind.MIG
        if self.gpu_count == 0:
            return DemandKind.NONE
        if self.gpu_milli < MILLI_PER_GPU:
            return DemandKind.SHARE
        return DemandKind.WHOLE

    @property
    def gpu_milli_total(self) -> int:
        return self.gpu_count * self.gpu_milli

    @property
    def shares_gpu(self) -> bool:
        """The pod runs on a GPU that others may use too (a share, or a whole GPU asked as a share)."""
        return self.kind is DemandKind.SHARE or (self.shareable and self.kind is DemandKind.WHOLE)

    @property
    def guards_gpu(self) -> bool:
        """Its GPUs must carry no borrowed shares: an exclusive GPU, or a latency class that forbids interference."""
        if self.kind not in (DemandKind.WHOLE, DemandKind.SHARE):
            return False
        return not self.shares_gpu or self.latency_class is LatencyClass.INTERACTIVE

    @property
    def busy_estimate(self) -> float:
        """The load this pod adds to one of its GPUs: declared, else its whole share."""
        if self.expected_busy is not None:
            return self.expected_busy
        return self.gpu_milli / MILLI_PER_GPU

    @property
    def shape(self) -> Shape:
        """CPU, GPUs, GPU models and memory: a node out of memory strands its GPUs as surely as one out of CPU."""
        return Shape(self.cpu_milli, self.gpu_count, self.gpu_milli, self.allowed_models, self.memory_mib)


def model_allowed(model: str, allowed: frozenset[str]) -> bool:
    """GPU type constraint: an exact model name, or a case-insensitive part of a longer product name.

    `A100` matches the GFD product `NVIDIA-A100-SXM4-80GB`; `V100M16` matches only itself in the openb trace.
    """
    if not allowed:
        return True
    upper = model.upper()
    return any(a == model or a.upper() in upper for a in allowed)
