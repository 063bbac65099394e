"""A plan in counts: how many GPUs of each type take each pattern or MIG layout, and the load each model gets
there. Both solvers answer in this form; `concretize` turns it into replicas on named GPUs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from policies.colocation.problem import Problem

Pattern = tuple[int, ...]


@dataclass
class Aggregate:
    shared: dict[tuple[int, Pattern], int] = field(default_factory=dict)  # (type, pattern) -> GPUs
    shared_load: dict[tuple[int, Pattern, int], int] = field(default_factory=dict)  # (type, pattern, model) -> milli
    layouts: dict[tuple[int, int], int] = field(default_factory=dict)  # (type, layout index) -> GPUs
    slices: dict[tuple[int, str, int], int] = field(default_factory=dict)  # (type, profile, model) -> slices
    slice_load: dict[tuple[int, str, int], int] = field(default_factory=dict)  # (type, profile, model) -> milli

    def gpus_used(self) -> int:
        return sum(self.shared.values()) + sum(self.layouts.values())

    def cost_per_hour(self, problem: Problem) -> float:
        price = {t.key: t.price_per_hour for t in problem.types}
        return sum(price[t] * n for (t, _), n in self.shared.items()) + sum(
            price[t] * n for (t, _), n in self.layouts.items()
        )

    def carried(self, problem: Problem) -> dict[int, float]:
        """Requests per second each model's replicas carry at the planned loads."""
        out: dict[int, float] = defaultdict(float)
        for (t, _, m), load in self.shared_load.items():
            out[m] += load / 1000 * problem.rate[(m, t)]
        for (t, q, m), load in self.slice_load.items():
            out[m] += load / 1000 * problem.slice_rate[(m, t, q)]
        return dict(out)

    def replica_counts(self) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for (_, pattern), n in self.shared.items():
            for m in pattern:
                out[m] += n
        for (_, _, m), n in self.slices.items():
            out[m] += n
        return dict(out)
