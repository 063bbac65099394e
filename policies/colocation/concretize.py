"""From counts to named GPUs: which GPU of a type takes which pattern (or layout), keeping replicas where they
run now and spreading each model's replicas over nodes; each GPU's load is its even part of the pattern's."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from policies.colocation.aggregate import Aggregate, Pattern
from policies.colocation.problem import GpuType, Problem
from policies.colocation.types import CurrentReplica, FleetGpu, PlannedReplica

VLLM_MEMORY_UTILIZATION = 0.9  # vLLM's default share of a GPU (or slice) for one server alone
SPREAD_SCAN = 64  # free GPUs looked at for one on a node the model is not yet on


def _split(total: int, parts: int) -> list[int]:
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def memory_fractions(memories: Sequence[int], gpu_memory_mib: int) -> list[float]:
    """`--gpu-memory-utilization` per replica on one GPU: vLLM's usual 0.9 of the GPU shared in proportion to
    the memory each needs, never less than that need (then the GPU is full and each gets exactly its need)."""
    total = sum(memories)
    usable = VLLM_MEMORY_UTILIZATION * gpu_memory_mib
    if total <= usable:
        return [int(1000 * VLLM_MEMORY_UTILIZATION * m / total) / 1000 for m in memories]
    return [-(-1000 * m // gpu_memory_mib) / 1000 for m in memories]


class _Picker:
    """Free GPUs of one type in node order, found fast by the models they run now."""

    def __init__(self, gpus: Sequence[FleetGpu], running: dict[tuple[str, int], set[str]]) -> None:
        self.free = list(gpus)
        self.taken: set[tuple[str, int]] = set()
        self.running = running
        self.by_model: dict[str, list[FleetGpu]] = defaultdict(list)
        for gpu in gpus:
            for model in running.get((gpu.node, gpu.index), ()):
                self.by_model[model].append(gpu)
        self.cursor = 0

    def _is_free(self, gpu: FleetGpu) -> bool:
        return (gpu.node, gpu.index) not in self.taken

    def take(self, models: set[str], on_node: dict[str, set[str]]) -> FleetGpu:
        """The free GPU that runs most of `models` now; else an idle one on a node without them; else the next."""
        best: FleetGpu | None = None
        best_overlap = 0
        for model in models:
            for gpu in self.by_model.get(model, ()):
                if self._is_free(gpu):
                    overlap = len(models & self.running[(gpu.node, gpu.index)])
                    if overlap > best_overlap:
                        best, best_overlap = gpu, overlap
        if best is None:
            best = self._next_idle(models, on_node)
        self.taken.add((best.node, best.index))
        return best

    def _next_idle(self, models: set[str], on_node: dict[str, set[str]]) -> FleetGpu:
        while not self._is_free(self.free[self.cursor]):
            self.cursor += 1
        fallback = None
        scanned = 0
        for gpu in self.free[self.cursor :]:
            if not self._is_free(gpu):
                continue
            if fallback is None:
                fallback = gpu
            idle = not self.running.get((gpu.node, gpu.index))
            if idle and not models & on_node[gpu.node]:
                return gpu
            scanned += 1
            if scanned >= SPREAD_SCAN:
                break
        assert fallback is not None
        return fallback


def concretize(
    problem: Problem, aggregate: Aggregate, current: Iterable[CurrentReplica]
) -> tuple[list[PlannedReplica], int, float]:
    """Replicas on named GPUs, the number of running replicas the plan stops or moves, and the smallest share of
    compute left free on any used GPU or slice."""
    running: dict[tuple[str, int], set[str]] = defaultdict(set)
    current = list(current)
    for replica in current:
        running[(replica.node, replica.gpu)].add(replica.model)
    on_node: dict[str, set[str]] = defaultdict(set)
    replicas: list[PlannedReplica] = []
    for t in problem.types:
        picker = _Picker(t.gpus, running)
        if t.mig_table is None:
            _place_shared(problem, aggregate, t, picker, on_node, replicas)
        else:
            _place_mig(problem, aggregate, t, picker, on_node, replicas)
    planned = {(r.model, r.node, r.gpu) for r in replicas}
    moves = sum((c.model, c.node, c.gpu) not in planned for c in current)
    return replicas, moves, _min_headroom(replicas)


def _place_shared(
    problem: Problem,
    aggregate: Aggregate,
    t: GpuType,
    picker: _Picker,
    on_node: dict[str, set[str]],
    out: list[PlannedReplica],
) -> None:
    instances = sorted(((p, n) for (key, p), n in aggregate.shared.items() if key == t.key and n), key=_largest_first)
    for pattern, count in instances:
        names = {problem.models[m].name for m in pattern}
        loads = {m: _split(aggregate.shared_load.get((t.key, pattern, m), 0), count) for m in pattern}
        fractions = memory_fractions([problem.memory(m) for m in pattern], t.memory_mib)
        for i in range(count):
            gpu = picker.take(names, on_node)
            on_node[gpu.node] |= names
            for m, fraction in zip(pattern, fractions, strict=True):
                out.append(_replica(problem, m, gpu, fraction, loads[m][i], problem.rate[(m, t.key)]))


def _largest_first(item: tuple[Pattern, int]) -> tuple[int, Pattern]:
    return -len(item[0]), item[0]


def _place_mig(
    problem: Problem,
    aggregate: Aggregate,
    t: GpuType,
    picker: _Picker,
    on_node: dict[str, set[str]],
    out: list[PlannedReplica],
) -> None:
    free: dict[str, list[tuple[FleetGpu, int]]] = defaultdict(list)  # profile -> (GPU, start) not yet given out
    for (key, index), count in sorted(aggregate.layouts.items()):
        if key != t.key:
            continue
        layout = problem.layouts[t.key][index]
        for _ in range(count):
            gpu = picker.take(set(), on_node)
            for profile, start in layout.placements:
                free[profile].append((gpu, start))
    for (key, profile, m), count in sorted(aggregate.slices.items()):
        if key != t.key or not count:
            continue
        name = problem.models[m].name
        loads = _split(aggregate.slice_load.get((key, profile, m), 0), count)
        for i in range(count):
            slots = free[profile]
            at = next((j for j, (g, _) in enumerate(slots) if name not in on_node[g.node]), 0)
            gpu, start = slots.pop(at)
            on_node[gpu.node].add(name)
            rate = problem.slice_rate[(m, key, profile)]
            out.append(_replica(problem, m, gpu, VLLM_MEMORY_UTILIZATION, loads[i], rate, profile, start))


def _replica(
    problem: Problem,
    m: int,
    gpu: FleetGpu,
    memory_fraction: float,
    load_milli: int,
    rate: float,
    mig_profile: str | None = None,
    mig_start: int | None = None,
) -> PlannedReplica:
    """Model `m` on `gpu` (or its slice), carrying `load_milli` of the compute where one replica serves `rate`."""
    return PlannedReplica(
        model=problem.models[m].name,
        node=gpu.node,
        gpu=gpu.index,
        gpu_model=gpu.model,
        memory_mib=problem.memory(m),
        memory_fraction=memory_fraction,
        load_milli=load_milli,
        requests_per_second=load_milli / 1000 * rate,
        mig_profile=mig_profile,
        mig_start=mig_start,
    )


def _min_headroom(replicas: Sequence[PlannedReplica]) -> float:
    load: dict[tuple[str, int, int | None], int] = defaultdict(int)
    for r in replicas:
        load[(r.node, r.gpu, r.mig_start if r.mig_profile else None)] += r.load_milli
    return 1.0 - max(load.values()) / 1000 if load else 1.0
