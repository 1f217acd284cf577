"""The FastAPI app: routes are thin, the work is in `petal.serve.service`.

Models are loaded in the lifespan (not at import), so importing this module is cheap
and a bad bundle stops the server at startup with the reason. torch is never imported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from petal import __version__
from petal.serve import v2
from petal.serve.config import Limits, ServeConfig, VertexEnv
from petal.serve.guards import BrowserGuard, content_type_ok, host_name, is_loopback
from petal.serve.limits import BodySizeLimit, ConcurrencyLimit, bearer_ok, within_limit
from petal.serve.metrics import Metrics, MetricsMiddleware
from petal.serve.protocol import RequestError
from petal.serve.service import ModelNotFound, Service

log = logging.getLogger("petal.serve")

PREDICT_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "required": ["instances"], "properties": {"instances": {
        "type": "array", "items": {"type": "object", "properties": {
            "image_bytes": {"type": "object", "properties": {"b64": {"type": "string"}}},
            "key": {"description": "any value, passed back unchanged"}}}}}},
    "example": {"instances": [{"image_bytes": {"b64": "<base64 JPEG>"}, "key": "1"}]}}}}}
UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"file": {"type": "array", "items": {"type": "string",
                                                                         "format": "binary"}}}}}}}}


def body_types(*allowed: str) -> list:
    """A route dependency: 415 to a Content-Type other than these (none is fine: see petal.serve.guards)."""

    async def check(request: Request) -> None:
        if not content_type_ok(value := request.headers.get("content-type"), allowed):
            raise HTTPException(415, f"content-type: expected {' or '.join(allowed)}, got {value[:100]!r}")

    return [Depends(check)]


JSON_BODY = body_types("application/json")
V2_BODY = body_types("application/json", "application/octet-stream")  # octet-stream: the binary extension


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error answers {"error": "..."}; client mistakes are 4xx, never 5xx."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
            message = f"{message.lower()}: {request.method} {request.url.path}"
        return error(e.status_code, message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(400, v2.describe_errors(list(e.errors())))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        log.info("%s %s: %d %s", request.method, request.url.path, e.status, str(e)[:300])  # one line, no traceback
        return error(e.status, str(e))

    @app.exception_handler(ModelNotFound)
    async def not_found(request: Request, e: ModelNotFound) -> JSONResponse:
        return error(404, str(e))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:  # logged by Starlette with the traceback
        return error(500, f"internal server error ({type(e).__name__})")


def create_app(config: ServeConfig, host: str = "127.0.0.1") -> FastAPI:
    """The app for `config`, listening on `host` (a loopback one answers loopback Host names only)."""
    metrics = Metrics()
    service = Service(config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.load)
        metrics.ready.set(1)
        yield
        metrics.ready.set(0)
        await asyncio.to_thread(service.close)  # queued batches finish first

    # FastAPIOffline: /docs and /redoc load Swagger UI / ReDoc from the package, not a CDN
    app = FastAPIOffline(title="petal serve", version=__version__, lifespan=lifespan,
                         description="Image classification in the Cloud ML / TF Serving row format.")
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(ConcurrencyLimit, max_requests=config.limits.max_concurrency)
    app.add_middleware(BrowserGuard, loopback=is_loopback(host_name(host)), has_key=bool(config.api_key))
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, sees every answer
    install_error_handlers(app)

    async def require_key(request: Request) -> None:
        if config.api_key and not bearer_ok(request.headers.get("authorization"), config.api_key):
            raise HTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]
    app.include_router(operations(service, metrics, auth, config.api_key))
    app.include_router(model_api(service, config.limits, auth))
    app.include_router(v2_api(service, config.limits, auth))
    if config.vertex is not None:
        app.include_router(vertex_api(service, config.limits, auth, config.vertex))
    return app


def operations(service: Service, metrics: Metrics, auth: list, api_key: str | None) -> APIRouter:
    """The page, health, readiness and Prometheus metrics."""
    router = APIRouter()
    page = resources.files("petal.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    shared = resources.files("petal.webpage").joinpath("page")  # the cards, shared with `export --web`
    css, js = (shared.joinpath(f"cards.{ext}").read_text(encoding="utf-8") for ext in ("css", "js"))

    @router.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @router.get("/cards.css", include_in_schema=False)
    async def cards_css() -> Response:
        return Response(css, media_type="text/css")

    @router.get("/cards.js", include_in_schema=False)
    async def cards_js() -> Response:
        return Response(js, media_type="text/javascript")

    @router.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: every model is loaded and its inference worker runs "
                "(the models are named to callers with the API key)")
    async def readyz(request: Request):  # noqa: ANN202 - FastAPI would make `JSONResponse | dict` a response model
        named = not api_key or bearer_ok(request.headers.get("authorization"), api_key)
        if not service.ready:
            return error(503, "not ready: models are loading or the server is shutting down")
        dead = [m.name for m in service.models.values() if not m.batcher.alive]
        if dead:
            which = ", ".join(dead) if named else f"{len(dead)} model(s)"
            return error(503, f"not ready: the inference worker of {which} stopped; restart the server")
        return {"status": "ready", "models": list(service.models)} if named else {"status": "ready"}

    @router.get("/metrics", dependencies=auth, summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return router


def model_api(service: Service, limits: Limits, auth: list) -> APIRouter:
    """The TF Serving style model routes: list, predict, upload, status, metadata."""
    router = APIRouter(dependencies=auth)

    @router.get("/v1/models", summary="The served models")
    async def list_models() -> dict:
        return {"models": [{"name": m.name, "version": m.version, "state": "AVAILABLE",
                            "labels": m.model.labels} for m in service.models.values()]}

    @router.post("/v1/models/{name}:predict", openapi_extra=PREDICT_DOC, dependencies=JSON_BODY,
                 summary="Predict, Cloud ML / TF Serving row format")
    async def predict(name: str, request: Request, unknown: bool = Query(
            True, description="false: never answer unknown (ood_score is still given)")) -> JSONResponse:
        served = service.get(name)
        doc = await within_limit(request.body(), lambda body: service.predict_json(served, body, unknown),
                                 limits.timeout_s)
        return JSONResponse(doc)  # plain JSON already: skip FastAPI's slow recursive encoder

    @router.get("/v1/models/{name}:predict", include_in_schema=False)
    @router.get("/v1/models/{name}:upload", include_in_schema=False)
    async def wrong_method(name: str) -> JSONResponse:
        return error(405, "method not allowed: use POST", {"Allow": "POST"})

    @router.post("/v1/models/{name}:upload", openapi_extra=UPLOAD_DOC,
                 summary="Upload image files (multipart), get top-k labels")
    async def upload(name: str, request: Request, top_k: int = Query(5, ge=1, le=1000),
                     unknown: bool = Query(True, description="false: never answer unknown")) -> JSONResponse:
        served = service.get(name)
        rows = await within_limit(read_files(request, limits.max_images),
                                  lambda files: service.predict_files(served, files, top_k, unknown), limits.timeout_s)
        return JSONResponse({"model": name, "predictions": rows})

    @router.get("/v1/models/{name}", summary="Model status, TF Serving shape")
    async def model_status(name: str) -> dict:
        m = service.get(name)
        return {"model_version_status": [{"version": m.version, "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    @router.get("/v1/models/{name}/metadata", summary="Labels and backbone")
    async def model_metadata(name: str) -> dict:
        m = service.get(name)
        return {"model_spec": {"name": m.name, "version": m.version}, "metadata": m.metadata()}

    return router


def vertex_api(service: Service, limits: Limits, auth: list, vertex: VertexEnv) -> APIRouter:
    """The routes Vertex AI names (AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE), for the first model."""
    router = APIRouter(tags=["Vertex AI"])

    @router.get(vertex.health_route, summary="Vertex AI health: 200 once the model is loaded")
    async def health():  # noqa: ANN202
        return {"status": "ready"} if service.ready else error(503, "not ready: the model is loading")

    @router.post(vertex.predict_route, dependencies=auth + JSON_BODY,
                 summary="Vertex AI predict: {instances} -> {predictions}")
    async def predict(request: Request) -> JSONResponse:
        if not service.models:
            return error(503, "not ready: the model is loading")
        served = service.get(next(iter(service.models)))
        return JSONResponse(await within_limit(request.body(), lambda b: service.predict_json(served, b),
                                               limits.timeout_s))

    return router


def v2_api(service: Service, limits: Limits, auth: list) -> APIRouter:
    """The Open Inference Protocol (KServe v2) REST routes (petal.serve.v2)."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

    @router.get("/health/live", summary="Liveness")
    async def live() -> dict:
        return {"live": True}

    @router.get("/health/ready", summary="Readiness: every model is loaded")
    async def ready():  # noqa: ANN202
        return {"ready": True} if service.ready else error(503, "not ready: models are loading")

    @router.get("/models/{name}", dependencies=auth, summary="Model metadata: input and output tensors")
    async def metadata(name: str) -> dict:
        m = service.get(name)
        return v2.model_metadata(m.name, m.version, m.model.preprocess.input_size, len(m.model.labels),
                                 "ood_score" in m.model.outputs)

    @router.get("/models/{name}/ready", dependencies=auth, summary="Model readiness")
    async def model_ready(name: str) -> dict:
        return {"name": service.get(name).name, "ready": service.ready}

    @router.post("/models/{name}/infer", dependencies=auth + V2_BODY,
                 summary="Inference: images in, probabilities out")
    async def infer(name: str, request: Request, unknown: bool = Query(
            True, description="false: labels are always the nearest class")) -> JSONResponse:
        served = service.get(name)
        length = request.headers.get(v2.HEADER_LENGTH)
        return JSONResponse(await within_limit(
            request.body(), lambda body: service.infer_v2(served, body, length, reject_unknown=unknown),
            limits.timeout_s))

    return router


async def read_files(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    """A multipart body -> [(filename, bytes)] of every file part, whatever its field name."""
    # The body size is already capped by BodySizeLimit; count files ourselves for a clear 413.
    async with request.form(max_files=10_000, max_fields=1_000) as form:
        parts = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not parts:
            raise HTTPException(400, "expected one or more image files in a multipart/form-data body "
                                     "(e.g. curl -F file=@a.jpg), got none")
        if len(parts) > max_files:
            raise HTTPException(413, f"at most {max_files} files per request, got {len(parts)}")
        return [(p.filename or f"file{i}", await p.read()) for i, p in enumerate(parts)]
