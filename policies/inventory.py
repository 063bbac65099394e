"""What a node has and what a pod was given: the domain records every decision is made of.

These are plain frozen records, independent of how they were learnt (API server, node agent, trace file), so the
extender, the simulator and the planner all build the same state from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MILLI_PER_GPU = 1000


@dataclass(frozen=True)
class MigInstance:
    """A GPU instance that exists on a MIG-enabled GPU (created by the MIG manager or the node agent)."""

    profile: str
    start: int
    uuid: str = ""


@dataclass(frozen=True)
class GpuDevice:
    """One physical GPU of a node. `mig_table` is set when the GPU is in MIG mode."""

    index: int
    model: str
    memory_mib: int = 0
    uuid: str = ""
    mig_table: str | None = None
    mig_instances: tuple[MigInstance, ...] = ()


@dataclass(frozen=True)
class NodeInventory:
    """A schedulable node as the scheduler sees it: host resources and its GPUs."""

    name: str
    cpu_milli: int
    memory_mib: int
    gpus: tuple[GpuDevice, ...] = ()
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    cached_models: frozenset[str] = field(default=frozenset(), hash=False, compare=False)  # weights on local disk

    @property
    def gpu_model(self) -> str:
        return self.gpus[0].model if self.gpus else ""


@dataclass(frozen=True)
class MigPlacement:
    """Where a MIG request landed: GPU index, profile and start slot (the slot identifies the instance)."""

    gpu: int
    profile: str
    start: int


@dataclass(frozen=True)
class Assignment:
    """The concrete resources a pod holds on a node. Whole GPUs hold `milli` = 1000 on each listed GPU.

    `borrowed`: the share runs on measured idle capacity of a GPU whose allocation was full (overcommit), so it
    does not count against the GPU's allocatable share. `guarded`: the pod's latency class forbids others from
    borrowing on its GPUs. `expected_busy`: the busy fraction the pod is expected to add to each of its GPUs
    (`Demand.busy_estimate`); what it declares, not what it holds, so it takes no part in equality. `model`: the
    served model (`gpu-extender.io/model`) a serving replica runs, so a plan can tell its slots filled; a label,
    not a resource, so it takes no part in equality either. `starting`: a serving replica still loading (bound,
    not yet Ready), for herd control; a state of the pod, not of what it holds.
    """

    node: str
    cpu_milli: int = 0
    memory_mib: int = 0
    gpus: tuple[int, ...] = ()
    milli: int = 0
    gpu_memory_mib: int = 0
    mig: MigPlacement | None = None
    borrowed: bool = False
    guarded: bool = False
    expected_busy: float = field(default=0.0, compare=False)
    model: str | None = field(default=None, compare=False)
    starting: bool = field(default=False, compare=False)

    @property
    def gpu_milli_total(self) -> int:
        """GPU capacity held, in thousandths of a GPU (a MIG slice counts by its compute share of 7)."""
        return self.milli * len(self.gpus)
