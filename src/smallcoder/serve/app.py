"""App wiring: the routes, error handlers and lifespan of the FastAPI app, and uvicorn's config."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from ..errors import SmallCoderError
from .bridge import ClientGone
from .chat import chat
from .completions import completions
from .limits import ServeLimits
from .native import completion, infill
from .protocol import APIError
from .server import Server

if TYPE_CHECKING:
    import uvicorn

    from ..inference import Engine

log = logging.getLogger("smallcoder.serve")


def create_app(engine: Engine, model_name: str = "smallcoder", api_key: str | None = None,
               limits: ServeLimits | None = None, fim_order: str = "spm") -> FastAPI:
    """The FastAPI app; it starts the engine's scheduler on startup and closes it on shutdown.
    `fim_order` ("psm" or "spm") lays out every FIM prompt the server builds (`fim`)."""
    server = Server(engine, model_name, api_key, limits, fim_order)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="SmallCoder", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # the client gets a JSON 500; Starlette re-raises afterwards so uvicorn logs the traceback
        body = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").body()
        return JSONResponse(body, status_code=500)

    # Plain Starlette routes: each endpoint takes the Request and returns a Response, so nothing
    # depends on FastAPI resolving annotations.
    def route(path: str, method: str, handler: Callable[[Server, Request], Any], auth: bool = True) -> None:
        async def endpoint(request: Request) -> Response:
            if auth:
                server.check_auth(request.headers)
            try:
                result = await handler(server, request)
            except SmallCoderError as e:  # e.g. the engine refusing a prompt
                raise APIError(400, str(e)) from None
            except ClientGone:
                result = None
            if result is None:  # the client went away; nobody reads this
                return Response(status_code=499)
            return result if isinstance(result, Response) else JSONResponse(result)
        app.add_route(path, endpoint, methods=[method])

    async def models(server: Server, request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "smallcoder", "max_model_len": engine.context_length}]}

    async def health(server: Server, request: Request) -> dict[str, Any]:
        if not engine.alive:
            raise APIError(503, "the engine loop is not running", type_="server_error", code="engine_stopped")
        body = {"status": "ok", "model": model_name, "active": engine.num_active, "queued": engine.num_queued,
                "max_batch": engine.max_batch, "context_length": engine.context_length}
        if engine.speculative is not None:
            body["speculative"] = {"source": engine.speculative.source, "drafted_tokens": engine.drafted_tokens,
                                   "accepted_tokens": engine.accepted_tokens}
        return body

    route("/v1/completions", "POST", completions)
    route("/v1/chat/completions", "POST", chat)
    route("/completion", "POST", completion)
    route("/infill", "POST", infill)
    route("/v1/models", "GET", models)
    route("/health", "GET", health, auth=False)
    return app


def uvicorn_config(app: FastAPI, limits: ServeLimits | None = None, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for `app` with the connection limits and header timeout of `limits`
    (`connections.guarded_protocol`) in place of uvicorn's own `limit_concurrency`."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from .connections import guarded_protocol

    limits = limits or app.state.server.limits
    return uvicorn.Config(app, http=guarded_protocol(AutoHTTPProtocol, limits), limit_concurrency=None, **kwargs)
