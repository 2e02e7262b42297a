"""The FastAPI application: :func:`create_app` wires the state, the error handlers and every API surface.

The model is loaded by a task started in the lifespan (never at import), so ``/health`` answers at once
and ``/ready`` turns true only after the weights are in memory; scoring before that gets 503 + Retry-After.
Routes live in :mod:`teacher_server.api` (one module per surface, registered in ``SURFACES``), the request
path to the backend in :mod:`teacher_server.service`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from teacher_server.api import SURFACES
from teacher_server.api.openapi import install_openapi
from teacher_server.backends import create_backend
from teacher_server.backends.base import Backend
from teacher_server.config import ServerConfig
from teacher_server.errors import APIError, UnsupportedRequest, as_api_error, from_validation_error
from teacher_server.state import ServerState

log = logging.getLogger("teacher_server")


def create_app(
    config: ServerConfig,
    backend: Backend | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app. ``backend`` defaults to the configured one; it is loaded in the lifespan."""
    state = ServerState(config, backend or create_backend(config))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_load(state, on_load_failure), name="load-model")
        yield
        task.cancel()
        await state.backend.close()

    app = FastAPI(
        title="OPD teacher server",
        version="0.1.0",
        description="Teacher log-probs for on-policy distillation. JSON or msgpack (packed arrays).",
        lifespan=lifespan,
    )
    app.state.server = state
    _install_error_handlers(app, _error_shapes(SURFACES))
    for surface in SURFACES:
        app.include_router(surface.router)
    install_openapi(app, SURFACES)
    return app


async def _load(state: ServerState, on_load_failure: Callable[[BaseException], None] | None) -> None:
    t0 = time.perf_counter()
    try:
        await state.backend.load()
        if hasattr(state.backend, "on_batch"):
            state.backend.on_batch = state.metrics.observe_batch
        state.on_loaded()
        log.info(
            "model %s loaded (%s backend) in %.1fs; ready",
            state.config.name,
            state.backend.name,
            time.perf_counter() - t0,
        )
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("loading model %r failed: %s", state.config.model, state.load_error)
        if on_load_failure:
            on_load_failure(exc)


def _error_shapes(surfaces: Any) -> dict[str, Callable[[APIError], Response]]:
    """path -> the surface's own error answer, for surfaces whose clients expect another shape than ours."""
    return {
        route.path: s.error_response
        for s in surfaces
        if hasattr(s, "error_response")
        for route in s.router.routes
        if hasattr(route, "path")
    }


def _install_error_handlers(app: FastAPI, shapes: dict[str, Callable[[APIError], Response]]) -> None:
    def answer(request: Request, err: APIError) -> Response:
        shape = shapes.get(request.url.path)
        if shape is not None:
            return shape(err)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def client_error(request: Request, exc: Exception) -> Response:
        return answer(request, as_api_error(exc))  # an APIError, or a backend's UnsupportedRequest as 422

    app.add_exception_handler(APIError, client_error)
    app.add_exception_handler(UnsupportedRequest, client_error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return answer(
            request, from_validation_error(ValidationError.from_exception_data("request", exc.errors()))
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        msg = f"internal server error: {type(exc).__name__}: {exc}"
        return answer(request, APIError(500, msg, type="internal"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return answer(request, APIError(exc.status_code, str(exc.detail), type="http", headers=exc.headers))
