"""A background loop: one function run every few seconds on a daemon thread, outside the request path."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Periodic"]


class Periodic:
    """Calls `tick` now and then every `interval_s` until `stop()`; a slow tick delays the next, never overlaps it.
    `tick` must not raise (each loop catches and reports its own failures, so one bad round does not end it)."""

    def __init__(self, name: str, tick: Callable[[], object], interval_s: float) -> None:
        self.interval_s = interval_s
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._tick()
            self._stop.wait(self.interval_s)
