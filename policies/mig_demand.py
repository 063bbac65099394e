"""The MIG profiles actually asked for lately, for slice fit to value what is asked, not fixed weights.

A fixed value per profile size keeps large instances placeable even when nobody asks for them, and keeps
carving small ones where they block the large ones that are asked. `MigDemandTracker` counts the requests of each
profile with an exponential decay (a request `half_life_s` old counts half), and `MigMix` is its frozen reading,
which the decision core receives with the typical shapes (`TypicalShapes.mig_mix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

PRECISION = 0.01
"""The step a learnt share is kept to."""


@dataclass(frozen=True)
class MigMix:
    """Share of recent MIG requests per profile name (shares sum to 1 over the profiles seen)."""

    shares: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, weights: dict[str, float]) -> MigMix:
        """A mix from any non-negative weights per profile, normalised and kept to `PRECISION` (empty when they sum
        to 0): a mix known to the percent decides as well as an exact one, and the same mix recurs, so decisions
        made under it are cached."""
        total = sum(w for w in weights.values() if w > 0)
        if total <= 0:
            return cls(())
        shares = ((name, round(w / total / PRECISION) * PRECISION) for name, w in weights.items() if w > 0)
        return cls(tuple(sorted((name, share) for name, share in shares if share > 0)))

    @cached_property
    def _by_name(self) -> dict[str, float]:
        return dict(self.shares)

    def share(self, profile: str) -> float:
        return self._by_name.get(profile, 0.0)

    def shares_of(self, profiles: tuple[str, ...]) -> tuple[float, ...]:
        """The shares of `profiles`, in their order (0 for a profile not asked lately)."""
        by_name = self._by_name
        return tuple(by_name.get(name, 0.0) for name in profiles)


@dataclass
class MigDemandTracker:
    """Recency-weighted request counts per MIG profile: every request adds 1, every count halves each
    `half_life_s`. Rejected requests count too: they are demand the layout failed."""

    half_life_s: float = 3600.0
    tolerance: float = 0.02
    _reading: MigMix | None = None
    _weights: dict[str, float] = field(default_factory=dict)
    _at_s: float = 0.0

    def observe(self, profile: str, now_s: float) -> None:
        self._decay_to(now_s)
        self._weights[profile] = self._weights.get(profile, 0.0) + 1.0

    def mix(self) -> MigMix:
        """The current mix; the last reading is kept while no share has moved by more than `tolerance`, so the
        decisions made under it, and the evaluations cached for it, stay put while demand does."""
        current = MigMix.of(self._weights)
        last = self._reading
        names = {n for n, _ in current.shares} | ({n for n, _ in last.shares} if last else set())
        if last is None or any(abs(current.share(n) - last.share(n)) > self.tolerance for n in names):
            self._reading = current
            return current
        return last

    def _decay_to(self, now_s: float) -> None:
        if now_s > self._at_s:
            factor = math.exp2(-(now_s - self._at_s) / self.half_life_s)
            for name in self._weights:
                self._weights[name] *= factor
            self._at_s = now_s
