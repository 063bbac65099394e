"""The HTTP face of the extender: kube-scheduler's verbs, health, metrics and explanations.

Every scheduler call gets a 200 with a protocol-shaped answer unless the body itself is unusable (400): a failure
to decide is reported in the protocol's `Error` field, never as a crash.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from extender.metrics import ExtenderMetrics, ReuseCollector
from extender.wire import (
    ExtenderArgs,
    ExtenderBindingArgs,
    ExtenderBindingResult,
    ExtenderPreemptionArgs,
    ExtenderPreemptionResult,
    MetaPod,
    MetaVictims,
    filter_result,
)
from scheduler.binder import CONCURRENT_BINDS
from scheduler.podspec import PodSpecError
from scheduler.service import BindError, FilterOutcome, NotReadyError, PlacementService

log = logging.getLogger("gpu_extender.http")

WireModel = TypeVar("WireModel", bound=BaseModel)


class BadRequest(Exception):
    pass


MAX_ERROR_CHARS = 500
"""An error text quotes what it refused; a refused value may be megabytes long, and a filter answer repeats its
reason once per node."""


def _brief(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _json(payload: Any) -> Response:
    return Response(content=orjson.dumps(payload), media_type="application/json")


def _validate(body: bytes, model: type[WireModel]) -> WireModel:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadRequest(f"request body must be a JSON object ({model.__name__}), got {type(document).__name__}")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors())
        raise BadRequest(_brief(f"not an {model.__name__}: {problems}")) from exc


async def _parse(request: Request, model: type[WireModel]) -> WireModel:
    return _validate(await request.body(), model)


# What a hot verb answers: HTTP status, JSON body, and optional work to do once the answer is sent.
Reply = tuple[int, bytes, Callable[[], None] | None]
Verb = Callable[[bytes], Awaitable[Reply]]

_JSON_HEADERS = [(b"content-type", b"application/json")]


class ExtenderApp:
    """A pure ASGI front for the verbs kube-scheduler calls on every pod: POST /filter, /prioritize and /bind are
    answered here, everything else by the FastAPI app behind it.

    kube-scheduler's scheduling loop is serial and waits for each call; FastAPI's middleware, routing and exception
    layers cost about 0.1 ms of CPU per call, as much as a small decision. The answers are the same functions the
    FastAPI routes call. Work a verb returns to do after its answer runs once the answer is written.
    """

    def __init__(self, app: FastAPI, verbs: Mapping[str, Verb]) -> None:
        self.app = app
        self._verbs = dict(verbs)

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and (verb := self._verbs.get(scope["path"])):
            body = await _read_body(receive)
            if body is None:
                return  # the client went away; nobody to answer
            status, payload, after = await verb(body)
            headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            if after is not None:
                after()
            return
        await self.app(scope, receive, send)


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def create_app(service: PlacementService, metrics: ExtenderMetrics) -> ExtenderApp:
    app = FastAPI(title="kube-gpu-extender", docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.metrics = metrics
    metrics.registry.register(ReuseCollector(service.score_cache, service.evaluations))

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse(status_code=400, content={"Error": str(exc)})

    # Labelled children looked up once each (prometheus_client's `labels` takes a lock and builds keys per call).
    latency = functools.cache(metrics.latency.labels)
    decisions = functools.cache(metrics.decisions.labels)
    rejections = functools.cache(metrics.rejections.labels)

    def _answer(verb: str, call: Callable[[], Any], on_error: Callable[[str], Any]) -> Any:
        """Answer one verb: time it, count the outcome, and turn any failure into the protocol's error."""
        with latency(verb).time():
            try:
                payload = call()
                outcome = "ok"
            except NotReadyError as exc:
                payload, outcome = on_error(str(exc)), "not_ready"
            except BindError as exc:
                log.warning("bind failed", extra={"error": str(exc)})
                payload, outcome = on_error(str(exc)), "error"
            except PodSpecError as exc:  # bad input, not a fault of ours: no traceback
                reason = _brief(f"GPU extender cannot read the pod's request: {exc}")
                log.info("%s: unreadable pod", verb, extra={"error": reason})
                payload, outcome = on_error(reason), "error"
            except Exception as exc:  # the scheduler must get an answer, whatever broke
                log.exception("%s failed", verb)
                payload, outcome = on_error(_brief(f"internal error in {verb}: {type(exc).__name__}: {exc}")), "error"
            decisions(verb, outcome).inc()
            return payload

    def _run(verb: str, call: Callable[[], Any], on_error: Callable[[str], Any]) -> Response:
        return _json(_answer(verb, call, on_error))

    def filter_(args: ExtenderArgs) -> tuple[Any, Callable[[], None] | None]:
        names = args.node_names()
        outcomes: list[FilterOutcome] = []

        def call() -> dict[str, Any]:
            try:
                outcome = service.filter(args.Pod, names)
            except PodSpecError as exc:
                # A pod we cannot read fits nowhere; preemption would not change that.
                reason = _brief(f"GPU extender cannot read the pod's request: {exc}")
                rejections("pod_spec").inc(len(names))
                return filter_result([], unresolvable=dict.fromkeys(names, reason))
            for reason, count in outcome.reasons.items():
                rejections(reason).inc(count)
            outcomes.append(outcome)
            return filter_result(outcome.passed, outcome.failed, outcome.unresolvable)

        payload = _answer("filter", call, lambda error: filter_result([], error=error))
        if not outcomes:
            return payload, None
        return payload, lambda: _after(service.after_filter, args.Pod, "filter", outcomes[0])

    def _after(work: Callable[..., None], pod: dict[str, Any], verb: str, *more: Any) -> None:
        try:
            work(pod, *more)
        except Exception:  # only saves work: prioritize and bind decide themselves when this did not
            log.exception("work after %s's answer failed", verb)

    def prioritize(args: ExtenderArgs) -> tuple[Any, Callable[[], None] | None]:
        names = args.node_names()

        def call() -> list[dict[str, Any]]:
            return [{"Host": host, "Score": score} for host, score in service.prioritize(args.Pod, names)]

        # kube-scheduler ignores prioritize errors; zero scores keep our answer neutral instead.
        return _answer("prioritize", call, lambda _: [{"Host": name, "Score": 0} for name in names]), None

    def bind(args: ExtenderBindingArgs) -> Any:
        def call() -> dict[str, str]:
            service.bind(args.PodNamespace, args.PodName, args.PodUID, args.Node)
            return ExtenderBindingResult().model_dump()

        return _answer("bind", call, lambda error: ExtenderBindingResult(Error=error).model_dump())

    async def filter_verb(body: bytes) -> Reply:
        # Logging and scoring ahead wait until the answer is sent: see PlacementService.after_filter.
        return _reply(body, ExtenderArgs, filter_)

    async def prioritize_verb(body: bytes) -> Reply:
        return _reply(body, ExtenderArgs, prioritize)

    binds = ThreadPoolExecutor(CONCURRENT_BINDS, thread_name_prefix="bind")

    async def bind_verb(body: bytes) -> Reply:
        # Binding talks to the API server: keep it off the event loop that answers filter and prioritize.
        call = functools.partial(_reply, body, ExtenderBindingArgs, lambda args: (bind(args), None))
        return await asyncio.get_running_loop().run_in_executor(binds, call)

    verbs: dict[str, Verb] = {"/filter": filter_verb, "/prioritize": prioritize_verb, "/bind": bind_verb}
    for path, verb in verbs.items():
        app.add_api_route(path, _route(verb), methods=["POST"], include_in_schema=False)

    @app.post("/preempt")
    async def preempt(request: Request) -> Response:
        args = await _parse(request, ExtenderPreemptionArgs)
        candidates = args.candidates()

        def call() -> dict[str, Any]:
            uids = {node: [p.UID for p in victims.Pods or []] for node, victims in candidates.items()}
            try:
                kept = service.preempt(args.Pod, uids)
            except PodSpecError as exc:
                # Filter finds such a pod no node; evicting pods for it would free room it can never use.
                log.info("preempt: unreadable pod, no victims", extra={"error": _brief(str(exc))})
                kept = {}
            result = {
                node: MetaVictims(
                    Pods=[MetaPod(UID=uid) for uid in victims], NumPDBViolations=candidates[node].NumPDBViolations
                )
                for node, victims in kept.items()
            }
            return ExtenderPreemptionResult(NodeNameToMetaVictims=result).model_dump()

        # On failure, pass the scheduler's own candidates through: preemption must not stall on us.
        return _run("preempt", call, lambda _: ExtenderPreemptionResult(NodeNameToMetaVictims=candidates).model_dump())

    @app.post("/explain")
    async def explain(request: Request) -> Response:
        """Why a pod would go where: POST a Pod (and optionally `NodeNames`) to see every node's verdict."""
        args = await _parse(request, ExtenderArgs)
        try:
            return _json({"nodes": service.explain(args.Pod, args.NodeNames)})
        except (PodSpecError, NotReadyError) as exc:
            raise BadRequest(_brief(str(exc))) from exc

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = service.model.ready
        return Response(
            content=orjson.dumps({"ready": ready}), status_code=200 if ready else 503, media_type="application/json"
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(content=generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return ExtenderApp(app, verbs)


def _reply(
    body: bytes, model: type[WireModel], answer: Callable[[WireModel], tuple[Any, Callable[[], None] | None]]
) -> Reply:
    """Validate, answer and encode one call; a body that is not the verb's arguments gets a 400 naming why."""
    try:
        args = _validate(body, model)
    except BadRequest as exc:
        return 400, orjson.dumps({"Error": str(exc)}), None
    payload, after = answer(args)
    return 200, orjson.dumps(payload), after


def _route(verb: Verb) -> Callable[[Request], Awaitable[Response]]:
    """The same verb as a FastAPI route, for requests the ASGI front passes on."""

    async def endpoint(request: Request) -> Response:
        status, payload, after = await verb(await request.body())
        background = BackgroundTask(after) if after is not None else None
        return Response(content=payload, status_code=status, media_type="application/json", background=background)

    return endpoint
