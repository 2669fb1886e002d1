"""The ASGI app of ``vlsparse serve``: :func:`create_app` (a FastAPI app around one loaded Pipeline).

    GET  /             the page (static/index.html): pick an image, ask, see the top answers as bars
    POST /v1/predict   multipart form (image file, question, top_k) or JSON (image base64, question, top_k)
                       -> {"answers": [{"answer", "score"}...], "bundle_id", "latency_ms", "batch_size"}
    GET  /v1/model     the bundle: id, model, task, sparsity, format, answers, metrics, limits
    GET  /healthz      {"status": "ok"} (503 "draining" once shutdown began)
    GET  /metrics      Prometheus text (vlsparse.serve.metrics)
    GET  /openapi.json, /docs   the OpenAPI schema and its Swagger UI

Why FastAPI (on Starlette, served by uvicorn): it writes the OpenAPI schema and /docs from the route
declarations and pydantic models, which Starlette alone does not; everything else (requests, multipart
parsing, lifespan, the test client) is Starlette's, which FastAPI builds on, and it adds no torch.

Requests to /v1/predict are parsed and checked (vlsparse.serve.inputs), their images decoded in a thread,
then queued in a :class:`~vlsparse.serve.batching.Batcher` that runs them as batches through the Pipeline in
worker threads, so the event loop never blocks on the model. Errors are JSON ``{"error", "field"}`` with a 4xx
status (or 500, 503, 504); no request can stop the server.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from vlsparse._version import __version__
from vlsparse.runtime.bundle import MANIFEST, sha256
from vlsparse.runtime.pipeline import Pipeline
from vlsparse.serve.batching import Batcher, BatcherClosed, QueueFull
from vlsparse.serve.inputs import ApiError, Query, decode_image, parse_predict
from vlsparse.serve.metrics import Metrics
from vlsparse.serve.settings import Settings

__all__ = ["create_app", "model_info", "answer_batch"]


class Answer(BaseModel):
    answer: str
    score: float  # sigmoid(logit) in [0, 1]


class Prediction(BaseModel):
    answers: list[Answer]
    bundle_id: str  # sha256 of the bundle's manifest.json
    latency_ms: float  # server-side: from reading the request to the answer
    batch_size: int  # requests in the model batch that answered this one


class ErrorBody(BaseModel):
    error: str
    field: Optional[str] = None


def answer_batch(pipeline: Pipeline, queries: list[Query]) -> list[tuple[list[tuple[str, float]], int]]:
    """One Pipeline call for all ``queries``; per query its own top_k (answer, score) pairs and the batch size.

    Raises: as :meth:`Pipeline.__call__` (ValueError for an input it refuses).
    """
    k = max(q.top_k for q in queries)
    out = pipeline([q.image for q in queries], [q.question for q in queries], top_k=k)
    return [(answers[:q.top_k], len(queries)) for answers, q in zip(out, queries)]


def model_info(pipeline: Pipeline, settings: Settings) -> dict:
    """GET /v1/model: the bundle's id (sha256 of manifest.json) and metadata, and the server's limits."""
    b = pipeline.bundle
    return {"id": sha256(b.path / MANIFEST), "model": b.ticket.get("model"), "task": b.ticket.get("task"),
            "sparsity": b.ticket.get("sparsity"), "format": b.kind, "answers": pipeline.answers,
            "metrics": b.ticket.get("metrics"), "vlsparse_version": b.manifest.get("vlsparse_version"),
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_question_chars": settings.max_question_chars,
                       "max_image_side": settings.max_image_side, "timeout_s": settings.timeout_s,
                       "max_queue": settings.max_queue, "max_batch": settings.max_batch,
                       "max_wait_ms": settings.max_wait_ms, "default_top_k": settings.default_top_k}}


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


class _CountRequests:
    """ASGI middleware: count every HTTP response by endpoint and status; time POST /v1/predict."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.count(scope["path"], status[0])
            if scope["path"] == "/v1/predict":
                self.metrics.latency.observe(time.perf_counter() - t0)


def _predict_doc(settings: Settings) -> dict:
    """The request body and error responses of POST /v1/predict for the OpenAPI schema."""
    fields = {"question": {"type": "string", "maxLength": settings.max_question_chars},
              "top_k": {"type": "integer", "minimum": 1, "default": settings.default_top_k}}
    body = {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", "question"], "properties": {
            "image": {"type": "string", "format": "binary"}, **fields}}},
        "application/json": {"schema": {"type": "object", "required": ["image", "question"], "properties": {
            "image": {"type": "string", "format": "byte", "description": "base64 (a data: URL is allowed)"},
            **fields}}}}}
    return {"requestBody": body}


_ERRORS = {code: {"model": ErrorBody, "description": what} for code, what in (
    (400, "unreadable body"), (413, "body over the upload limit"), (415, "not multipart/form-data or JSON"),
    (422, "a field out of its limits (named in `field`)"), (500, "the model failed on this request"),
    (503, "queue full (Retry-After) or shutting down"), (504, "no answer within the request timeout"))}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        return _error(422, str(first.get("msg", "invalid request")), ".".join(map(str, first.get("loc", ())[1:])) or None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}"[:300])


async def _answer(batcher: Batcher, query: Query, timeout_s: float) -> tuple[list, int]:
    """Queue one query and wait for its answer, at most ``timeout_s`` seconds.

    Raises:
        ApiError: 503 (queue full, with Retry-After; or shutting down), 504 (timeout), 422 (the Pipeline refused
            the input, field "image" or "question"), 500 (the model failed).
    """
    try:
        future = batcher.submit(query)
    except QueueFull as exc:
        raise ApiError(503, None, str(exc), {"Retry-After": str(exc.retry_after_s)}) from None
    except BatcherClosed as exc:
        raise ApiError(503, None, str(exc), {"Retry-After": "1"}) from None
    try:
        return await asyncio.wait_for(future, max(timeout_s, 1e-3))
    except asyncio.TimeoutError:
        raise ApiError(504, None, f"no answer within the request timeout ({timeout_s:g} s left)") from None
    except ValueError as exc:
        field = "question" if str(exc).startswith("question") else "image"
        raise ApiError(422, field, str(exc).splitlines()[0][:300]) from None
    except Exception as exc:
        raise ApiError(500, None, f"the model failed on this request: {type(exc).__name__}: {exc}"[:300]) from None


def create_app(pipeline: Pipeline, settings: Optional[Settings] = None) -> FastAPI:
    """A FastAPI app serving ``pipeline`` with ``settings`` (default :class:`Settings`()).

    The app's lifespan starts and stops its batcher: serve it with uvicorn (vlsparse.serve.server.run) or
    use ``starlette.testclient.TestClient(app)`` as a context manager. ``app.state`` holds ``pipeline``,
    ``settings``, ``batcher``, ``metrics`` (its own Prometheus registry) and ``info`` (GET /v1/model).
    """
    settings = settings or Settings()
    batcher = Batcher(lambda queries: answer_batch(pipeline, queries), max_batch=settings.max_batch,
                      max_wait_s=settings.max_wait_ms / 1e3, max_queue=settings.max_queue, workers=settings.workers)
    metrics = Metrics(settings.max_batch, lambda: batcher.depth, lambda: batcher.in_flight)
    batcher.on_batch = metrics.batch_size.observe
    info = model_info(pipeline, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(title="vlsparse serve", version=__version__, lifespan=lifespan,
                  description=f"Answers questions about images with a {info['format']} bundle "
                              f"({info['model']}, {info['task']}).")
    app.state.pipeline, app.state.settings, app.state.batcher = pipeline, settings, batcher
    app.state.metrics, app.state.info = metrics, info
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app)
    page = resources.files("vlsparse.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        """{"status": "ok"}, or 503 {"status": "draining"} once shutdown began."""
        if batcher.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model():
        """The bundle's id (sha256 of manifest.json), model, task, sparsity, format, answers; the limits."""
        return info

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/predict", response_model=Prediction, responses=_ERRORS, openapi_extra=_predict_doc(settings))
    async def predict(request: Request):
        """Top-k answers to a question about an image, with scores in [0, 1] and the server-side latency (ms)."""
        t0 = time.perf_counter()
        image, question, top_k = await parse_predict(request, settings)
        array = await run_in_threadpool(decode_image, image, settings.max_image_side)
        answers, size = await _answer(batcher, Query(array, question, top_k),
                                      settings.timeout_s - (time.perf_counter() - t0))
        return {"answers": [{"answer": a, "score": s} for a, s in answers], "bundle_id": info["id"],
                "latency_ms": (time.perf_counter() - t0) * 1e3, "batch_size": size}

    return app
