"""The replica-count menu: how many replicas a model may run, and the load each replica then takes.

A Service spreads a model's requests evenly over its replicas, so once the replica count R is chosen, every
replica carries demand / R requests per second and takes the same share of any GPU (or slice) of one kind. The
solver therefore chooses R per model from this menu and reads each replica's load from a precomputed table,
instead of choosing loads freely (which lets a plan rest on replicas that carry nothing, or on uneven loads no
Service produces).
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.colocation.aggregate import Aggregate
from policies.colocation.problem import Problem, demand_units, rate_units

EXTRA_REPLICAS = 8  # beyond twice the fewest replicas, more only add memory: their loads are already small


@dataclass(frozen=True)
class Menu:
    """Admissible replica counts of one model, `low`..`high`; `load[key][R]` is the thousandths of a GPU (or
    slice) one of R replicas takes on `key` = (type,) or (type, profile); above `usable` means it cannot run
    there at that count."""

    low: int
    high: int
    load: dict[tuple, list[int]]


def replica_menu(problem: Problem, m: int) -> Menu:
    """The counts worth choosing for model `m`: from the fewest that carry its demand within the compute margin
    on its fastest slot (and its `min_replicas`) up to where more replicas only cost memory, capped by the GPUs
    and slices that could hold one."""
    usable = problem.options.usable_milli
    served = problem.models[m]
    need = demand_units(served.requests_per_second)
    rates: dict[tuple, int] = {(t,): rate_units(r) for (mm, t), r in problem.rate.items() if mm == m}
    slots = sum(problem.types[t].count for (t,) in rates)
    for (mm, t, q), r in problem.slice_rate.items():
        if mm == m:
            rates[(t, q)] = rate_units(r)
            slots += problem.types[t].count * max(
                (layout.profile_counts.get(q, 0) for layout in problem.layouts.get(t, [])), default=0
            )
    fastest = max(rates.values())
    low = max(served.min_replicas, 1 if need else 0, -(-need // (fastest * usable)))
    high = max(low, min(slots, max(2 * low, low + EXTRA_REPLICAS)))
    loads = {key: [_load(need, rate, count, usable) for count in range(high + 1)] for key, rate in rates.items()}
    return Menu(low, high, loads)


def _load(need: int, rate: int, count: int, usable: int) -> int:
    """Thousandths of a GPU each of `count` replicas takes to carry `need` together; usable + 1 when it cannot."""
    if count == 0:
        return 0 if need == 0 else usable + 1
    return min(usable + 1, -(-need // (rate * count)))


def follows_menu(problem: Problem, aggregate: Aggregate) -> bool:
    """Whether `aggregate` (first-fit decreasing's plan, say) stays feasible when each replica takes the load its
    model's replica count gives it: only then may its cost cap the solver's."""
    counts = aggregate.replica_counts()
    menus = {m: replica_menu(problem, m) for m in range(len(problem.models))}
    usable = problem.options.usable_milli

    def load(m: int, key: tuple) -> int:
        menu, count = menus[m], counts.get(m, 0)
        return menu.load[key][count] if menu.low <= count <= menu.high else usable + 1

    shared = all(sum(load(m, (t,)) for m in pattern) <= usable for (t, pattern), n in aggregate.shared.items() if n)
    return shared and all(load(m, (t, q)) <= usable for (t, q, m), n in aggregate.slices.items() if n)
