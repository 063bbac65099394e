"""How many GPUs the co-location planner saves on an LLM serving scenario, and how fast it solves.

The scenario: the shipped catalog's models that fit one H100 (or fine-tuned variants of them, each served on its
own), a Zipf popularity over them, and per-model demand shaped by the Azure LLM inference trace: its arrivals per
minute over its hour, shifted by a random offset per model (so that models do not peak in lockstep) and scaled so
that one replica per GPU needs the asked number of replicas. Each model must carry the 95th percentile of its
per-minute rate. Printed per size: GPUs for one replica per GPU, first-fit decreasing and the planner, the
planner's proven lower bound and gap, its solve time, the plan as a share of one replica per GPU (the issue's
target is at most 40 %), and two bounds no plan can beat: memory (the fewest replicas that carry each model's
demand, their memory packed without gaps) and compute (the demand at the fastest GPU, within the margin).

    python -m e2e.bench_colocation [--sizes 100:30,1000:300,4000:3000] [--variants 1] [--time-limit 10]
"""

from __future__ import annotations

import argparse
import csv
import math
from datetime import datetime

import numpy as np

from policies.catalog import default_catalog
from policies.colocation import FleetGpu, PlannerOptions, ServedModel, first_fit_decreasing, solve
from policies.colocation.baselines import one_replica_per_gpu
from policies.colocation.menu import replica_menu
from policies.colocation.problem import Problem, build_problem
from policies.colocation.solver import compute_lower_bound
from scheduler.datasets import shared_data

H100 = "NVIDIA-H100-80GB-HBM3"
H100_MIB = 81559
GPUS_PER_NODE = 8
AZURE = "azure-llm-inference/AzureLLMInferenceTrace_code.csv"


def arrivals_per_minute() -> np.ndarray:
    """The Azure trace's requests per second, one value per minute of its hour."""
    with (shared_data() / AZURE).open() as handle:
        stamps = [datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp() for row in csv.DictReader(handle)]
    seconds = np.asarray(stamps) - min(stamps)
    counts = np.bincount((seconds // 60).astype(int))
    return counts[:60] / 60.0


def scenario(replicas: int, variants: int, seed: int) -> tuple[list[ServedModel], list[np.ndarray]]:
    """Models and their demand histories, scaled so that one replica per H100 needs about `replicas` GPUs."""
    rng = np.random.default_rng(seed)
    specs = [s for s in default_catalog().models if s.requests_per_second(H100) is not None]
    specs = [
        s.model_copy(update={"name": f"{s.name}-v{v}"}) if variants > 1 else s for s in specs for v in range(variants)
    ]
    popularity = 1.0 / np.arange(1, len(specs) + 1)
    rng.shuffle(popularity)
    shape = arrivals_per_minute()
    shape = shape / shape.mean()
    histories = [np.roll(shape, int(rng.integers(len(shape)))) * p for p in popularity]

    def models_at(scale: float) -> list[ServedModel]:
        return [
            ServedModel(spec, float(np.percentile(h * scale, 95)), min_replicas=1)
            for spec, h in zip(specs, histories, strict=True)
        ]

    fleet = h100_fleet(max(replicas, len(specs)) * 2)
    low, high = 0.0, 1.0
    while one_replica_per_gpu(build_problem(models_at(high), fleet, PlannerOptions(), []))[0] < replicas:
        high *= 2
    for _ in range(40):
        mid = (low + high) / 2
        if one_replica_per_gpu(build_problem(models_at(mid), fleet, PlannerOptions(), []))[0] < replicas:
            low = mid
        else:
            high = mid
    return models_at(high), [h * high for h in histories]


def h100_fleet(gpus: int) -> list[FleetGpu]:
    return [FleetGpu(f"node-{i // GPUS_PER_NODE:04d}", i % GPUS_PER_NODE, H100, H100_MIB, 1.0) for i in range(gpus)]


def memory_bound(problem: Problem) -> int:
    """GPUs the fewest replicas that carry the demand need by memory alone, packed without gaps."""
    total = sum(replica_menu(problem, m).low * problem.memory(m) for m in range(len(problem.models)))
    return -(-total // min(t.memory_mib for t in problem.types))


def compute_bound(problem: Problem) -> int:
    """GPUs (at a price of 1) the demand needs at each model's fastest GPU, within the compute margin."""
    return math.ceil(compute_lower_bound(problem) - 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100:30,1000:300,4000:3000", help="GPUs:replicas of one per GPU, ...")
    parser.add_argument("--variants", type=int, default=1, help="served variants of each catalog model")
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args(argv)
    print(
        f"{'GPUs':>6} {'models':>6} {'1/GPU':>6} {'FFD':>6} {'plan':>6} {'bound':>7} {'gap':>6} {'saved':>6} "
        f"{'vs FFD':>6} {'solve s':>7} {'plan/1':>6} {'mem LB':>6} {'cpu LB':>6} {'LB/1':>6}  method"
    )
    for size in args.sizes.split(","):
        gpus, replicas = (int(x) for x in size.split(":"))
        for seed in range(args.seeds):
            models, histories = scenario(replicas, args.variants, seed)
            fleet = h100_fleet(gpus)
            options = PlannerOptions(time_limit_s=args.time_limit)
            problem = build_problem(models, fleet, options, histories)
            single, _ = one_replica_per_gpu(problem)
            greedy, unplaced = first_fit_decreasing(problem)
            plan = solve(problem)
            ffd = greedy.gpus_used() if not unplaced else float("nan")
            memory, compute = memory_bound(problem), compute_bound(problem)
            print(
                f"{gpus:>6} {len(models):>6} {single:>6} {ffd:>6} {plan.gpus_used:>6} "
                f"{plan.lower_bound_per_hour:>7.2f} "
                f"{plan.gap:>6.1%} {1 - plan.gpus_used / single:>6.1%} {1 - plan.gpus_used / ffd:>6.1%} "
                f"{plan.solve_seconds:>7.1f} {plan.gpus_used / single:>6.1%} {memory:>6} {compute:>6} "
                f"{max(memory, compute) / single:>6.1%}  {plan.method}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
