"""A client of one vLLM server's HTTP API, with the standard library only (the scheduler runs without httpx or
requests): health, served models, sleep mode and its Prometheus series.

Every failure to get a usable answer (connection refused, timeout, a non-2xx status, a body that is not what vLLM
sends) is a `VllmError`; nothing else escapes. Sleep mode needs a server started with `--enable-sleep-mode` and
`VLLM_SERVER_DEV_MODE=1`; elsewhere those routes answer 404, which is a `VllmError` with `status` 404.
"""

from __future__ import annotations

import http.client
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["ModelMetrics", "VllmClient", "VllmError", "parse_metrics"]

_BODY_LIMIT = 16 << 20
"""The largest body read: a `/metrics` page of a server with many LoRA adapters stays well under it."""


class VllmError(Exception):
    """The server gave no usable answer. `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelMetrics:
    """One served model's series on one server, summed over its engines (KV-cache use: their mean).

    Counters are totals since the server started; `sleep_state` is `awake`, `weights_offloaded`, `discard_all`,
    `paused` (level 0: not awake, nothing offloaded) or None where the server does not export the gauge.
    """

    model: str
    requests_success: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    kv_cache_usage: float = 0.0
    engines: int = 0
    sleep_state: str | None = None


_COUNTERS = {
    "vllm:request_success_total": "requests_success",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
}
_GAUGES = {"vllm:num_requests_running": "requests_running", "vllm:num_requests_waiting": "requests_waiting"}
_KV_NEW, _KV_OLD = "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"


def parse_metrics(text: str) -> dict[str, ModelMetrics]:
    """Per-model values of a vLLM `/metrics` page; raises `ValueError` for text that is not the exposition format.

    KV-cache use comes from `vllm:kv_cache_usage_perc`, else from the name vLLM used before 0.9,
    `vllm:gpu_cache_usage_perc`."""
    sums: dict[str, dict[str, float]] = {}
    engines: dict[str, set[str]] = {}
    kv: dict[str, dict[str, list[float]]] = {}
    sleep: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model_name")
            value = float(sample.value)
            if not model or math.isnan(value):
                continue
            name = sample.name
            if name in _COUNTERS or name in _GAUGES:
                field = _COUNTERS.get(name) or _GAUGES[name]
                sums.setdefault(model, {})[field] = sums.get(model, {}).get(field, 0.0) + value
                if name == "vllm:num_requests_running":
                    engines.setdefault(model, set()).add(sample.labels.get("engine", ""))
            elif name in (_KV_NEW, _KV_OLD):
                kv.setdefault(model, {}).setdefault(name, []).append(value)
            elif name == "vllm:engine_sleep_state" and "sleep_state" in sample.labels:
                states = sleep.setdefault(model, {})
                states[sample.labels["sleep_state"]] = max(states.get(sample.labels["sleep_state"], 0.0), value)
    out = {}
    for model in sorted(set(sums) | set(kv) | set(sleep)):
        usage = kv.get(model, {})
        values = usage.get(_KV_NEW) or usage.get(_KV_OLD) or []
        out[model] = ModelMetrics(
            model=model,
            **sums.get(model, {}),
            kv_cache_usage=sum(values) / len(values) if values else 0.0,
            engines=len(engines.get(model, ())),
            sleep_state=_sleep_state(sleep.get(model)),
        )
    return out


def _sleep_state(states: dict[str, float] | None) -> str | None:
    if not states:
        return None
    for state in ("discard_all", "weights_offloaded"):
        if states.get(state, 0.0) >= 1:
            return state
    return "awake" if states.get("awake", 0.0) >= 1 else "paused"


class VllmClient:
    """One vLLM server at `base_url` (e.g. `http://10.0.0.7:8000`); each call waits at most `timeout_s`."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"a vLLM server's URL starts with http:// or https://, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def health(self) -> bool:
        """True when `/health` answers 200, False for any other status (vLLM answers 503 once its engine died).
        A server that does not answer at all raises `VllmError`: down is not the same as unhealthy."""
        try:
            self._call("GET", "/health")
        except VllmError as exc:
            if exc.status is None:
                raise
            return False
        return True

    def models(self) -> list[str]:
        """The served model names (`--served-model-name`), as `/v1/models` lists them (LoRA adapters included)."""
        reply = self._json("GET", "/v1/models")
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise VllmError(f"{self.base_url}/v1/models: not a model list: {str(reply)[:200]}")
        return [m["id"] for m in data]

    def is_sleeping(self) -> bool:
        reply = self._json("GET", "/is_sleeping")
        if not isinstance(reply, dict) or not isinstance(reply.get("is_sleeping"), bool):
            raise VllmError(f"{self.base_url}/is_sleeping: unexpected reply: {str(reply)[:200]}")
        return bool(reply["is_sleeping"])

    def sleep(self, level: int = 1, mode: str | None = None) -> None:
        """Put the server to sleep: level 1 offloads the weights to host memory and drops the KV cache (fast wake),
        level 2 drops both, level 0 only pauses scheduling. `mode` (`abort`, vLLM's default, `wait` or `keep`)
        says what happens to requests in flight. Returns once the server sleeps."""
        if level not in (0, 1, 2):
            raise ValueError("sleep level must be 0, 1 or 2")
        query = {"level": str(level)} | ({"mode": mode} if mode else {})
        self._call("POST", "/sleep", query)

    def wake_up(self, tags: Iterable[str] | None = None) -> bool:
        """Wake the server (only the allocations `tags` names, e.g. `weights` first and `kv_cache` later, when
        given). Returns whether it is fully awake and scheduling again."""
        query = [("tags", tag) for tag in tags or ()]
        reply = self._json("POST", "/wake_up", query)
        status = reply.get("status") if isinstance(reply, dict) else None
        if status not in ("awake", "sleeping"):
            raise VllmError(f"{self.base_url}/wake_up: unexpected reply: {str(reply)[:200]}")
        return status == "awake"

    def metrics(self) -> dict[str, ModelMetrics]:
        """The server's vLLM series per served model (see `ModelMetrics`)."""
        body = self._call("GET", "/metrics")
        try:
            return parse_metrics(body.decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise VllmError(f"{self.base_url}/metrics: not the Prometheus text format: {exc}") from None

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, query: Any = None) -> Any:
        body = self._call(method, path, query)
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise VllmError(f"{self.base_url}{path}: not JSON: {body[:200]!r}") from None

    def _call(self, method: str, path: str, query: Any = None) -> bytes:
        url = f"{self.base_url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return bytes(response.read(_BODY_LIMIT))
        except urllib.error.HTTPError as exc:
            raise VllmError(f"{method} {url}: HTTP {exc.code}{_detail(exc)}", exc.code) from None
        except urllib.error.URLError as exc:
            raise VllmError(f"{method} {url}: {_reason(exc.reason)}") from None
        except TimeoutError:
            raise VllmError(f"{method} {url}: no answer within {self.timeout_s:g}s") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a URL urllib cannot use
            raise VllmError(f"{method} {url}: {_reason(exc)}") from None


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, BaseException):
        text = str(reason).strip()
        return f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return str(reason)


def _detail(exc: urllib.error.HTTPError) -> str:
    """vLLM's error message (`{"error": {"message": ...}}`) or the start of the body."""
    try:
        body = exc.read(4096)
    except (OSError, http.client.HTTPException):
        return ""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        message = body.decode(errors="replace").strip()[:200]
    return f": {message}" if message else ""
