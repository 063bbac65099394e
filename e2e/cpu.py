"""CPU time of local processes over a window of wall-clock time, to see which component a benchmark spends on.

Everything in the e2e benchmarks shares the same cores, so a rate alone does not say where the time went. The
sampler reads each process's user + system time from /proc in the background; `used` interpolates it at the
window's edges (clock-tick resolution, 10 ms, is far below the windows measured).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from types import TracebackType

import numpy as np

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (NaN once it has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND  # utime, stime: fields 14 and 15 of stat(5)


class CpuSampler:
    """Samples the CPU time of named processes every `interval_s` while in its `with` block."""

    def __init__(self, pids: Mapping[str, int], interval_s: float = 0.05) -> None:
        self.pids = dict(pids)
        self._interval = interval_s
        self._times: list[float] = []
        self._cpu: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        self._times.append(time.monotonic())
        self._cpu.append([cpu_seconds(pid) for pid in self.pids.values()])

    def used(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each process used between two `time.monotonic()` instants inside the sampled span."""
        times, cpu = np.array(self._times), np.array(self._cpu)
        return {
            name: float(np.interp(end, times, cpu[:, i]) - np.interp(start, times, cpu[:, i]))
            for i, name in enumerate(self.pids)
        }
