"""Exponential backoff with jitter: reconnecting watches, retrying NVML and Node updates without a tight loop."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays double from `initial_s` up to `max_s`; each is half fixed, half random so agents do not align."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 300.0, rng: Callable[[], float] = random.random) -> None:
        self.initial_s, self.max_s, self._rng, self._attempt = initial_s, max_s, rng, 0

    def next(self) -> float:
        delay = min(self.max_s, self.initial_s * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return delay / 2 + self._rng() * delay / 2

    def reset(self) -> None:
        self._attempt = 0
