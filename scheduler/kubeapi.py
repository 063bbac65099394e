"""Raw requests to the API server through the official client's configuration, TLS and connection pool.

Lists, watches and writes go through here unparsed: decoding into the client's model objects costs many times
the CPU and memory of reading the JSON directly (DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import orjson
import urllib3


class ApiError(Exception):
    """A non-2xx answer from the API server, with the message of its `Status` body when there is one."""

    def __init__(self, status: int, reason: str = "", body: bytes | str | None = None) -> None:
        self.status = status
        self.reason = reason or ""
        self.message = self.reason
        self.body: dict[str, Any] = {}
        if body:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                self.message = str(body[:200])
            else:
                if isinstance(parsed, dict):
                    self.body = parsed
                    self.message = parsed.get("message") or self.reason
        super().__init__(f"HTTP {status}: {self.message}")


def api_request(
    api_client: Any,
    method: str,
    path: str,
    query: Sequence[tuple[str, str]] = (),
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | tuple[float, float] | None = None,
) -> Any:
    """Send one request with the client's host, TLS, credentials and connection pool; return the unread urllib3
    response.

    The request goes to the client's pool directly. The generated client's request path (`param_serialize`,
    `call_api`) walks the body and headers to sanitize them and wraps the response: on a bind that is a quarter of
    the extender's CPU for the call. The token is read per request through `auth_settings()`, which runs the
    configuration's refresh hook, so rotated service account tokens are picked up as the client would.

    Raises `ApiError` for a non-2xx status (its body read and parsed); transport failures raise urllib3's
    `HTTPError` (or `OSError`).
    """
    config = api_client.configuration
    hdrs = {"Accept": "application/json", "Accept-Encoding": "gzip", **api_client.default_headers, **(headers or {})}
    if api_client.cookie:
        hdrs["Cookie"] = api_client.cookie
    token = config.auth_settings().get("BearerToken")
    if token and token.get("value"):
        hdrs[token["key"]] = token["value"]
    url = config.host + path
    if query:
        url += "?" + urlencode(query)
    payload = None
    if body is not None:
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        hdrs.setdefault("Content-Type", "application/json")
    raw = api_client.rest_client.pool_manager.request(
        method, url, body=payload, headers=hdrs, timeout=_timeout(timeout), preload_content=False
    )
    if not 200 <= raw.status <= 299:
        data = raw.data
        raw.release_conn()
        raise ApiError(raw.status, raw.reason or "", data)
    return raw


def _timeout(timeout: float | tuple[float, float] | None) -> urllib3.Timeout | None:
    """The client's convention: one number bounds the whole request, a pair bounds connect and each read."""
    if timeout is None:
        return None
    if isinstance(timeout, tuple):
        return urllib3.Timeout(connect=timeout[0], read=timeout[1])
    return urllib3.Timeout(total=timeout)


def read_json(api_client: Any, method: str, path: str, **kwargs: Any) -> Any:
    """`api_request` and parse the (possibly gzip-encoded) JSON body."""
    raw = api_request(api_client, method, path, **kwargs)
    try:
        data = raw.data
        return orjson.loads(data) if data else None
    finally:
        raw.release_conn()
