"""A minimal client for Prometheus's HTTP query API (`/api/v1/query`), with the standard library only.

Queries go as a POST form (long selectors do not hit URL limits). Results of type `vector` and `matrix` are both
returned as series of (unix seconds, value) samples; `NaN` values are dropped.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["PrometheusClient", "PrometheusError", "Series", "parse_result"]


class PrometheusError(Exception):
    """The query did not produce a result: connection failure, timeout, HTTP error or an error reply."""


@dataclass(frozen=True)
class Series:
    labels: Mapping[str, str]
    samples: tuple[tuple[float, float], ...]


def _samples(points: Any) -> tuple[tuple[float, float], ...]:
    out = []
    for point in points or ():
        try:
            ts, value = float(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError):
            continue
        if not math.isnan(value):
            out.append((ts, value))
    return tuple(out)


def parse_result(body: bytes) -> list[Series]:
    """The series of a `/api/v1/query` reply; raises `PrometheusError` for an error reply or an unreadable body."""
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PrometheusError(f"unreadable reply: {exc}") from None
    if not isinstance(reply, dict) or reply.get("status") != "success":
        error = reply.get("error") if isinstance(reply, dict) else None
        kind = reply.get("errorType") if isinstance(reply, dict) else None
        raise PrometheusError(f"query failed: {kind or 'error'}: {error or str(reply)[:200]}")
    data = reply.get("data") or {}
    kind = data.get("resultType")
    if kind not in ("vector", "matrix"):
        raise PrometheusError(f"expected a vector or matrix result, got {kind!r}")
    series = []
    for item in data.get("result") or ():
        labels = item.get("metric") or {}
        points = item.get("values") if kind == "matrix" else [item.get("value")]
        series.append(Series({str(k): str(v) for k, v in labels.items()}, _samples(points)))
    return series


class PrometheusClient:
    def __init__(self, url: str, timeout_s: float = 5.0, headers: Mapping[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})

    def query(self, promql: str, at: float | None = None) -> list[Series]:
        """Evaluate `promql` (at unix time `at`, default Prometheus's now)."""
        form = {"query": promql}
        if at is not None:
            form["time"] = f"{at:.3f}"
        request = urllib.request.Request(
            f"{self.url}/api/v1/query",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json", **self.headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            try:
                parse_result(exc.read(4096))  # Prometheus explains a 400, 422 or 503 in the body
            except PrometheusError as inner:
                raise PrometheusError(f"HTTP {exc.code}: {inner}") from None
            raise PrometheusError(f"HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PrometheusError(f"{type(exc).__name__}: {reason}") from None
        return parse_result(body)
