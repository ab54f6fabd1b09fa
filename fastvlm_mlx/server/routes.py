"""The HTTP side: the routes (one ``APIRouter``; a new route is a function here) and ``create_app``, which adds the
OpenAI error bodies, the API key check and the scheduler's start and stop. Routes reach the model only through
``serving.ChatService``, which ``request.app.state.service`` holds."""

import asyncio
import contextlib
import json
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import responses
from .config import ServerConfig
from .protocol import APIError, ChatCompletionResponse
from .serving import ChatService

router = APIRouter()
STATIC = Path(__file__).parent / "static"  # the web page: plain files, no build step, nothing from elsewhere
OPEN_PATHS = ("/", "/health")  # reachable without the API key; so is everything under /ui/ (the page asks for it)


def service_of(request: Request) -> ChatService:
    return request.app.state.service


@router.get("/health")
async def health(request: Request):
    if not service_of(request).alive:
        return JSONResponse({"status": "generation loop stopped"}, status_code=503)
    return {"status": "ok"}


@router.get("/v1/models")
async def models(request: Request):
    service = service_of(request)
    model = {"id": service.model_id, "object": "model", "created": 0, "owned_by": "fastvlm-mlx"}
    model["image_size"] = service.engine.processor.image_size  # extension: the page scales camera frames to it
    return {"object": "list", "data": [model]}


@router.get("/metrics")
async def prometheus(request: Request):
    return PlainTextResponse(service_of(request).render_metrics(), media_type="text/plain; version=0.0.4")


async def json_body(request: Request, limit: int):
    """The request's body as decoded JSON; 413 over ``limit`` bytes (by its declared length before reading it)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"request body over {limit} bytes", None, "request_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise APIError(413, f"request body over {limit} bytes", None, "request_too_large")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    received = time.perf_counter()
    service = service_of(request)
    body = await json_body(request, service.cfg.max_body_bytes)
    result = await service.create(body, request.is_disconnected, received)
    if isinstance(result, ChatCompletionResponse):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream")


@router.post("/v1/responses")
async def create_response(request: Request):
    received = time.perf_counter()
    service = service_of(request)
    body = await json_body(request, service.cfg.max_body_bytes)
    result = await responses.create(service, body, request.is_disconnected, received)
    if isinstance(result, responses.ResponseObject):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream")


def create_app(model, processor, cfg: ServerConfig, model_id: str) -> FastAPI:
    """The FastAPI application over one model; its scheduler starts and stops with the app."""
    service = ChatService(model, processor, cfg, model_id)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.scheduler.stop)

    app = FastAPI(title="fastvlm-mlx", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.generation = service.scheduler

    def error_response(e: APIError) -> JSONResponse:
        service.metrics.count(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error_response(APIError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(APIError(500, f"internal error ({type(e).__name__})", kind="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if cfg.api_key and path not in OPEN_PATHS and not (cfg.ui and path.startswith("/ui/")):
            if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                return error_response(
                    APIError(401, "invalid or missing API key", None, "invalid_api_key", "authentication_error")
                )
        return await call_next(request)

    app.include_router(router)
    if cfg.ui:

        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(STATIC / "index.html")

        app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
    return app
