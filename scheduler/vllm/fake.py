"""A fake vLLM OpenAI-compatible server for tests: vLLM 0.33's routes, metric names, labels and sleep mode, no GPU.

What it reproduces, as read from vLLM's source (`vllm/v1/metrics/loggers.py`, `vllm/v1/metrics/buckets.py`,
`vllm/entrypoints/serve/dev/sleep/api_router.py`, `vllm/v1/engine/core.py`, `vllm/v1/executor/abstract.py`,
`vllm/entrypoints/openai/models/serving.py`, `vllm/entrypoints/serve/instrumentator/health.py`):

- `GET /health`: 200 with an empty body; 503 once the engine is dead (`kill()`).
- `GET /v1/models`: `{"object": "list", "data": [{"id": <served name>, "object": "model", "owned_by": "vllm",
  "root": <model path>, "parent": null, "max_model_len": ..., "permission": [...]}]}`.
- `GET /metrics`: the series of vLLM's `PrometheusStatLogger`, labelled `model_name` and `engine`, from a
  `prometheus_client` registry of its own (so several fakes live in one process): counters
  `vllm:request_success_total{finished_reason}` (pre-created for all five reasons), `vllm:prompt_tokens_total`,
  `vllm:generation_tokens_total`, `vllm:num_preemptions_total`; gauges `vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:num_requests_waiting_by_reason{reason}`, `vllm:kv_cache_usage_perc` (or,
  with `legacy_kv_metric`, the name vLLM used before 0.9, `vllm:gpu_cache_usage_perc`),
  `vllm:engine_sleep_state{sleep_state=awake|weights_offloaded|discard_all}`; histograms with vLLM's buckets
  `vllm:time_to_first_token_seconds`, `vllm:e2e_request_latency_seconds`, `vllm:request_queue_time_seconds`,
  `vllm:request_prompt_tokens` and `vllm:request_generation_tokens`.
- `POST /v1/completions` and `POST /v1/chat/completions` (not streamed): a prompt costs one token per word (at
  least one), the output is `max_tokens` tokens (chat without a limit: the rest of `max_model_len`, as vLLM does
  for a model that never stops), finishing with `length`. A request queues (`num_requests_waiting`) while
  `max_num_seqs` run, then takes `service_time_s` of awake engine time. Errors have vLLM's body
  `{"error": {"message", "type", "param", "code"}}`: 404 for another model, 400 for a bad body, 500 when dead.
- Sleep mode, as a server started with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1` serves it (without
  `sleep_endpoints` the routes do not exist): `POST /sleep?level=0|1|2&mode=abort|wait|keep`, `POST /wake_up`
  (`?tags=weights&tags=kv_cache`, `scheduling`), `GET /is_sleeping` -> `{"is_sleeping": bool}`. Sleeping pauses
  the scheduler: vLLM does not refuse requests that arrive meanwhile, it queues them (they count as waiting) and
  runs them after wake-up. `mode=abort` (the default) ends the requests in flight with `finished_reason="abort"`,
  `keep` freezes them, `wait` lets them finish first. Level 1 moves the weights to host memory and discards the KV
  cache, level 2 discards both, level 0 only pauses scheduling; `memory()` reports the GPU and host bytes that
  follow (a level-2 wake leaves weights a real server must reload; the fake serves on).

`record()`, `set_waiting()`, `set_running()` and `set_kv_cache_usage()` shape the series directly, without HTTP,
so tests can build demand fast. `FakeVllm` serves a `FakeEngine` with uvicorn on a loopback port, in a thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = [
    "FINISH_REASONS",
    "GIB",
    "PAUSE_MODES",
    "REQUEST_LATENCY_BUCKETS",
    "SLEEP_STATES",
    "SLEEP_TAGS",
    "TIME_TO_FIRST_TOKEN_BUCKETS",
    "EngineDead",
    "FakeEngine",
    "FakeVllm",
    "Finished",
    "Memory",
    "build_1_2_5_buckets",
    "create_app",
]

GIB = 1 << 30
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")  # vllm.v1.engine.FINISH_REASON_STRINGS
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
SLEEP_TAGS = frozenset({"weights", "kv_cache"})  # vllm.v1.executor.abstract.SLEEP_TAGS
PAUSE_MODES = ("abort", "wait", "keep")  # vllm.v1.engine.PauseMode
WAITING_REASONS = ("capacity", "deferred")

TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip

_POLL_S = 0.005
"""How often a request in flight looks at the engine: the granularity of service times, pauses and aborts."""
_DEAD_MESSAGE = "The server had an error while processing your request."  # EngineDeadError.CLIENT_MESSAGE


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value`: vLLM's buckets for token-count histograms."""
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(float(mantissa * scale))
        scale *= 10


class EngineDead(RuntimeError):
    """The fake's engine was killed: health answers 503 and requests fail with 500 until `revive()`."""


@dataclass(frozen=True)
class Memory:
    """What the server holds: on the GPU (weights, KV cache, CUDA context) and in host memory (offloaded weights)."""

    gpu_bytes: int
    host_bytes: int


@dataclass(eq=False)
class _Request:
    prompt_tokens: int
    max_tokens: int
    arrived: float
    started: float | None = None
    progress_s: float = 0.0
    aborted: bool = False


@dataclass(frozen=True)
class Finished:
    """How a request served over HTTP ended."""

    prompt_tokens: int
    generation_tokens: int
    finish_reason: str


class _Metrics:
    """vLLM's series for one engine (index 0), in their own registry."""

    def __init__(self, model: str, max_model_len: int, legacy_kv_metric: bool) -> None:
        self.registry = CollectorRegistry()
        labels, values = ["model_name", "engine"], (model, "0")

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(*values)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(*values)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        by_reason = Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason.",
            [*labels, "reason"],
            registry=self.registry,
        )
        self.waiting_by_reason = {reason: by_reason.labels(*values, reason) for reason in WAITING_REASONS}
        sleep_state = Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            [*labels, "sleep_state"],
            registry=self.registry,
        )
        self.sleep_state = {state: sleep_state.labels(*values, state) for state in SLEEP_STATES}
        if legacy_kv_metric:
            self.kv_cache_usage = gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.")
        else:
            self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TIME_TO_FIRST_TOKEN_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )

    def record_sleep_state(self, sleep: bool, level: int) -> None:
        """vLLM's `PrometheusStatLogger.record_sleep_state`: level 0 clears `awake` and sets neither of the others."""
        self.sleep_state["awake"].set(0 if sleep else 1)
        self.sleep_state["weights_offloaded"].set(1 if sleep and level == 1 else 0)
        self.sleep_state["discard_all"].set(1 if sleep and level == 2 else 0)


class FakeEngine:
    """One served model's engine: its request queue, sleep state, memory and Prometheus series. Thread-safe: tests
    drive it from their thread while the server's event loop serves requests."""

    def __init__(
        self,
        model: str = "fake-model",
        *,
        root: str | None = None,
        max_model_len: int = 8192,
        service_time_s: float = 0.0,
        max_num_seqs: int = 256,
        kv_cache_tokens: int = 131_072,
        weights_bytes: int = 16 * GIB,
        kv_cache_bytes: int = 48 * GIB,
        context_bytes: int = GIB // 2,
        legacy_kv_metric: bool = False,
        sleep_endpoints: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not model:
            raise ValueError("a fake vLLM needs a served model name")
        if max_model_len < 1 or max_num_seqs < 1 or kv_cache_tokens < 1:
            raise ValueError("max_model_len, max_num_seqs and kv_cache_tokens must be positive")
        self.model = model
        self.root = root or model
        self.max_model_len = max_model_len
        self.service_time_s = service_time_s
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
        self.weights_bytes, self.kv_cache_bytes, self.context_bytes = weights_bytes, kv_cache_bytes, context_bytes
        self.legacy_kv_metric = legacy_kv_metric
        self.sleep_endpoints = sleep_endpoints
        self.created = int(time.time())
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._extra_waiting = 0
        self._extra_running = 0
        self._kv_override: float | None = None
        self._dead = False
        self._paused = False  # the scheduler starts no new request
        self._frozen = False  # requests in flight make no progress (pause mode `keep`)
        self._sleeping_tags: set[str] = set()
        self._level: int | None = None
        self._metrics = _Metrics(model, max_model_len, legacy_kv_metric)
        self._metrics.record_sleep_state(False, 0)

    # --- what the server exposes -------------------------------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        return self._metrics.registry

    def metrics_text(self) -> bytes:
        """The `/metrics` exposition, with the gauges as of now (vLLM sets them on every engine step)."""
        with self._lock:
            self._publish()
        return generate_latest(self.registry)

    def _publish(self) -> None:
        waiting = len(self._waiting) + self._extra_waiting
        self._metrics.running.set(len(self._running) + self._extra_running)
        self._metrics.waiting.set(waiting)
        self._metrics.waiting_by_reason["capacity"].set(waiting)
        self._metrics.waiting_by_reason["deferred"].set(0)
        self._metrics.kv_cache_usage.set(self._kv_usage())

    def _kv_usage(self) -> float:
        if "kv_cache" in self._sleeping_tags:
            return 0.0  # sleeping at level 1 or 2 discards the KV cache
        if self._kv_override is not None:
            return self._kv_override
        tokens = 0.0
        for request in self._running:
            done = 1.0 if self.service_time_s <= 0 else min(1.0, request.progress_s / self.service_time_s)
            tokens += request.prompt_tokens + done * request.max_tokens
        return min(1.0, tokens / self.kv_cache_tokens)

    def memory(self) -> Memory:
        """GPU and host bytes held now: asleep, the weights go to host memory (level 1) or away (level 2), the KV
        cache is discarded, and the CUDA context stays."""
        with self._lock:
            gpu = self.context_bytes
            gpu += 0 if "weights" in self._sleeping_tags else self.weights_bytes
            gpu += 0 if "kv_cache" in self._sleeping_tags else self.kv_cache_bytes
            offloaded = self._level == 1 and "weights" in self._sleeping_tags
            return Memory(gpu_bytes=gpu, host_bytes=self.weights_bytes if offloaded else 0)

    # --- shaping demand without HTTP -----------------------------------------------------------------------------

    def record(
        self,
        requests: int = 1,
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
        finished_reason: str = "length",
        latency_s: float | None = None,
    ) -> None:
        """Account `requests` finished requests carrying these token totals, as if served (counters, and the
        per-request histograms with the mean tokens per request and `latency_s` when given). A sleeping or dead
        engine finishes nothing, so it refuses."""
        if requests < 0 or prompt_tokens < 0 or generation_tokens < 0:
            raise ValueError("requests and token counts must be >= 0")
        if finished_reason not in FINISH_REASONS:
            raise ValueError(f"finished_reason must be one of {', '.join(FINISH_REASONS)}")
        with self._lock:
            if self._dead:
                raise EngineDead(f"{self.model}: the engine is dead")
            if self._paused or self._sleeping_tags:
                raise RuntimeError(f"{self.model}: the engine is asleep and serves nothing")
            m = self._metrics
            m.success[finished_reason].inc(requests)
            m.prompt_tokens.inc(prompt_tokens)
            m.generation_tokens.inc(generation_tokens)
            if requests:
                for _ in range(requests):
                    m.request_prompt_tokens.observe(prompt_tokens / requests)
                    m.request_generation_tokens.observe(generation_tokens / requests)
                    if latency_s is not None:
                        m.e2e.observe(latency_s)

    def set_waiting(self, n: int) -> None:
        """Requests waiting beyond those queued over HTTP."""
        with self._lock:
            self._extra_waiting = max(0, int(n))

    def set_running(self, n: int) -> None:
        """Requests running beyond those served over HTTP."""
        with self._lock:
            self._extra_running = max(0, int(n))

    def set_kv_cache_usage(self, usage: float | None) -> None:
        """Report this KV-cache usage (0..1) while awake; `None` goes back to the running requests' tokens."""
        if usage is not None and not 0.0 <= usage <= 1.0:
            raise ValueError("KV-cache usage is a fraction in 0..1")
        with self._lock:
            self._kv_override = usage

    # --- life and death ------------------------------------------------------------------------------------------

    @property
    def dead(self) -> bool:
        return self._dead

    def kill(self) -> None:
        """The engine core dies: `/health` answers 503 and every request fails with 500."""
        with self._lock:
            self._dead = True

    def revive(self) -> None:
        with self._lock:
            self._dead = False

    # --- sleep mode ----------------------------------------------------------------------------------------------

    def is_sleeping(self) -> bool:
        """vLLM's `EngineCore.is_sleeping`: scheduling paused, or any executor memory asleep."""
        with self._lock:
            return self._paused or bool(self._sleeping_tags)

    @property
    def sleep_level(self) -> int | None:
        """The level of the current sleep; None while awake."""
        with self._lock:
            return self._level if self._paused or self._sleeping_tags else None

    @property
    def sleeping_tags(self) -> frozenset[str]:
        """The executor's allocations asleep now (`weights`, `kv_cache`), as a partial wake-up leaves them."""
        with self._lock:
            return frozenset(self._sleeping_tags)

    def sleep(self, level: int = 1, mode: str = "abort", timeout_s: float = 30.0) -> None:
        """Sleep as `POST /sleep?level=&mode=` does (mode `wait` blocks until the requests in flight are done)."""
        self._pause(level, mode)
        if mode == "wait":
            deadline = time.monotonic() + timeout_s
            while not self._drained():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.model}: requests still in flight after {timeout_s:g}s")
                time.sleep(_POLL_S)
        self._suspend(level)

    def _pause(self, level: int, mode: str) -> None:
        if level not in (0, 1, 2):
            raise ValueError("sleep level must be 0, 1 or 2")
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {', '.join(PAUSE_MODES)}")
        with self._lock:
            self._paused = True
            if mode == "abort":  # vLLM's scheduler.finish_requests(None, FINISHED_ABORTED): running and waiting
                for request in self._running + self._waiting:
                    request.aborted = True
            elif mode == "keep":
                self._frozen = True

    def _drained(self) -> bool:
        with self._lock:
            return not self._running

    def _suspend(self, level: int) -> None:
        with self._lock:
            if level >= 1:
                self._frozen = True
                if "weights" not in self._sleeping_tags:  # vLLM: "Executor is already sleeping" leaves it as it is
                    self._sleeping_tags |= SLEEP_TAGS
                    self._level = level
            elif self._level is None:
                self._level = 0
            self._metrics.record_sleep_state(True, level)  # vLLM records the level asked for, even when a no-op

    def wake_up(self, tags: Iterable[str] | None = None) -> bool:
        """vLLM's `EngineCore.wake_up`: wake the tagged allocations (all when None; `scheduling` resumes a level-0
        pause); scheduling resumes once no allocation sleeps. Returns whether the engine is fully awake."""
        wanted = None if tags is None else [t for t in tags if t != "scheduling"]
        with self._lock:
            if (wanted is None or wanted) and self._sleeping_tags:
                if wanted is None:
                    self._sleeping_tags.clear()
                elif all(tag in self._sleeping_tags for tag in wanted):  # vLLM wakes nothing for an unknown tag
                    self._sleeping_tags -= set(wanted)
            if self._sleeping_tags:
                return False
            self._paused = self._frozen = False
            self._level = None
            self._metrics.record_sleep_state(False, 0)
            return True

    # --- requests served over HTTP -------------------------------------------------------------------------------

    async def serve(self, prompt_tokens: int, max_tokens: int) -> Finished:
        """One request through the engine: queue, run for `service_time_s` of awake time, finish and account."""
        request = self._admit(prompt_tokens, max_tokens)
        try:
            while not self._try_start(request):
                await asyncio.sleep(_POLL_S)
            last = self._clock()
            while True:
                now = self._clock()
                remaining = self._advance(request, now - last)
                last = now
                if remaining <= 0:
                    break
                await asyncio.sleep(min(_POLL_S, remaining))
            return self._finish(request)
        finally:
            self._drop(request)

    def _admit(self, prompt_tokens: int, max_tokens: int) -> _Request:
        with self._lock:
            if self._dead:
                raise EngineDead(self.model)
            request = _Request(prompt_tokens, max_tokens, arrived=self._clock())
            self._waiting.append(request)
            return request

    def _try_start(self, request: _Request) -> bool:
        with self._lock:
            if self._dead:
                raise EngineDead(self.model)
            if request.aborted:
                return True
            if self._paused or self._waiting[0] is not request or len(self._running) >= self.max_num_seqs:
                return False
            self._waiting.pop(0)
            self._running.append(request)
            request.started = self._clock()
            self._metrics.prompt_tokens.inc(request.prompt_tokens)  # vLLM counts prompt tokens at prefill
            self._metrics.queue_time.observe(request.started - request.arrived)
            return True

    def _advance(self, request: _Request, elapsed: float) -> float:
        """Add awake time to a running request; the service time it still needs (<= 0 when done or aborted)."""
        with self._lock:
            if self._dead:
                raise EngineDead(self.model)
            if request.aborted:
                return 0.0
            if not self._frozen:
                request.progress_s += elapsed
            return self.service_time_s - request.progress_s

    def _finish(self, request: _Request) -> Finished:
        with self._lock:
            m = self._metrics
            if request.aborted:
                done = 0.0 if self.service_time_s <= 0 else min(1.0, request.progress_s / self.service_time_s)
                generated = 0 if request.started is None else int(done * request.max_tokens)
                reason = "abort"
            else:
                generated, reason = request.max_tokens, "length"
            now = self._clock()
            m.success[reason].inc()
            m.generation_tokens.inc(generated)
            if request.started is not None:
                prefill = self.service_time_s * request.prompt_tokens / max(1, request.prompt_tokens + generated)
                m.ttft.observe(request.started - request.arrived + prefill)
            m.e2e.observe(now - request.arrived)
            m.request_prompt_tokens.observe(request.prompt_tokens)
            m.request_generation_tokens.observe(generated)
            return Finished(request.prompt_tokens, generated, reason)

    def _drop(self, request: _Request) -> None:
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
            if request in self._running:
                self._running.remove(request)


# --- the HTTP app ------------------------------------------------------------------------------------------------


def _error(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    """vLLM's `ErrorResponse` body."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


class _UnknownModel(Exception):
    pass


class _BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _tokens(text: Any, param: str) -> int:
    """A prompt's tokens: one per word (at least one); a list of ints is already token ids."""
    if isinstance(text, str):
        if not text:
            raise _BadRequest("the prompt cannot be empty", param)
        return max(1, len(text.split()))
    if isinstance(text, list) and text and all(isinstance(t, int) for t in text):
        return len(text)
    raise _BadRequest(f"`{param}` must be a non-empty string or a list of token ids", param)


def _max_tokens(value: Any, prompt_tokens: int, max_model_len: int) -> int:
    limit = max_model_len - prompt_tokens
    if value is None:
        value = limit  # vLLM generates up to the context length when no limit is given
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest("max_tokens must be an integer >= 1", "max_tokens")
    if value > limit:
        raise _BadRequest(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_tokens} and "
            f"{value} were asked for",
            "max_tokens",
        )
    return value


def _usage(results: Sequence[Finished]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.generation_tokens for r in results)
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def _text(tokens: int) -> str:
    return " ".join(["token"] * tokens)


def create_app(engine: FakeEngine) -> FastAPI:
    """The routes of `vllm serve` that the scheduler and the tests use, over `engine`."""
    app = FastAPI(title="fake vLLM", docs_url=None, redoc_url=None, openapi_url=None)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise _BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model not in (None, "", engine.model):
            raise _UnknownModel(model)
        return body

    async def run(requests: Sequence[tuple[int, int]]) -> list[Finished]:
        return list(await asyncio.gather(*(engine.serve(p, m) for p, m in requests)))

    @app.exception_handler(_BadRequest)
    async def bad_request(_: Request, exc: _BadRequest) -> JSONResponse:
        return _error(400, "BadRequestError", str(exc), exc.param)

    @app.exception_handler(_UnknownModel)
    async def unknown_model(_: Request, exc: _UnknownModel) -> JSONResponse:
        message = f"The model `{exc.args[0]}` does not exist. Valid aliases: {engine.model}."
        return _error(404, "NotFoundError", message, "model")

    @app.exception_handler(EngineDead)
    async def dead(_: Request, __: EngineDead) -> JSONResponse:
        return _error(500, "InternalServerError", _DEAD_MESSAGE)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if engine.dead else 200)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": engine.created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {
            "id": engine.model,
            "object": "model",
            "created": engine.created,
            "owned_by": "vllm",
            "root": engine.root,
            "parent": None,
            "max_model_len": engine.max_model_len,
            "permission": [permission],
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await body_of(request)
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        shapes = []
        for p in prompts:
            tokens = _tokens(p, "prompt")
            shapes.append((tokens, _max_tokens(body.get("max_tokens", 16), tokens, engine.max_model_len)))
        results = await run(shapes)
        choices = [
            {"index": i, "text": _text(r.generation_tokens), "logprobs": None, "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        reply = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": engine.model,
            "choices": choices,
            "usage": _usage(results),
        }
        return JSONResponse(reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _BadRequest("`messages` must be a non-empty list of messages", "messages")
        words = 0
        for message in messages:
            content = message.get("content")
            parts = content if isinstance(content, list) else [content]
            for part in parts:
                text = part.get("text") if isinstance(part, dict) else part
                words += len(text.split()) if isinstance(text, str) else 0
        tokens = max(1, words)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        (result,) = await run([(tokens, _max_tokens(limit, tokens, engine.max_model_len))])
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": _text(result.generation_tokens), "tool_calls": []},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        reply = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": engine.model,
            "choices": [choice],
            "usage": _usage([result]),
        }
        return JSONResponse(reply)

    if engine.sleep_endpoints:

        @app.post("/sleep")
        async def sleep(
            level: Annotated[int, Query(ge=0, le=2)] = 1,
            mode: Annotated[Literal["abort", "wait", "keep"], Query()] = "abort",
        ) -> JSONResponse:
            engine._pause(level, mode)
            while mode == "wait" and not engine._drained():
                await asyncio.sleep(_POLL_S)
            engine._suspend(level)
            return JSONResponse({"status": "sleeping", "level": level})

        @app.post("/wake_up")
        async def wake_up(request: Request) -> JSONResponse:
            tags = request.query_params.getlist("tags") or None
            fully_awake = engine.wake_up(tags)
            return JSONResponse({"status": "awake" if fully_awake else "sleeping", "tags": tags})

        @app.get("/is_sleeping")
        async def is_sleeping() -> JSONResponse:
            return JSONResponse({"is_sleeping": engine.is_sleeping()})

    return app


# --- serving it --------------------------------------------------------------------------------------------------


class FakeVllm(FakeEngine):
    """A `FakeEngine` served over HTTP by uvicorn in a background thread, on `host` and `port` (0: a free port the
    kernel picks, held from bind to stop, so no other process can take it in between)."""

    def __init__(self, model: str = "fake-model", *, host: str = "127.0.0.1", port: int = 0, **engine: Any) -> None:
        super().__init__(model, **engine)
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def address(self) -> str:
        """`host:port`, as a Prometheus scrape target names it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout_s: float = 10.0) -> FakeVllm:
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self),
            log_config=None,  # leave the test process's logging alone
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"fake-vllm-{self.port}")
        thread.daemon = True
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError(f"the fake vLLM server for {self.model} did not start on {self.address}")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        self._socket = sock
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> FakeVllm:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
