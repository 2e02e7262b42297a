"""Operations surface: liveness, readiness and Prometheus metrics (no request bodies)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from teacher_server.api.http import AUTH, server_state

router = APIRouter()
BODIES: dict[str, type[BaseModel]] = {}


@router.get("/health", summary="Liveness: the process answers")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "ready": server_state(request).ready}


@router.get("/ready", summary="Readiness: 200 once the model is loaded, 503 before")
async def ready(request: Request) -> JSONResponse:
    state = server_state(request)
    if state.ready:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "error": state.load_error}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", dependencies=[AUTH])
async def metrics(request: Request) -> Response:
    state = server_state(request)
    return Response(state.metrics.render(state.backend.stats()), media_type="text/plain; version=0.0.4")
