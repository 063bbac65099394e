"""What serving fleets do without a planner: every replica on a GPU of its own."""

from __future__ import annotations

import math

from policies.colocation.problem import Problem


def one_replica_per_gpu(problem: Problem) -> tuple[int, float]:
    """GPUs and cost per hour when each replica has a whole GPU, of the type that serves its model cheapest,
    and each model runs the fewest replicas that carry its demand within the compute margin."""
    gpus, cost = 0, 0.0
    usable = problem.options.usable_milli / 1000
    price = {t.key: t.price_per_hour for t in problem.types}
    for m, served in enumerate(problem.models):
        options = [(price[t] / r, t, r) for (mm, t), r in problem.rate.items() if mm == m]
        if not options:  # only MIG slices can serve it here: a whole GPU of a MIG type serves it at least as fast
            options = [(price[t] / r, t, r) for (mm, t, _), r in problem.slice_rate.items() if mm == m]
        _, t, rate = min(options)
        replicas = max(served.min_replicas, math.ceil(served.requests_per_second / (rate * usable) - 1e-9))
        gpus += replicas
        cost += replicas * price[t]
    return gpus, cost
