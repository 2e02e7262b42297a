"""What every API surface shares: auth, body reading and parsing, response encoding, request metrics.

A surface module uses these and :mod:`teacher_server.service`; it never touches the backend directly.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from shared import codec
from shared.protocol import ErrorResponse
from teacher_server.errors import APIError, as_api_error, from_validation_error
from teacher_server.state import ServerState

LARGE_RESPONSE_POSITIONS = 4096  # encode bigger responses off the event loop

# The error answers of an authenticated, body-parsing route, for the OpenAPI document.
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 413, 415, 422, 503)
}


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def require_api_key(request: Request) -> None:
    """401 unless ``Authorization: Bearer <key>`` matches the configured key (when one is set)."""
    key = server_state(request).config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            field="Authorization",
            type="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )


AUTH = Depends(require_api_key)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"body of {declared} bytes is over the limit of {limit} bytes; split the batch",
            field="body",
            value=int(declared),
            limit=limit,
            type="too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413,
                f"body is over the limit of {limit} bytes; split the batch",
                field="body",
                value=f"> {limit} bytes",
                limit=limit,
                type="too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, model: type[BaseModel], state: ServerState) -> tuple[Any, str]:
    """Decode + validate a JSON or msgpack body; returns (model instance, response format)."""
    ctype = request.headers.get("content-type")
    fmt = codec.media_type(ctype) if ctype else codec.JSON
    if fmt is None:
        raise APIError(
            415,
            f"Content-Type {ctype!r} is not supported; send application/json or application/msgpack "
            "(with curl: -H 'Content-Type: application/json')",
            field="Content-Type",
            value=ctype,
            limit="application/json | application/msgpack",
            type="unsupported_media_type",
        )
    body = await read_body(request, state.config.max_body_bytes)
    try:
        doc = codec.decode(body, fmt)
    except codec.CodecError as exc:
        raise APIError(400, str(exc), field="body", type="malformed_body") from None
    if not isinstance(doc, dict):
        raise APIError(
            422,
            f"body must be an object, got {type(doc).__name__}",
            field="body",
            value=type(doc).__name__,
            limit="object",
        )
    try:
        parsed = model.model_validate(doc)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    accept = codec.media_type(request.headers.get("accept"))
    explicit = request.headers.get("accept", "").strip() not in ("", "*/*")
    return parsed, (accept if explicit and accept else fmt)


async def respond(doc: dict[str, Any], fmt: str, positions: int) -> Response:
    """``doc`` encoded as ``fmt``; above :data:`LARGE_RESPONSE_POSITIONS` in a thread, off the event loop."""
    if positions > LARGE_RESPONSE_POSITIONS:
        body = await asyncio.to_thread(codec.encode, doc, fmt)
    else:
        body = codec.encode(doc, fmt)
    return Response(body, media_type=fmt)


@asynccontextmanager
async def observed(state: ServerState, endpoint: str) -> AsyncIterator[None]:
    """Count the request by final status and time it (Prometheus), whatever the outcome."""
    t0 = time.perf_counter()
    status = "500"
    try:
        yield
        status = "200"
    except Exception as exc:
        err = as_api_error(exc)
        if err is not None:
            status = str(err.status)
        raise
    finally:
        state.metrics.requests.labels(endpoint, status).inc()
        state.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
