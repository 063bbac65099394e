"""Raw requests to the API server through the official client's configuration, TLS and connection pool.

Lists, watches and writes go through here unparsed: decoding into the client's model objects costs many times
the CPU and memory of reading the JSON directly (DESIGN.md §2). Lists and watches use the client's urllib3 pool
(`api_request`); the per-pod write, the bind, goes through libcurl (`CurlSession`).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

import certifi
import orjson
import pycurl
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
    `call_api`) walks the body and headers to sanitize them and wraps the response: on a small write that was a
    quarter of the CPU of the call. The token is read per request through `auth_settings()`, which runs the
    configuration's refresh hook, so rotated service account tokens are picked up as the client would.

    Raises `ApiError` for a non-2xx status (its body read and parsed); transport failures raise urllib3's
    `HTTPError` (or `OSError`).
    """
    config = api_client.configuration
    hdrs = {
        "Accept": "application/json",
        "Accept-Encoding": "gzip",
        **_client_headers(api_client),
        **(headers or {}),
        **_auth_header(config),
    }
    url = config.host + path
    if query:
        url += "?" + urlencode(query)
    payload = None
    if body is not None:
        payload = _json_body(body)
        hdrs.setdefault("Content-Type", "application/json")
    raw = api_client.rest_client.pool_manager.request(
        method, url, body=payload, headers=hdrs, timeout=_timeout(timeout), preload_content=False
    )
    if not 200 <= raw.status <= 299:
        data = raw.data
        raw.release_conn()
        raise ApiError(raw.status, raw.reason or "", data)
    return raw


def _json_body(body: Any) -> bytes:
    """A request body: bytes as given (already encoded), anything else as JSON."""
    return body if isinstance(body, bytes) else orjson.dumps(body)


def _client_headers(api_client: Any) -> dict[str, str]:
    """The client's own headers on every request: its defaults (the User-Agent) and its cookie."""
    headers = dict(api_client.default_headers)
    if api_client.cookie:
        headers["Cookie"] = api_client.cookie
    return headers


def _auth_header(config: Any) -> dict[str, str]:
    """The token of this moment: `auth_settings()` runs the configuration's refresh hook, as the client's calls do."""
    token = config.auth_settings().get("BearerToken")
    return {token["key"]: token["value"]} if token and token.get("value") else {}


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


class CurlSession:
    """Short JSON requests through libcurl, each thread on a connection of its own that it keeps.

    The bind is the extender's one API request per pod, and every millisecond of CPU it takes is shared with the
    scheduling loop. Through urllib3 and `http.client` a Binding cost 1.6 ms of CPU (the request is assembled and
    the response headers parsed in Python, with the `email` package); through libcurl 0.55 ms, and the interpreter
    lock is released for the whole exchange (400 sequential Bindings against kube-apiserver v1.36 on loopback).

    The settings are the client configuration's, as `api_request` uses them: host, CA (certifi's bundle when none
    is set, as the client does), client certificate, verification, TLS server name, proxy, default headers (the
    User-Agent), cookie, and the token of the moment through `auth_settings()`. Raises `ApiError` for a non-2xx
    status and `ConnectionError` when no answer came.
    """

    def __init__(self, api_client: Any, timeout: float | tuple[float, float] = (5.0, 10.0)) -> None:
        config = api_client.configuration
        self._config = config
        self._local = threading.local()
        parts = urlsplit(config.host)
        self._base = config.host.rstrip("/")
        options: list[tuple[int, Any]] = [
            (pycurl.NOSIGNAL, 1),  # several threads: no SIGALRM for timeouts
            (pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1),
            (pycurl.PROXY, config.proxy or ""),  # "" ignores *_proxy variables, as the client's pool does
            (pycurl.CAINFO, config.ssl_ca_cert or certifi.where()),
        ]
        if config.cert_file:
            options += [(pycurl.SSLCERT, config.cert_file), (pycurl.SSLKEY, config.key_file)]
        if not config.verify_ssl:
            options += [(pycurl.SSL_VERIFYPEER, 0), (pycurl.SSL_VERIFYHOST, 0)]
        elif config.assert_hostname is False:
            options.append((pycurl.SSL_VERIFYHOST, 0))
        server_name = getattr(config, "tls_server_name", None)
        if server_name and parts.hostname:
            # Connect where the host points, but send and verify the configured server name.
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            options.append((pycurl.CONNECT_TO, [f"{server_name}:{port}:{host}:{port}"]))
            self._base = f"{parts.scheme}://{server_name}:{port}{parts.path.rstrip('/')}"
        if isinstance(timeout, tuple):
            options += [
                (pycurl.CONNECTTIMEOUT_MS, int(timeout[0] * 1000)),
                (pycurl.TIMEOUT_MS, int(sum(timeout) * 1000)),
            ]
        else:
            options.append((pycurl.TIMEOUT_MS, int(timeout * 1000)))
        self._options = options
        headers = {"Accept": "application/json", **_client_headers(api_client)}
        headers["Expect"] = ""  # no 100-continue round trip before a body
        self._headers = [f"{k}: {v}" for k, v in headers.items()]

    def _handle(self) -> pycurl.Curl:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = pycurl.Curl()
            for option, value in self._options:
                handle.setopt(option, value)
            self._local.handle = handle
        return handle

    def request_json(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request on this thread's connection; return the parsed JSON answer (None when empty)."""
        headers = self._headers + [f"{k}: {v}" for k, v in _auth_header(self._config).items()]
        handle = self._handle()
        if body is None:
            handle.setopt(pycurl.HTTPGET, 1)
        else:
            handle.setopt(pycurl.POSTFIELDS, _json_body(body))
            headers.append("Content-Type: application/json")
        handle.setopt(pycurl.CUSTOMREQUEST, method)
        handle.setopt(pycurl.URL, self._base + path)
        handle.setopt(pycurl.HTTPHEADER, headers)
        received = io.BytesIO()
        handle.setopt(pycurl.WRITEDATA, received)
        try:
            handle.perform()
        except pycurl.error as exc:
            code, message = exc.args if len(exc.args) == 2 else (0, str(exc))
            raise ConnectionError(f"{message or 'libcurl error'} (curl {code})") from None
        status = handle.getinfo(pycurl.RESPONSE_CODE)
        data = received.getvalue()
        if not 200 <= status <= 299:
            raise ApiError(status, "", data)
        return orjson.loads(data) if data else None
