"""The FastAPI application: routes, the API-key check, error handlers and metrics middleware.

    app = create_app(engine, ServerConfig(served_model_name="smollm2"))   # engine already started
    uvicorn.run(app, host="127.0.0.1", port=8000)

Owns: which endpoints exist (``GET /health``, ``GET /metrics``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``) and the Bearer check on ``/v1/*``. It does not
own the engine's lifecycle or the socket (``autoglm_jax.cli.serve``), nor what a handler does
(``chat.py``, ``completions.py``).
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from autoglm_jax.engine.async_engine import AutoGLMEngine
from autoglm_jax.server.chat import create_chat_completion
from autoglm_jax.server.completions import create_completion
from autoglm_jax.server.config import ServerConfig
from autoglm_jax.server.errors import APIError, install_error_handlers
from autoglm_jax.server.metrics import HTTPMetricsMiddleware, ServerMetrics
from autoglm_jax.server.protocol import ChatCompletionRequest, CompletionRequest
from autoglm_jax.server.responses import ChatCompletion, Completion, Health, ModelCard, ModelList
from autoglm_jax.server.state import ServerState

_ERROR_RESPONSES = {status: {"description": text} for status, text in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
    (429, "too many requests in flight"), (503, "engine not running"))}


def require_api_key(request: Request) -> None:
    expected = request.app.state.server.config.api_key
    if expected is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), expected.encode()):
        raise APIError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def _v1_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERROR_RESPONSES)

    @router.get("/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        state: ServerState = request.app.state.server
        card = ModelCard(id=state.config.served_model_name, created=state.created,
                         max_model_len=state.max_sequence_length)
        return ModelList(data=[card])

    @router.post("/chat/completions", response_model=None,
                 responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {}}}})
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await create_chat_completion(request, body)

    @router.post("/completions", response_model=None,
                 responses={200: {"model": Completion, "content": {"text/event-stream": {}}}})
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await create_completion(request, body)

    return router


def create_app(engine: AutoGLMEngine, config: ServerConfig) -> FastAPI:
    """An app serving ``engine`` (started by the caller, who also stops it after the server exits)."""
    app = FastAPI(title="autoglm-jax OpenAI-compatible server", version="1")
    metrics = ServerMetrics(engine)
    app.state.server = ServerState(engine=engine, config=config, metrics=metrics)
    install_error_handlers(app)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Response:
        running = engine.is_running
        return JSONResponse({"status": "ok" if running else "stopped"}, status_code=200 if running else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(_v1_router())
    endpoints = frozenset(app.openapi()["paths"])  # other paths are counted as "other"
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, endpoints=endpoints)
    return app
