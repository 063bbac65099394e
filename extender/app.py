"""The HTTP face of the extender: kube-scheduler's verbs, health, metrics and explanations.

Every scheduler call gets a 200 with a protocol-shaped answer unless the body itself is unusable (400): a failure
to decide is reported in the protocol's `Error` field, never as a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from extender.metrics import ExtenderMetrics
from extender.wire import (
    ExtenderArgs,
    ExtenderBindingArgs,
    ExtenderBindingResult,
    ExtenderFilterResult,
    ExtenderPreemptionArgs,
    ExtenderPreemptionResult,
    MetaPod,
    MetaVictims,
)
from scheduler.podspec import PodSpecError
from scheduler.service import BindError, NotReadyError, PlacementService

log = logging.getLogger("gpu_extender.http")

WireModel = TypeVar("WireModel", bound=BaseModel)


class BadRequest(Exception):
    pass


def _json(payload: Any) -> Response:
    return Response(content=orjson.dumps(payload), media_type="application/json")


async def _parse(request: Request, model: type[WireModel]) -> WireModel:
    body = await request.body()
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
        raise BadRequest(f"not an {model.__name__}: {problems}") from exc


def create_app(service: PlacementService, metrics: ExtenderMetrics) -> FastAPI:
    app = FastAPI(title="kube-gpu-extender", docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.metrics = metrics

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse(status_code=400, content={"Error": str(exc)})

    def _run(verb: str, call: Callable[[], Any], on_error: Callable[[str], Any]) -> Response:
        """Answer one verb: time it, count the outcome, and turn any failure into the protocol's error."""
        with metrics.latency.labels(verb).time():
            try:
                payload = call()
                outcome = "ok"
            except NotReadyError as exc:
                payload, outcome = on_error(str(exc)), "not_ready"
            except BindError as exc:
                log.warning("bind failed", extra={"error": str(exc)})
                payload, outcome = on_error(str(exc)), "error"
            except Exception as exc:  # the scheduler must get an answer, whatever broke
                log.exception("%s failed", verb)
                payload, outcome = on_error(f"internal error in {verb}: {type(exc).__name__}: {exc}"), "error"
            metrics.decisions.labels(verb, outcome).inc()
            return _json(payload)

    @app.post("/filter")
    async def filter_(request: Request) -> Response:
        args = await _parse(request, ExtenderArgs)
        names = args.node_names()

        def call() -> dict[str, Any]:
            try:
                outcome = service.filter(args.Pod, names)
            except PodSpecError as exc:
                # A pod we cannot read fits nowhere; preemption would not change that.
                reason = f"GPU extender cannot read the pod's request: {exc}"
                metrics.rejections.labels("pod_spec").inc(len(names))
                return ExtenderFilterResult(FailedAndUnresolvableNodes=dict.fromkeys(names, reason)).model_dump()
            for reason, count in outcome.reasons.items():
                metrics.rejections.labels(reason).inc(count)
            return ExtenderFilterResult(
                NodeNames=outcome.passed, FailedNodes=outcome.failed, FailedAndUnresolvableNodes=outcome.unresolvable
            ).model_dump()

        return _run("filter", call, lambda error: ExtenderFilterResult(Error=error).model_dump())

    @app.post("/prioritize")
    async def prioritize(request: Request) -> Response:
        args = await _parse(request, ExtenderArgs)
        names = args.node_names()

        def call() -> list[dict[str, Any]]:
            return [{"Host": host, "Score": score} for host, score in service.prioritize(args.Pod, names)]

        # kube-scheduler ignores prioritize errors; zero scores keep our answer neutral instead.
        return _run("prioritize", call, lambda _: [{"Host": name, "Score": 0} for name in names])

    @app.post("/bind")
    async def bind(request: Request) -> Response:
        args = await _parse(request, ExtenderBindingArgs)

        def call() -> dict[str, str]:
            service.bind(args.PodNamespace, args.PodName, args.PodUID, args.Node)
            return ExtenderBindingResult().model_dump()

        # Binding talks to the API server: keep it off the event loop that answers filter and prioritize.
        return await run_in_threadpool(
            _run, "bind", call, lambda error: ExtenderBindingResult(Error=error).model_dump()
        )

    @app.post("/preempt")
    async def preempt(request: Request) -> Response:
        args = await _parse(request, ExtenderPreemptionArgs)
        candidates = args.candidates()

        def call() -> dict[str, Any]:
            uids = {node: [p.UID for p in victims.Pods or []] for node, victims in candidates.items()}
            kept = service.preempt(args.Pod, uids)
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
            raise BadRequest(str(exc)) from exc

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

    return app
