"""Cold-start replay: per-model request arrivals through a pre-warming forecaster, replicas that scale with load.

Each model is replayed on its own (models share no replicas). A request goes to the replica slot that can take it
first: a free slot on a warm replica (no wait), a slot of a replica that is starting (it waits for the start), or a
slot that frees on a busy replica. When no warm or starting replica has a free slot, the autoscaler starts one (a
sleeping replica wakes, else a new one loads) and the request takes whichever comes first, the new replica or a
freed slot: the scale-up and its cold start happen either way, as they do when a queue triggers them.

A replica idle for `scale_down_s` while another stays up is let go. When the whole model is idle the forecaster
decides (`policies.forecast`): how long its replicas stay warm, and when one should be ready again. With sleep
mode a replica let go sleeps instead of unloading (it holds `sleep_share` of a GPU, and wakes in `wake_s`), and
unloads after `sleep_ttl_s` asleep.

GPU-hours count a replica from the start of its load (the load holds the GPU) until it is let go, clipped to the
measured window; requests are counted when they arrive in the window. Arrivals before the window still run
(they warm replicas and teach the forecaster).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from policies.forecast import Forecaster, ModelHistory, WarmPlan
from scheduler.simulator.coldstart_result import EPS, Result, Tally, clipped, result

__all__ = ["LoadTimes", "ReplayOptions", "Request", "Result", "replay"]


@dataclass(frozen=True)
class Request:
    arrival: float
    service_s: float = 0.0


@dataclass(frozen=True)
class LoadTimes:
    """Full-load durations: drawn at random from measured ones (seeded), or fixed to their median."""

    samples: tuple[float, ...]
    fixed: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.samples or min(self.samples) < 0:
            raise ValueError("load times must be a non-empty list of seconds >= 0")

    @property
    def median(self) -> float:
        ordered = sorted(self.samples)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    def sampler(self, salt: str = "") -> Callable[[], float]:
        """A draw function; each model gets its own stream (salted by its name) so policies see the same draws."""
        if self.fixed:
            median = self.median
            return lambda: median
        rng = random.Random(f"{self.seed}:{salt}")
        samples = self.samples
        return lambda: rng.choice(samples)


@dataclass(frozen=True)
class ReplayOptions:
    """`concurrency`: requests one replica serves at once (0: unlimited, i.e. one replica per model)."""

    concurrency: int = 1
    scale_down_s: float = 600.0
    sleep: bool = False
    wake_s: float = 5.0
    sleep_share: float = 0.0125
    sleep_ttl_s: float = math.inf
    measure_from: float = -math.inf
    measure_to: float = math.inf
    stop_after_s: float = 4 * 3600.0  # how long the replay runs after the last arrival


@dataclass
class _Replica:
    started: float  # awake (holding the GPU) since
    ready_at: float
    slots: list[float]  # when each slot is free again (ascending); unlimited concurrency keeps one busy-until
    cause: str = "load"  # "load" or "wake": what a request waiting on this start waited on

    def end(self) -> float:
        return max(self.ready_at, self.slots[-1]) if self.slots else self.ready_at


class _Model:
    """One model's replicas, its history and the forecaster's current plan."""

    def __init__(
        self,
        name: str,
        forecaster: Forecaster,
        options: ReplayOptions,
        draw_load: Callable[[], float],
        expected_load: float,
        tally: Tally,
    ) -> None:
        self.name = name
        self.forecaster = forecaster
        self.o = options
        self.draw_load = draw_load
        self.expected_load = expected_load
        self.tally = tally
        self.history = ModelHistory()
        self.awake: list[_Replica] = []
        self.sleeping: list[float] = []  # when each sleeping replica went to sleep
        self.idle_since: float | None = None  # set once the model's last request ended and the plan was made
        self.plan: WarmPlan | None = None
        self.prewarmed = False  # the awake replica came from the plan's pre-warm, unused so far
        self.now = -math.inf

    # --- accounting -------------------------------------------------------------------------------------------
    def _measured(self, t: float) -> bool:
        return self.o.measure_from <= t < self.o.measure_to

    def _release(self, replica: _Replica, at: float) -> None:
        self.awake.remove(replica)
        self.tally.awake_s += clipped(replica.started, at, self.o.measure_from, self.o.measure_to)
        if self.o.sleep:
            self.sleeping.append(at)

    def _unload_sleeper(self, index: int, at: float) -> None:
        since = self.sleeping.pop(index)
        self.tally.sleeping_s += clipped(since, at, self.o.measure_from, self.o.measure_to)

    def _start(self, at: float, prewarm: bool) -> _Replica:
        """A replica starting at `at`: the most recent sleeper wakes, else a new one loads."""
        if self.sleeping:
            self._unload_sleeper(len(self.sleeping) - 1, at)
            replica = _Replica(at, at + self.o.wake_s, [], "wake")
            if self._measured(at):
                self.tally.wakes += 1
                self.tally.prewarm_wakes += prewarm
        else:
            replica = _Replica(at, at + self.draw_load(), [], "load")
            if self._measured(at):
                self.tally.full_loads += 1
                self.tally.prewarm_loads += prewarm
        self.awake.append(replica)
        return replica

    def start_s(self) -> float:
        return self.o.wake_s if self.sleeping else self.expected_load

    # --- time passing -----------------------------------------------------------------------------------------
    def _busy_until(self) -> float:
        return max((r.end() for r in self.awake), default=-math.inf)

    def _next_event(self) -> tuple[float, str, object]:
        best: tuple[float, str, object] = (math.inf, "", None)
        if len(self.awake) > 1:
            for r in self.awake:
                best = min(best, (r.end() + self.o.scale_down_s, "scale-down", r), key=lambda e: e[0])
        if self.plan is None:
            busy = self._busy_until()
            if busy > -math.inf:
                best = min(best, (busy, "idle", None), key=lambda e: e[0])
        elif self.awake and not self.prewarmed:
            best = min(best, (max(self.plan.keep_until, self._busy_until()), "keep-end", None), key=lambda e: e[0])
        elif self.awake and self.prewarmed and self.plan.prewarm_until is not None:
            until = max(self.plan.prewarm_until, self._busy_until())
            best = min(best, (until, "prewarm-end", None), key=lambda e: e[0])
        elif not self.awake and self.plan.prewarm_at is not None:
            at = max(self.now, self.plan.prewarm_at - self.start_s())
            best = min(best, (at, "prewarm", None), key=lambda e: e[0])
        if self.sleeping and math.isfinite(self.o.sleep_ttl_s):
            first = min(range(len(self.sleeping)), key=self.sleeping.__getitem__)
            best = min(best, (self.sleeping[first] + self.o.sleep_ttl_s, "unload", first), key=lambda e: e[0])
        return best

    def advance(self, t: float) -> None:
        """Play every timed action before `t` (the next arrival, or the end of the replay)."""
        while True:
            at, kind, what = self._next_event()
            if at >= t:
                break
            at = max(at, self.now)
            self.now = at
            if kind == "scale-down":
                self._release(what, at)  # type: ignore[arg-type]
            elif kind == "idle":
                self.idle_since = at
                self.plan = self.forecaster.plan(self.history, at, at, self.start_s())
                self.prewarmed = False
            elif kind in ("keep-end", "prewarm-end"):
                for r in list(self.awake):
                    self._release(r, at)
                assert self.idle_since is not None
                if kind == "prewarm-end":
                    self.plan = self.forecaster.plan(self.history, self.idle_since, at, self.start_s())
                    self.prewarmed = False
                elif self.plan is not None:
                    self.plan = WarmPlan(at, self.plan.prewarm_at, self.plan.prewarm_until)
            elif kind == "prewarm":
                assert self.plan is not None and self.plan.prewarm_until is not None
                if self.plan.prewarm_until <= at:  # too late to be of use: ask again
                    self.plan = self.forecaster.plan(self.history, self.idle_since or at, at, self.start_s())
                    continue
                self._start(at, prewarm=True)
                self.prewarmed = True
            elif kind == "unload":
                self._unload_sleeper(what, at)  # type: ignore[arg-type]

    # --- a request ------------------------------------------------------------------------------------------
    def arrive(self, request: Request) -> None:
        a = request.arrival
        self.advance(a)
        self.now = a
        idle = self.idle_since if self.plan is not None else None
        self.history.arrive(a, idle)
        self.plan = None
        self.idle_since = None
        self.prewarmed = False
        limit = self.o.concurrency
        best: tuple[float, _Replica | None] = (math.inf, None)
        for r in self.awake:
            free = r.slots[0] if limit and len(r.slots) >= limit else -math.inf
            at = max(a, r.ready_at, free)
            if at < best[0]:
                best = (at, r)
        starting_with_room = any(r.ready_at > a and (not limit or len(r.slots) < limit) for r in self.awake)
        if best[0] > a + EPS and not starting_with_room:
            new = self._start(a, prewarm=False)
            if new.ready_at < best[0]:
                best = (new.ready_at, new)
        start, replica = best
        assert replica is not None
        if limit and len(replica.slots) >= limit:
            replica.slots.pop(0)
        bisect.insort(replica.slots, start + request.service_s)
        if not limit:
            replica.slots[:] = [replica.slots[-1]]
        if self._measured(a):
            wait = start - a
            self.tally.requests += 1
            self.tally.waits.append(wait)
            if wait > EPS:
                if replica.ready_at > a + EPS and abs(start - replica.ready_at) < EPS:
                    if replica.cause == "wake":
                        self.tally.waited_wake += 1
                    else:
                        self.tally.waited_load += 1
                else:
                    self.tally.waited_busy += 1

    def finish(self, stop: float) -> None:
        self.advance(stop)
        for r in list(self.awake):
            self._release(r, stop)
        for i in reversed(range(len(self.sleeping))):
            self._unload_sleeper(i, stop)


def replay(
    requests: Mapping[str, Sequence[Request]],
    forecaster: Forecaster,
    options: ReplayOptions,
    load_times: LoadTimes,
    name: str | None = None,
    per_model: Mapping[str, Forecaster] | None = None,
) -> Result:
    """Replay every model's requests (each list ascending by arrival) through `forecaster` (or the model's own
    in `per_model`)."""
    tally = Tally()
    last = max((rs[-1].arrival for rs in requests.values() if rs), default=0.0)
    stop = min(options.measure_to, last + options.stop_after_s)
    for model in sorted(requests):
        own = per_model.get(model, forecaster) if per_model else forecaster
        state = _Model(model, own, options, load_times.sampler(model), load_times.median, tally)
        for request in requests[model]:
            if request.arrival >= stop:
                break
            state.arrive(request)
        state.finish(stop)
    return result(name or forecaster.name, tally, options.sleep_share)
