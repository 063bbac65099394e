"""The planning problem in the form both solvers read: GPUs grouped into interchangeable types, the models each
type can serve and how fast, the sets of models one GPU may share (patterns) and the MIG layouts a GPU may take.

Identical GPUs are interchangeable, so the solvers decide how many GPUs of each type take each pattern or layout,
not which GPU: the model's size follows the number of types, patterns and models, not the number of GPUs or
replicas (the symmetry of identical GPUs that CP-SAT would otherwise explore is gone).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np

from policies.colocation.types import FleetGpu, PlanError, PlannerOptions, ServedModel
from policies.mig import MIG_TABLES

Placement = tuple[str, int]  # (MIG profile, start slot)
MAX_PATTERNS_PER_TYPE = 20_000  # listed at most; beyond, the solver gets a selection of these
# What the solver is given per GPU type, each pattern of k models counted k**3: k load terms in each of about k
# constraints, and the search grows faster still with k. Measured on 2 cores, 48 models (11,018 patterns): from
# all of them or the 3,000 fullest CP-SAT found no plan in 8 s, from the 1,500 fullest only first-fit
# decreasing's, from the 600 to 960 fullest (30,000 to 45,000) a better one; the genai-serving pods' 3,000 to
# 3,800 patterns (mostly pairs: 27,000 to 36,000) it solves to optimality whole.
SOLVER_TERMS_PER_TYPE = 45_000


@dataclass(frozen=True)
class GpuType:
    """GPUs that are the same to the planner: model, memory, price and MIG mode (and fixed layout, if any)."""

    key: int
    model: str
    memory_mib: int
    price_per_hour: float
    mig_table: str | None
    fixed_layout: tuple[Placement, ...] | None
    gpus: tuple[FleetGpu, ...]

    @property
    def count(self) -> int:
        return len(self.gpus)


@dataclass(frozen=True)
class Layout:
    """A maximal set of MIG instances on one GPU, and how many instances of each profile it holds."""

    placements: tuple[Placement, ...]

    @property
    def profile_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for profile, _ in self.placements:
            counts[profile] += 1
        return dict(counts)


@dataclass
class Problem:
    models: list[ServedModel]
    types: list[GpuType]
    options: PlannerOptions
    # (model, type) -> requests/s of one replica on a whole GPU of the type; absent when it cannot run there
    rate: dict[tuple[int, int], float]
    # (model, type, profile) -> requests/s of one replica on one slice
    slice_rate: dict[tuple[int, int, str], float]
    layouts: dict[int, list[Layout]]  # MIG type -> layouts a GPU of it may take
    apart: set[tuple[int, int]]  # model pairs that must not share a GPU

    def memory(self, m: int) -> int:
        return self._memories[m]

    @cached_property
    def smallest_memory(self) -> int:
        return min(self._memories, default=0)

    @cached_property
    def some_without_demand(self) -> bool:
        """Whether a replica may carry no load (a model with no demand): it fits beside any compute."""
        return any(demand_units(served.requests_per_second) == 0 for served in self.models)

    @cached_property
    def _memories(self) -> list[int]:
        """Each model's replica memory, read once: first-fit decreasing asks millions of times at 4,000 GPUs."""
        return [served.spec.memory_mib for served in self.models]

    @cached_property
    def patterns(self) -> dict[int, list[tuple[int, ...]]]:
        """Shared (non-MIG) type -> the sets of model indices one GPU of it may hold, as the solver gets them:
        all of them, or (see `patterns_complete`) the fullest by memory and every model alone when there are more
        than it can search in time. Listed only when the solver asks: the baselines and first-fit decreasing do
        without."""
        return self._listing[0]

    @property
    def patterns_complete(self) -> bool:
        """Whether `patterns` lists every way to share each GPU type: only then is the solver's bound the
        problem's, and its optimum the problem's optimum."""
        return self._listing[1]

    @cached_property
    def _listing(self) -> tuple[dict[int, list[tuple[int, ...]]], bool]:
        out: dict[int, list[tuple[int, ...]]] = {}
        complete = True
        for t in self.types:
            if t.mig_table is None:
                listed, whole = _patterns(self, t)
                out[t.key], kept = _selection(self, t, listed)
                complete = complete and whole and kept
        return out, complete


def _selection(problem: Problem, t: GpuType, listed: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], bool]:
    """The patterns the solver can search in time: all, or every model alone and then the fullest by memory
    (a full GPU is what a cheap plan is made of) until SOLVER_TERMS_PER_TYPE. The flag: whether all were kept."""
    if sum(len(p) ** 3 for p in listed) <= SOLVER_TERMS_PER_TYPE:
        return listed, True
    chosen: list[tuple[int, ...]] = [(m,) for m in range(len(problem.models)) if (m, t.key) in problem.rate]
    terms = len(chosen)
    for pattern in sorted(listed, key=lambda p: (-sum(problem.memory(m) for m in p), p)):
        if len(pattern) > 1 and terms + len(pattern) ** 3 <= SOLVER_TERMS_PER_TYPE:
            chosen.append(pattern)
            terms += len(pattern) ** 3
    return chosen, False


def group_types(fleet: Sequence[FleetGpu]) -> list[GpuType]:
    groups: dict[tuple, list[FleetGpu]] = defaultdict(list)
    for gpu in fleet:
        groups[(gpu.model, gpu.memory_mib, gpu.price_per_hour, gpu.mig_table, gpu.mig_layout)].append(gpu)
    types = []
    for key, ((model, memory, price, table, layout), gpus) in enumerate(
        sorted(groups.items(), key=lambda kv: kv[0][:3])
    ):
        types.append(GpuType(key, model, memory, price, table, layout, tuple(sorted(gpus, key=_gpu_order))))
    return types


def _gpu_order(gpu: FleetGpu) -> tuple[str, int]:
    return gpu.node, gpu.index


@cache
def maximal_layouts(table_name: str) -> tuple[Layout, ...]:
    """Every way to fill a GPU with MIG instances so that no further instance fits, one per profile mix."""
    table = MIG_TABLES[table_name]
    options = [(p, s) for p in table.profiles for s in p.starts]
    found: dict[tuple[tuple[str, int], ...], Layout] = {}

    def extend(first: int, occupied: int, chosen: list[Placement]) -> None:
        extended = False
        for i in range(first, len(options)):
            profile, start = options[i]
            if profile.mask_at(start) & occupied:
                continue
            extended = True
            chosen.append((profile.name, start))
            extend(i + 1, occupied | profile.mask_at(start), chosen)
            chosen.pop()
        if not extended and all(
            profile.mask_at(start) & occupied for profile, start in options
        ):  # maximal: nothing else fits anywhere
            counts = tuple(sorted(Layout(tuple(chosen)).profile_counts.items()))
            found.setdefault(counts, Layout(tuple(sorted(chosen, key=lambda p: p[1]))))

    extend(0, 0, [])
    return tuple(found.values())


def correlated_pairs(histories: Sequence[np.ndarray], threshold: float) -> set[tuple[int, int]]:
    """Pairs of models whose request rates rise and fall together (Pearson correlation above `threshold` over
    their common recent history): their peaks would meet on a shared GPU."""
    pairs: set[tuple[int, int]] = set()
    for a in range(len(histories)):
        for b in range(a + 1, len(histories)):
            n = min(len(histories[a]), len(histories[b]))
            if n < 3:
                continue
            x, y = histories[a][-n:], histories[b][-n:]
            if np.std(x) == 0 or np.std(y) == 0:
                continue
            if float(np.corrcoef(x, y)[0, 1]) > threshold:
                pairs.add((a, b))
    return pairs


def _shareable(problem_models: list[ServedModel], apart: set[tuple[int, int]], chosen: tuple[int, ...], m: int) -> bool:
    if any(problem_models[c].interactive != problem_models[m].interactive for c in chosen):
        return False
    return not any((min(c, m), max(c, m)) in apart for c in chosen)


def _patterns(problem: Problem, t: GpuType) -> tuple[list[tuple[int, ...]], bool]:
    """Sets of distinct models whose replicas fit one GPU together (one replica of a model per GPU: a second
    replica of the same model on the same GPU adds no compute, only memory), up to MAX_PATTERNS_PER_TYPE; and
    whether that is all of them."""
    eligible = [m for m in range(len(problem.models)) if (m, t.key) in problem.rate]
    limit = problem.options.max_replicas_per_gpu
    out: list[tuple[int, ...]] = []

    def extend(start: int, chosen: tuple[int, ...], memory: int) -> bool:
        if chosen:
            if len(out) == MAX_PATTERNS_PER_TYPE:
                return False
            out.append(chosen)
        if len(chosen) == limit:
            return True
        for i in range(start, len(eligible)):
            m = eligible[i]
            fits = memory + problem.memory(m) <= t.memory_mib
            if (
                fits
                and _shareable(problem.models, problem.apart, chosen, m)
                and not extend(i + 1, (*chosen, m), memory + problem.memory(m))
            ):
                return False
        return True

    whole = extend(0, (), 0)
    return out, whole


def build_problem(
    models: Sequence[ServedModel], fleet: Sequence[FleetGpu], options: PlannerOptions, histories: Sequence[np.ndarray]
) -> Problem:
    """Group the fleet, read each model's rate on each GPU type and slice, and list the MIG layouts.

    Raises `PlanError` naming every model that fits no GPU or slice of the fleet."""
    types = group_types(fleet)
    rate: dict[tuple[int, int], float] = {}
    slice_rate: dict[tuple[int, int, str], float] = {}
    for m, served in enumerate(models):
        for t in types:
            if t.mig_table is None:
                r = served.spec.requests_per_second(t.model)
                if r is not None and served.spec.memory_mib <= t.memory_mib:
                    rate[(m, t.key)] = r
                continue
            per_slice_mib = t.memory_mib / 8
            for profile in MIG_TABLES[t.mig_table].profiles:
                r = served.spec.requests_per_second(t.model, profile.name)
                if r is not None and served.spec.memory_mib <= profile.memory_slices * per_slice_mib:
                    slice_rate[(m, t.key, profile.name)] = r
    homeless = [
        f"{s.name} ({s.spec.memory_mib} MiB)"
        for m, s in enumerate(models)
        if not any(k[0] == m for k in rate) and not any(k[0] == m for k in slice_rate)
    ]
    if homeless:
        kinds = sorted({t.model for t in types})
        raise PlanError(f"no GPU or MIG slice of the fleet ({', '.join(kinds)}) can serve: {', '.join(homeless)}")
    apart = correlated_pairs(histories, options.correlation_threshold) if histories else set()
    layouts = {
        t.key: [Layout(t.fixed_layout)] if t.fixed_layout is not None else list(maximal_layouts(t.mig_table))
        for t in types
        if t.mig_table is not None
    }
    return Problem(list(models), types, options, rate, slice_rate, layouts, apart)


def demand_units(requests_per_second: float) -> int:
    """Demand in the solvers' integer unit: thousandths of a GPU times hundredths of a request per second."""
    return math.ceil(requests_per_second * 100_000 - 1e-6)


def rate_units(requests_per_second: float) -> int:
    """Requests/s one thousandth of a GPU's (or slice's) compute carries, in hundredths."""
    return max(1, round(requests_per_second * 100))
