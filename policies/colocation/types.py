"""The planner's inputs and its answer: plain frozen records, independent of Kubernetes and of the solver."""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.catalog import ModelSpec
from policies.inventory import MILLI_PER_GPU


class PlanError(ValueError):
    """A planning problem with no answer: a model that fits no GPU or slice, or demand beyond the fleet."""


@dataclass(frozen=True)
class FleetGpu:
    """One GPU the planner may use. `mig_table` is set when the GPU is (or may be) carved into MIG slices;
    `mig_layout` lists the instances it has now, as (profile, start), when their layout is fixed."""

    node: str
    index: int
    model: str
    memory_mib: int
    price_per_hour: float = 1.0
    mig_table: str | None = None
    mig_layout: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True)
class ServedModel:
    """A model to serve: its catalog entry, the request rate to carry, and what it must not share with."""

    spec: ModelSpec
    requests_per_second: float
    min_replicas: int = 1

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def interactive(self) -> bool:
        return self.spec.latency_class == "interactive"


@dataclass(frozen=True)
class CurrentReplica:
    """A replica that runs now, so that the plan moves as few as it can."""

    model: str
    node: str
    gpu: int
    mig_profile: str | None = None


@dataclass(frozen=True)
class PlannerOptions:
    """`margin`: compute kept free on every GPU and slice (load fractions sum to at most 1 - margin).
    `max_replicas_per_gpu`: replicas one GPU may share (each vLLM process costs its own context and interferes).
    `correlation_threshold`: models whose request histories correlate above it never share a GPU.
    `spread`: distinct nodes a model's replicas should cover (capped by its replica count)."""

    margin: float = 0.1
    max_replicas_per_gpu: int = 4
    correlation_threshold: float = 0.8
    spread: int = 2
    time_limit_s: float = 10.0
    workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1:
            raise PlanError("margin must be in [0, 1)")
        if self.max_replicas_per_gpu < 1:
            raise PlanError("max_replicas_per_gpu must be at least 1")

    @property
    def usable_milli(self) -> int:
        return MILLI_PER_GPU - round(self.margin * MILLI_PER_GPU)


@dataclass(frozen=True)
class PlannedReplica:
    """One replica of the plan. `load_milli` is the share of its GPU's (or slice's) compute its demand takes;
    `memory_fraction` is what to pass to vLLM's `--gpu-memory-utilization` (of the whole GPU or of the slice)."""

    model: str
    node: str
    gpu: int
    gpu_model: str
    memory_mib: int
    memory_fraction: float
    load_milli: int
    requests_per_second: float
    mig_profile: str | None = None
    mig_start: int | None = None

    @property
    def shared(self) -> bool:
        return self.mig_profile is None and self.memory_fraction < 1.0


@dataclass(frozen=True)
class Plan:
    """The chosen replicas, what they cost, and how good the solver could prove the answer to be.

    `lower_bound_per_hour` is a proven bound on the cost of any plan for this demand (CP-SAT's best bound, or the
    larger of the memory and compute bounds when the solver was not run); `gap` = 1 - bound / cost."""

    replicas: tuple[PlannedReplica, ...]
    gpus_used: int
    cost_per_hour: float
    lower_bound_per_hour: float
    method: str  # "cp-sat optimal", "cp-sat feasible", "greedy"
    solve_seconds: float = 0.0
    moves: int = 0  # replicas that run now and would stop or run elsewhere
    min_headroom: float = 1.0  # the smallest share of compute left free on a used GPU or slice
    notes: tuple[str, ...] = field(default=())

    @property
    def gap(self) -> float:
        return 0.0 if self.cost_per_hour <= 0 else max(0.0, 1.0 - self.lower_bound_per_hour / self.cost_per_hour)

    def replicas_of(self, model: str) -> list[PlannedReplica]:
        return [r for r in self.replicas if r.model == model]
