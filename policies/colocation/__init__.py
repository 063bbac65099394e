"""Co-location of model-serving replicas: how many replicas each model needs and which GPU, MIG slice or GPU share
each one takes, at the least cost for the fleet (CP-SAT, with a first-fit-decreasing hint and fallback)."""

from policies.colocation.baselines import one_replica_per_gpu
from policies.colocation.greedy import first_fit_decreasing
from policies.colocation.solver import plan_colocation, solve
from policies.colocation.types import (
    CurrentReplica,
    FleetGpu,
    Plan,
    PlanError,
    PlannedReplica,
    PlannerOptions,
    ServedModel,
)

__all__ = [
    "CurrentReplica",
    "FleetGpu",
    "Plan",
    "PlanError",
    "PlannedReplica",
    "PlannerOptions",
    "ServedModel",
    "first_fit_decreasing",
    "one_replica_per_gpu",
    "plan_colocation",
    "solve",
]
