"""The co-location planner: CP-SAT over GPU types, patterns and MIG layouts, in two lexicographic stages.

Stage 1 minimises the fleet's cost per hour, then the replicas moved away from where they run now (as a second
term weighted below one cent). It chooses each model's replica count from a menu (`menu.py`) and gives every
replica the load that count implies, so the cheapest plan already has the equal loads a Service produces; the
free per-pattern loads of the aggregate relaxation are kept beside them only for their tight bound. Stage 2
keeps stage 1's GPUs and replicas and re-spreads each model's load to maximise the smallest compute headroom.
The first-fit-decreasing plan is the hint, an upper bound on cost (when its loads follow the menu) and the
answer when the solver finds nothing in time. Everything is integer, as CP-SAT needs: loads in thousandths
of a GPU, rates in hundredths of a request per second, prices in cents.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from ortools.sat.python import cp_model

from policies.colocation.aggregate import Aggregate, Pattern
from policies.colocation.concretize import concretize
from policies.colocation.greedy import first_fit_decreasing
from policies.colocation.menu import Menu, follows_menu, replica_menu
from policies.colocation.problem import Problem, build_problem, demand_units, rate_units
from policies.colocation.types import CurrentReplica, FleetGpu, Plan, PlanError, PlannerOptions, ServedModel
from policies.inventory import MILLI_PER_GPU
from policies.mig import MIG_TABLES

HEADROOM_SHARE = 0.2  # of the time limit, for stage 2
# Stage 1 on two workers or fewer runs one full-problem worker with the tighter LP (linearization level 2) rather
# than two that split the cores between the level-1 LP and local search: on the genai-serving pods (a pairing
# problem) the former proved the optimum in 3.5 s, the latter proved nothing in 8 s.
STAGE1_LINEARIZATION = 2


def _cents(price: float) -> int:
    return round(price * 100)


class _Stage1:
    """The variables of stage 1, kept so that the solution can be read back and stage 2 can fix them."""

    def __init__(self, problem: Problem, current: Sequence[CurrentReplica]) -> None:
        self.problem = problem
        self.model = cp_model.CpModel()
        self.n: dict[tuple[int, Pattern], cp_model.IntVar] = {}
        self.z: dict[tuple[int, Pattern, int], cp_model.IntVar] = {}
        self.layouts: dict[tuple[int, int], cp_model.IntVar] = {}
        self.s: dict[tuple[int, str, int], cp_model.IntVar] = {}
        self.u: dict[tuple[int, str, int], cp_model.IntVar] = {}
        self.menus: dict[int, Menu] = {}
        self.count: dict[int, cp_model.IntVar] = {}  # model -> replicas
        self.load: dict[tuple[int, tuple], cp_model.IntVar] = {}  # (model, (type,) or (type, profile)) -> milli
        self.used: dict[tuple, cp_model.IntVar] = {}  # (type, pattern) or (type, profile, model) -> taken at all
        self._menus()
        self._build()
        self.cost = sum(
            _cents(problem.types[t].price_per_hour) * v for (t, _), v in [*self.n.items(), *self.layouts.items()]
        )
        keep, self.keep_weight = self._keep_terms(current)
        self.model.Minimize(self.cost * self.keep_weight - keep)

    def _menus(self) -> None:
        """Each model's replica count and, through the menu's table, the load of each of its replicas per slot."""
        for m in range(len(self.problem.models)):
            self.menus[m] = menu = replica_menu(self.problem, m)
            self.count[m] = count = self.model.NewIntVar(menu.low, menu.high, f"replicas_{m}")
            for key, table in menu.load.items():
                self.load[(m, key)] = load = self.model.NewIntVar(0, max(table), f"load_{m}_{key}")
                self.model.AddElement(count, table, load)

    def _equal_load(self, key: tuple, gpus: cp_model.IntVar, most: int, loads: list) -> None:
        """`gpus` > 0 only when `loads` (one replica of each model there) fit within the margin together."""
        used = self.model.NewBoolVar(f"used_{key}")
        self.used[key] = used
        self.model.Add(gpus <= most * used)
        self.model.Add(sum(loads) <= self.problem.options.usable_milli).OnlyEnforceIf(used)

    def _build(self) -> None:
        problem, model = self.problem, self.model
        usable = problem.options.usable_milli
        patterns = problem.patterns
        assert patterns is not None
        for t in problem.types:
            used = []
            for pattern in patterns.get(t.key, ()):
                n = model.NewIntVar(0, t.count, f"n_{t.key}_{pattern}")
                self.n[(t.key, pattern)] = n
                loads = []
                for m in pattern:
                    z = model.NewIntVar(0, t.count * usable, f"z_{t.key}_{pattern}_{m}")
                    self.z[(t.key, pattern, m)] = z
                    loads.append(z)
                model.Add(sum(loads) <= usable * n)
                self._equal_load((t.key, pattern), n, t.count, [self.load[(m, (t.key,))] for m in pattern])
                used.append(n)
            for index in range(len(problem.layouts.get(t.key, ()))):
                v = model.NewIntVar(0, t.count, f"l_{t.key}_{index}")
                self.layouts[(t.key, index)] = v
                used.append(v)
            model.Add(sum(used) <= t.count)
            self._slices(t.key, t.count, usable)
        self._demand()

    def _slices(self, t: int, count: int, usable: int) -> None:
        problem, model = self.problem, self.model
        layouts = problem.layouts.get(t, [])
        by_profile: dict[str, list[int]] = defaultdict(list)
        for m, tt, q in problem.slice_rate:
            if tt == t:
                by_profile[q].append(m)
        for q, models in by_profile.items():
            most = count * max((layout.profile_counts.get(q, 0) for layout in layouts), default=0)
            available = sum(layout.profile_counts.get(q, 0) * self.layouts[(t, i)] for i, layout in enumerate(layouts))
            taken = []
            for m in models:
                s = model.NewIntVar(0, most, f"s_{t}_{q}_{m}")
                u = model.NewIntVar(0, most * usable, f"u_{t}_{q}_{m}")
                model.Add(u <= usable * s)
                self.s[(t, q, m)], self.u[(t, q, m)] = s, u
                self._equal_load((t, q, m), s, most, [self.load[(m, (t, q))]])
                taken.append(s)
            model.Add(sum(taken) <= available)

    def _demand(self) -> None:
        problem, model = self.problem, self.model
        carried: dict[int, list] = defaultdict(list)
        replicas: dict[int, list] = defaultdict(list)
        for (t, pattern, m), z in self.z.items():
            carried[m].append(rate_units(problem.rate[(m, t)]) * z)
            replicas[m].append(self.n[(t, pattern)])
        for (t, q, m), u in self.u.items():
            carried[m].append(rate_units(problem.slice_rate[(m, t, q)]) * u)
            replicas[m].append(self.s[(t, q, m)])
        for m, served in enumerate(problem.models):
            model.Add(sum(carried[m]) >= demand_units(served.requests_per_second))
            model.Add(sum(replicas[m]) == self.count[m])

    def _keep_terms(self, current: Sequence[CurrentReplica]) -> tuple[cp_model.LinearExpr | int, int]:
        """GPUs that run a pattern now and keep it in the plan, weighted by their replicas; and the weight that
        puts one cent above every possible keep."""
        problem = self.problem
        index = {served.name: m for m, served in enumerate(problem.models)}
        type_of = {(g.node, g.index): t.key for t in problem.types if t.mig_table is None for g in t.gpus}
        running: dict[tuple[str, int], set[int]] = defaultdict(set)
        for replica in current:
            if replica.mig_profile is None and replica.model in index and (replica.node, replica.gpu) in type_of:
                running[(replica.node, replica.gpu)].add(index[replica.model])
        now: dict[tuple[int, Pattern], int] = defaultdict(int)
        for gpu, models in running.items():
            key = (type_of[gpu], tuple(sorted(models)))
            if key in self.n:
                now[key] += 1
        terms = []
        for key, count in now.items():
            keep = self.model.NewIntVar(0, count, f"keep_{key}")
            self.model.Add(keep <= self.n[key])
            terms.append(len(key[1]) * keep)
        weight = 1 + sum(len(key[1]) * count for key, count in now.items())
        return sum(terms), weight

    def hint(self, greedy: Aggregate) -> None:
        for key, var in self.n.items():
            self.model.AddHint(var, greedy.shared.get(key, 0))
        for key, var in self.z.items():
            self.model.AddHint(var, greedy.shared_load.get(key, 0))
        for key, var in self.layouts.items():
            self.model.AddHint(var, greedy.layouts.get(key, 0))
        for key, var in self.s.items():
            self.model.AddHint(var, greedy.slices.get(key, 0))
        for key, var in self.u.items():
            self.model.AddHint(var, greedy.slice_load.get(key, 0))
        counts = greedy.replica_counts()
        for m, count in counts.items():
            self.model.AddHint(self.count[m], count)
        for (m, key), var in self.load.items():
            if self.menus[m].low <= counts.get(m, 0) <= self.menus[m].high:
                self.model.AddHint(var, self.menus[m].load[key][counts[m]])
        for key, var in self.used.items():
            self.model.AddHint(var, int(bool(greedy.shared.get(key, 0) or greedy.slices.get(key, 0))))

    def read(self, solver: cp_model.CpSolver) -> Aggregate:
        """The chosen counts, each replica at the load its model's replica count gives it."""

        def values(variables: dict) -> dict:
            return {k: v for k, var in variables.items() if (v := solver.Value(var))}

        shared, slices = values(self.n), values(self.s)
        shared_load = {
            (t, pattern, m): n * solver.Value(self.load[(m, (t,))])
            for (t, pattern), n in shared.items()
            for m in pattern
        }
        slice_load = {(t, q, m): n * solver.Value(self.load[(m, (t, q))]) for (t, q, m), n in slices.items()}
        return Aggregate(shared, shared_load, values(self.layouts), slices, slice_load)


def _spread_headroom(problem: Problem, chosen: Aggregate, time_limit_s: float, workers: int) -> Aggregate | None:
    """Stage 2: the same GPUs, layouts and replicas, every replica of a model on one GPU type (or slice profile)
    carrying the same load, as a Service that spreads requests evenly makes them do; the loads chosen so that the
    smallest headroom of any used GPU or slice is as large as it can be. None when equal loads do not fit."""
    model = cp_model.CpModel()
    usable = problem.options.usable_milli
    headroom = model.NewIntVar(0, MILLI_PER_GPU, "headroom")
    carried: dict[int, list] = defaultdict(list)
    per_replica: dict[tuple[int, int], cp_model.IntVar] = {}  # (type, model) -> load of each replica there
    per_slice: dict[tuple[int, str, int], cp_model.IntVar] = {}

    def replica_load(t: int, m: int) -> cp_model.IntVar:
        if (t, m) not in per_replica:
            per_replica[(t, m)] = model.NewIntVar(0, usable, f"load_{t}_{m}")
        return per_replica[(t, m)]

    for (t, pattern), n in chosen.shared.items():
        loads = [replica_load(t, m) for m in pattern]
        model.Add(sum(loads) <= usable)
        model.Add(sum(loads) + headroom <= MILLI_PER_GPU)
        for m, load in zip(pattern, loads, strict=True):
            carried[m].append(n * rate_units(problem.rate[(m, t)]) * load)
    for (t, q, m), count in chosen.slices.items():
        per_slice[(t, q, m)] = load = model.NewIntVar(0, usable, f"slice_{t}_{q}_{m}")
        model.Add(load + headroom <= MILLI_PER_GPU)
        carried[m].append(count * rate_units(problem.slice_rate[(m, t, q)]) * load)
    for m, served in enumerate(problem.models):
        model.Add(sum(carried[m]) >= demand_units(served.requests_per_second))
    model.Maximize(headroom)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.1, time_limit_s)
    solver.parameters.num_workers = workers
    if solver.Solve(model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    shared_load = {
        (t, pattern, m): n * solver.Value(per_replica[(t, m)])
        for (t, pattern), n in chosen.shared.items()
        for m in pattern
    }
    slice_load = {key: count * solver.Value(per_slice[key]) for key, count in chosen.slices.items()}
    return Aggregate(dict(chosen.shared), shared_load, dict(chosen.layouts), dict(chosen.slices), slice_load)


def compute_lower_bound(problem: Problem) -> float:
    """Cost no plan can go below, without a solver: each model's demand at its cheapest rate per dollar."""
    price = {t.key: t.price_per_hour for t in problem.types}
    usable = problem.options.usable_milli / MILLI_PER_GPU
    total = 0.0
    for m, served in enumerate(problem.models):
        rates = [price[t] / (r * usable) for (mm, t), r in problem.rate.items() if mm == m]
        rates += [
            price[t] * _compute_share(problem, t, q) / (r * usable)
            for (mm, t, q), r in problem.slice_rate.items()
            if mm == m
        ]
        total += served.requests_per_second * min(rates)
    return total


def _compute_share(problem: Problem, t: int, q: str) -> float:
    """The share of a GPU's compute (and of its price) that one slice of profile `q` takes."""
    table = problem.types[t].mig_table
    assert table is not None
    profile = MIG_TABLES[table].profile(q)
    assert profile is not None
    return profile.compute_slices / 7


def plan_colocation(
    models: Sequence[ServedModel],
    fleet: Sequence[FleetGpu],
    options: PlannerOptions | None = None,
    current: Iterable[CurrentReplica] = (),
    histories: Sequence[np.ndarray] = (),
) -> Plan:
    """The cheapest placement of `models` on `fleet` that carries every model's demand within the compute margin,
    moving as few `current` replicas as that allows, with the load spread for the most headroom.

    `histories` (one request-rate series per model, same order) keep models that peak together apart. Raises
    `PlanError` when a model fits nowhere or the fleet cannot carry the demand."""
    return solve(build_problem(models, fleet, options or PlannerOptions(), histories), current)


def solve(problem: Problem, current: Iterable[CurrentReplica] = ()) -> Plan:
    """`plan_colocation` for a problem already built: callers that also measure baselines on it build it once."""
    started = time.monotonic()
    current = list(current)
    greedy, unplaced = first_fit_decreasing(problem)
    notes: list[str] = []
    chosen, method, bound = _solve(problem, greedy, unplaced, current, started, notes)
    bound = max(bound, compute_lower_bound(problem))
    replicas, moves, headroom = concretize(problem, chosen, current)
    notes.extend(_spread_notes(problem, replicas))
    cost = chosen.cost_per_hour(problem)
    return Plan(
        replicas=tuple(replicas),
        gpus_used=chosen.gpus_used(),
        cost_per_hour=cost,
        lower_bound_per_hour=min(bound, cost),
        method=method,
        solve_seconds=time.monotonic() - started,
        moves=moves,
        min_headroom=headroom,
        notes=tuple(notes),
    )


def _shortfall(unplaced: dict[str, float]) -> str:
    return ", ".join(f"{name} short by {rps:.2f} req/s" for name, rps in unplaced.items())


def _solve(
    problem: Problem,
    greedy: Aggregate,
    unplaced: dict[str, float],
    current: Sequence[CurrentReplica],
    started: float,
    notes: list[str],
) -> tuple[Aggregate, str, float]:
    """Both CP-SAT stages: the chosen counts and loads, how they were found, and the proven bound on cost."""
    options = problem.options
    complete = problem.patterns_complete
    if not complete:
        _add_patterns_of(problem, greedy)
        notes.append(
            f"{sum(len(p) for p in problem.patterns.values())} of the ways to share a GPU searched (the fullest, "
            "and first-fit decreasing's): the bound is the compute bound"
        )
    stage1 = _Stage1(problem, current)
    if not unplaced:
        stage1.hint(greedy)
        if follows_menu(problem, greedy):
            stage1.model.Add(stage1.cost <= _cents(greedy.cost_per_hour(problem)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = options.time_limit_s * (1 - HEADROOM_SHARE)
    solver.parameters.num_workers = options.workers if options.workers > 2 else 1
    solver.parameters.linearization_level = STAGE1_LINEARIZATION
    solver.parameters.random_seed = options.seed
    status = solver.Solve(stage1.model)
    if status == cp_model.INFEASIBLE and complete:
        raise PlanError(
            f"the fleet cannot carry the demand within a {options.margin:.0%} margin ({_shortfall(unplaced)})"
        )
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        chosen = stage1.read(solver)
        method = "cp-sat optimal" if status == cp_model.OPTIMAL and complete else "cp-sat feasible"
        bound = math.ceil(solver.BestObjectiveBound() / stage1.keep_weight - 1e-9) / 100 if complete else 0.0
        remaining = options.time_limit_s - (time.monotonic() - started)
        spread = _spread_headroom(
            problem, chosen, min(remaining, options.time_limit_s * HEADROOM_SHARE), options.workers
        )
        if spread is None:
            notes.append("replica loads left uneven: equal loads per model do not fit these GPUs (or time ran out)")
            return chosen, method, bound
        return spread, method, bound
    if unplaced:
        raise PlanError(
            f"no plan found in {options.time_limit_s:.0f} s; first-fit decreasing left {_shortfall(unplaced)}"
        )
    notes.append("the solver found no plan in time: first-fit decreasing")
    return greedy, "greedy", 0.0


def _add_patterns_of(problem: Problem, plan: Aggregate) -> None:
    """Give the solver the patterns of `plan` too, so that its hint is a solution of the model it searches."""
    for t, pattern in plan.shared:
        if pattern not in problem.patterns[t]:
            problem.patterns[t].append(pattern)


def _spread_notes(problem: Problem, replicas: Sequence) -> list[str]:
    nodes: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for r in replicas:
        nodes[r.model].add(r.node)
        counts[r.model] += 1
    wanted = problem.options.spread
    return [
        f"{model}: {len(nodes[model])} nodes for {count} replicas (spread {wanted} wanted)"
        for model, count in counts.items()
        if len(nodes[model]) < min(wanted, count)
    ]
