"""The placement policy file: a versioned, validated YAML document (usually a mounted ConfigMap)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from policies.catalog import most_specific_match
from policies.demand import Demand
from policies.documents import API_VERSION, StrictModel, read_text, yaml_mapping


class Weights(StrictModel):
    """How much each score counts. Units: GPUs of capacity (fragmentation, best fit) or points (the rest)."""

    fragmentation: float = Field(1.0, ge=0)
    best_fit: float = Field(0.0, ge=0, alias="bestFit")
    packing: float = Field(0.01, ge=0)  # shares to GPUs in use; below one fragmentation step (0.04): only ties
    mig_fit: float = Field(1.0, ge=0, alias="migFit")
    utilization: float = Field(0.0, ge=0)  # measured compute headroom (needs telemetry)
    memory_headroom: float = Field(0.0, ge=0, alias="memoryHeadroom")  # measured free GPU memory (needs telemetry)
    # Below packing's step too: among placements equal in every other score, the node with fewer GPUs.
    small_nodes: float = Field(0.001, ge=0, alias="smallNodes")
    # Above every other score: a serving replica goes to an open slot of its model's co-location plan if one
    # fits (feasibility still decides); without a plan, or for other pods, it adds nothing.
    plan: float = Field(10.0, ge=0)
    # Serving pods to nodes that hold their model's weights on disk: worth one GPU of fragmentation, below the plan.
    model_cache: float = Field(1.0, ge=0, alias="modelCache")


class ShapeSpec(StrictModel):
    """A pod shape that is expected to arrive, for fragmentation before the cluster has taught us its mix."""

    cpu_milli: int = Field(0, ge=0, alias="cpuMilli")
    memory_mib: int = Field(0, ge=0, alias="memoryMib")
    gpu_count: int = Field(0, ge=0, le=64, alias="gpuCount")
    gpu_milli: int = Field(0, ge=0, le=1000, alias="gpuMilli")
    models: list[str] = Field(default_factory=list)
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> ShapeSpec:
        if (self.gpu_count == 0) != (self.gpu_milli == 0):
            raise ValueError("gpuCount and gpuMilli must both be zero (CPU-only) or both positive")
        if self.gpu_count > 1 and self.gpu_milli != 1000:
            raise ValueError("multi-GPU shapes take whole GPUs: gpuMilli must be 1000")
        return self

    def demand(self) -> Demand:
        return Demand(
            cpu_milli=self.cpu_milli,
            memory_mib=self.memory_mib,
            gpu_count=self.gpu_count,
            gpu_milli=self.gpu_milli,
            allowed_models=frozenset(self.models),
        )


def _default_shapes() -> list[ShapeSpec]:
    # The most common shapes of the Alibaba GPU trace (openb default list), rounded.
    return [
        ShapeSpec(cpuMilli=8000, gpuCount=1, gpuMilli=1000, weight=0.48),
        ShapeSpec(cpuMilli=4000, gpuCount=0, gpuMilli=0, weight=0.13),
        ShapeSpec(cpuMilli=4000, gpuCount=1, gpuMilli=500, weight=0.25),
        ShapeSpec(cpuMilli=4000, gpuCount=1, gpuMilli=250, weight=0.08),
        ShapeSpec(cpuMilli=32000, gpuCount=4, gpuMilli=1000, weight=0.03),
        ShapeSpec(cpuMilli=64000, gpuCount=8, gpuMilli=1000, weight=0.03),
    ]


class TypicalShapesSpec(StrictModel):
    coverage: float = Field(0.95, gt=0, le=1)
    learn_from_cluster: bool = Field(True, alias="learnFromCluster")
    min_observed_pods: int = Field(50, ge=1, alias="minObservedPods")
    default: list[ShapeSpec] = Field(default_factory=_default_shapes, min_length=1)


class ExtenderScoring(StrictModel):
    """How raw scores become the 0..10 integers kube-scheduler accepts.

    `assumeBest`: prioritize (or filter, with a shortlist of one) holds the placement on the best node until bind,
    as kube-scheduler assumes a pod before binding it. The next pod is then decided on a view that already counts
    this one, and bind finds its GPUs chosen. Turn it off where other score plugins can outweigh the extender: a
    different choice is handled at bind, but holds capacity for nothing until then.

    `shortlist`: filter lets through only this many of the feasible nodes, the best-scored ones (0: all of them).
    With 1, kube-scheduler binds the one node it is given without calling prioritize, which saves a round trip
    per pod; that suits a profile in which the extender alone ranks nodes (the shipped one). A pod that fits
    nowhere still gets every node's reason.
    """

    mode: Literal["rank", "linear"] = "rank"
    assume_best: bool = Field(True, alias="assumeBest")
    shortlist: int = Field(0, ge=0)


class FragmentationScoring(StrictModel):
    """`steps`: FGD's integer steps, so near-equal placements tie and packing decides; `exact`: the raw change.

    `cpuStranding`: how much the GPU capacity a placement leaves its node's CPU unable to feed (at the typical GPU
    pods' CPU per GPU) counts beside FGD's fragmentation, in the same GPUs; 0 is FGD's measure alone."""

    mode: Literal["steps", "exact"] = "steps"
    cpu_stranding: float = Field(1.0, ge=0, alias="cpuStranding")


class Reservations(StrictModel):
    """How long capacity is held for a pod the watch has not yet shown bound: after bind (`ttlSeconds`), and
    between the decision (prioritize, or a filter that shortlists one node) and bind (`assumedTtlSeconds`, when the
    scheduler never binds the pod)."""

    ttl_seconds: float = Field(120.0, gt=0, alias="ttlSeconds")
    assumed_ttl_seconds: float = Field(30.0, gt=0, alias="assumedTtlSeconds")


class Overcommit(StrictModel):
    """Let batch pods asking for a GPU share run on GPUs that are fully allocated but measurably idle.

    A GPU lends capacity only with fresh telemetry, no guarded tenant (an exclusive or interactive pod), enough
    free GPU memory for the pod's declared `gpu-memory` (memory is never lent), and room under the safety margin:
    the GPU's busy fraction + the pod's expected busy fraction <= 1 - safetyMargin; the shares placed on one GPU,
    allocated and borrowed, exceed it by at most `maxBorrowedMilliPerGpu`. `prefer: borrow` consolidates
    (a safe borrowed place beats opening an idle GPU); `allocation` borrows only where the allocation is full.

    The GPU's busy fraction is the measured one, but at least `declaredBusy` times the sum of what its tenants
    declare they use (`expected-busy`, else their whole share): a GPU whose tenants happened to be calm for the
    last telemetry window still counts the bursts their declarations foresee.
    """

    enabled: bool = False
    safety_margin: float = Field(0.15, ge=0, lt=1, alias="safetyMargin")
    declared_busy: float = Field(0.0, ge=0, le=1, alias="declaredBusy")
    max_borrowed_milli_per_gpu: int = Field(1000, ge=0, le=4000, alias="maxBorrowedMilliPerGpu")
    prefer: Literal["borrow", "allocation"] = "borrow"


class ModelStart(StrictModel):
    """How long a serving replica takes to start, by where its model's weights are: the model-cache score ranks a
    serving pod's nodes by it. Defaults: the genai-serving trace's median base-model load (22.7 s) from local disk;
    the low end of the 2-8 minutes reported for vLLM pods on Kubernetes that pull their weights first."""

    local_weights_seconds: float = Field(23.0, gt=0, alias="localWeightsSeconds")
    remote_pull_seconds: float = Field(120.0, gt=0, alias="remotePullSeconds")

    @model_validator(mode="after")
    def _remote_not_faster(self) -> ModelStart:
        if self.remote_pull_seconds < self.local_weights_seconds:
            raise ValueError("remotePullSeconds must not be below localWeightsSeconds")
        return self


class ColdLoads(StrictModel):
    """Herd control for serving replicas (pods with `gpu-extender.io/model`): at most `maxPerNode` of them may be
    loading (bound, not yet Ready) on one node at a time; 0 lifts the limit. Replicas that load together share the
    node's disk and network for their weights and its GPUs for memory profiling (vLLM sizes its KV cache from the
    memory it sees free, so co-located engines must start one after another); a spike that starts many at once
    makes every one of them late. `maxPerModel`: at most that many of one model's replicas loading in the whole
    fleet (0: no limit), so a spike does not start more copies of a model than its load needs at once (the rest
    wait for the first to be Ready, which then carry load)."""

    max_per_node: int = Field(0, ge=0, alias="maxPerNode")
    max_per_model: int = Field(0, ge=0, alias="maxPerModel")


class Prices(StrictModel):
    """What an hour of one GPU costs, by GPU type, so the extender can count what idle, fragmented and stranded
    capacity costs (`gpu_extender_gpu_cost_dollars_total`). Keys name GPU types as the model catalog does
    (`H100`, `A100-80GB`) and are matched to a node's GPU model the way the planner matches them: the most specific
    name that names it wins. GPU types no key names get no cost series."""

    gpu_hourly: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict, alias="gpuHourly")

    @field_validator("gpu_hourly")
    @classmethod
    def _names(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not name.strip() for name in value):
            raise ValueError("GPU type names must not be empty")
        return value

    def hourly(self, gpu_model: str) -> float | None:
        """Dollars per GPU-hour of a node's GPU model, or None when no key names it."""
        name = most_specific_match(self.gpu_hourly, gpu_model)
        return None if name is None else self.gpu_hourly[name]


class Accounting(StrictModel):
    """How the GPU-seconds counters group the fleet: by GPU type, and by the node label `poolLabel` names (its
    value is the pool; "" groups every node into one pool with an empty name)."""

    pool_label: str = Field("gpu-extender.io/pool", alias="poolLabel")


class PlacementPolicy(StrictModel):
    api_version: Literal["gpu-extender.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["PlacementPolicy"] = "PlacementPolicy"
    weights: Weights = Field(default_factory=Weights)
    typical_shapes: TypicalShapesSpec = Field(default_factory=TypicalShapesSpec, alias="typicalShapes")
    fragmentation_scoring: FragmentationScoring = Field(
        default_factory=FragmentationScoring, alias="fragmentationScoring"
    )
    extender_scoring: ExtenderScoring = Field(default_factory=ExtenderScoring, alias="extenderScoring")
    reservations: Reservations = Field(default_factory=Reservations)
    overcommit: Overcommit = Field(default_factory=Overcommit)
    cold_loads: ColdLoads = Field(default_factory=ColdLoads, alias="coldLoads")
    model_start: ModelStart = Field(default_factory=ModelStart, alias="modelStart")
    prices: Prices = Field(default_factory=Prices)
    accounting: Accounting = Field(default_factory=Accounting)


class PolicyError(ValueError):
    """A policy document that cannot be used; the message names every bad field."""


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(str(part) for part in e["loc"]) or "(document)"
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def parse_policy(text: str, source: str = "<policy>") -> PlacementPolicy:
    document = yaml_mapping(text, source, PolicyError, empty={})
    try:
        return PlacementPolicy.model_validate(document)
    except ValidationError as exc:
        raise PolicyError(f"{source}: {_describe(exc)}") from exc


def load_policy(path: str | Path) -> PlacementPolicy:
    return parse_policy(read_text(path, PolicyError), str(path))
