"""First-fit decreasing: the solver's hint, its fallback when the time runs out, and the baseline it must beat.

Models go largest first; each takes the GPU type (or MIG profile) that serves a request per second cheapest,
splits its load into the fewest replicas that stay within the compute margin, and puts each replica on the first
open GPU where memory, compute and the sharing rules allow, opening a GPU only when none does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from policies.colocation.aggregate import Aggregate
from policies.colocation.problem import GpuType, Problem, demand_units, rate_units
from policies.mig import MIG_TABLES, MigProfile, free_starts


@dataclass
class _OpenGpu:
    type_key: int
    models: list[int] = field(default_factory=list)
    loads: list[int] = field(default_factory=list)
    memory: int = 0
    occupied: int = 0  # MIG slices taken
    slices: list[tuple[str, int, int, int]] = field(default_factory=list)  # (profile, start, model, load)
    fixed_free: list[tuple[str, int]] | None = None  # a fixed layout's instances not yet used


def _options(problem: Problem, m: int) -> list[tuple[float, int, str | None]]:
    """(price per request/s, type, profile) for every place the model can run, cheapest first."""
    price = {t.key: t.price_per_hour for t in problem.types}
    options = [(price[t] / r, t, None) for (mm, t), r in problem.rate.items() if mm == m]
    for (mm, t, q), r in problem.slice_rate.items():
        if mm == m:
            table = problem.types[t].mig_table
            assert table is not None
            profile = MIG_TABLES[table].profile(q)
            assert profile is not None
            options.append((price[t] * profile.compute_slices / 7 / r, t, q))
    return sorted(options, key=lambda o: (o[0], o[1], o[2] or ""))


def first_fit_decreasing(problem: Problem) -> tuple[Aggregate, dict[str, float]]:
    """The greedy plan, and the requests per second of each model it could not place (empty when complete)."""
    usable = problem.options.usable_milli
    left = {t.key: t.count for t in problem.types}
    open_gpus: list[_OpenGpu] = []
    room: list[_OpenGpu] = []  # the open GPUs that may still take a replica: the only ones worth scanning
    unplaced: dict[str, float] = {}
    order = sorted(
        range(len(problem.models)), key=lambda m: (-problem.memory(m), -problem.models[m].requests_per_second)
    )
    for m in order:
        served = problem.models[m]
        need = demand_units(served.requests_per_second)  # in the solver's units, so the hint is feasible there
        replicas_needed = served.min_replicas
        for _, t, profile in _options(problem, m):
            rate = rate_units(problem.rate[(m, t)] if profile is None else problem.slice_rate[(m, t, profile)])
            load = -(-need // rate)  # thousandths of a GPU (or slice)
            replicas = max(replicas_needed, -(-load // usable))
            chunk = -(-load // replicas) if replicas else 0
            placed = 0
            for _ in range(replicas):
                if not _place(problem, open_gpus, room, left, problem.types[t], m, profile, chunk):
                    break
                placed += 1
            need = max(0, need - placed * chunk * rate)
            replicas_needed = max(0, replicas_needed - placed)
            if need == 0 and replicas_needed == 0:
                break
        if need or replicas_needed:
            unplaced[served.name] = need / demand_units(1.0)
    return _aggregate(problem, open_gpus), unplaced


def _place(
    problem: Problem,
    open_gpus: list[_OpenGpu],
    room: list[_OpenGpu],
    left: dict[int, int],
    t: GpuType,
    m: int,
    profile: str | None,
    load: int,
) -> bool:
    for i, gpu in enumerate(room):
        if gpu.type_key == t.key and _fits(problem, gpu, t, m, profile, load):
            _put(gpu, t, m, profile, load, problem)
            if _full(problem, gpu):
                del room[i]
            return True
    if left[t.key] == 0:
        return False
    gpu = _OpenGpu(t.key, fixed_free=list(t.fixed_layout) if t.fixed_layout is not None else None)
    if not _fits(problem, gpu, t, m, profile, load):
        return False
    left[t.key] -= 1
    open_gpus.append(gpu)
    _put(gpu, t, m, profile, load, problem)
    if not _full(problem, gpu):
        room.append(gpu)
    return True


def _full(problem: Problem, gpu: _OpenGpu) -> bool:
    """A shared GPU that no further replica can join: all its places taken, too little memory left for the
    smallest model, or all its compute taken (unless some replica carries no load)."""
    if gpu.fixed_free is not None or gpu.slices:
        return False
    return (
        len(gpu.models) >= problem.options.max_replicas_per_gpu
        or gpu.memory + problem.smallest_memory > problem.types[gpu.type_key].memory_mib
        or (sum(gpu.loads) >= problem.options.usable_milli and not problem.some_without_demand)
    )


def _mig_profile(t: GpuType, name: str) -> MigProfile:
    assert t.mig_table is not None
    profile = MIG_TABLES[t.mig_table].profile(name)
    assert profile is not None
    return profile


def _slot(gpu: _OpenGpu, t: GpuType, name: str) -> int | None:
    if gpu.fixed_free is not None:
        return next((s for p, s in gpu.fixed_free if p == name), None)
    starts = free_starts(_mig_profile(t, name), gpu.occupied)
    return starts[0] if starts else None


def _fits(problem: Problem, gpu: _OpenGpu, t: GpuType, m: int, profile: str | None, load: int) -> bool:
    if profile is not None:
        return _slot(gpu, t, profile) is not None
    if m in gpu.models or len(gpu.models) >= problem.options.max_replicas_per_gpu:
        return False
    if gpu.memory + problem.memory(m) > t.memory_mib or sum(gpu.loads) + load > problem.options.usable_milli:
        return False
    served = problem.models[m]
    return all(
        problem.models[o].interactive == served.interactive and (min(o, m), max(o, m)) not in problem.apart
        for o in gpu.models
    )


def _put(gpu: _OpenGpu, t: GpuType, m: int, profile: str | None, load: int, problem: Problem) -> None:
    if profile is None:
        gpu.models.append(m)
        gpu.loads.append(load)
        gpu.memory += problem.memory(m)
        return
    start = _slot(gpu, t, profile)
    assert start is not None
    if gpu.fixed_free is not None:
        gpu.fixed_free.remove((profile, start))
    gpu.occupied |= _mig_profile(t, profile).mask_at(start)
    gpu.slices.append((profile, start, m, load))


def _aggregate(problem: Problem, open_gpus: list[_OpenGpu]) -> Aggregate:
    out = Aggregate()
    shared: dict = defaultdict(int)
    for gpu in open_gpus:
        t = problem.types[gpu.type_key]
        if t.mig_table is None:
            order = sorted(range(len(gpu.models)), key=lambda i: gpu.models[i])
            pattern = tuple(gpu.models[i] for i in order)
            shared[(t.key, pattern)] += 1
            for i in order:
                key = (t.key, pattern, gpu.models[i])
                out.shared_load[key] = out.shared_load.get(key, 0) + gpu.loads[i]
            continue
        layout = _layout_index(problem, t, gpu)
        out.layouts[(t.key, layout)] = out.layouts.get((t.key, layout), 0) + 1
        for profile, _, m, load in gpu.slices:
            key = (t.key, profile, m)
            out.slices[key] = out.slices.get(key, 0) + 1
            out.slice_load[key] = out.slice_load.get(key, 0) + load
    out.shared = dict(shared)
    return out


def _layout_index(problem: Problem, t: GpuType, gpu: _OpenGpu) -> int:
    """The enumerated layout that holds this GPU's instances: fill its free slices first-fit until nothing more
    fits, then find the layout with the same instances per profile."""
    layouts = problem.layouts[t.key]
    if t.fixed_layout is not None:
        return 0
    occupied = gpu.occupied
    counts: dict[str, int] = defaultdict(int)
    for profile, *_ in gpu.slices:
        counts[profile] += 1
    assert t.mig_table is not None
    for profile in reversed(MIG_TABLES[t.mig_table].profiles):
        while starts := free_starts(profile, occupied):
            occupied |= profile.mask_at(starts[0])
            counts[profile.name] += 1
    for i, layout in enumerate(layouts):
        if layout.profile_counts == dict(counts):
            return i
    raise AssertionError(f"no enumerated MIG layout has {dict(counts)}")
