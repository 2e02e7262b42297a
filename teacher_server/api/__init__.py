"""API surfaces, one module each, and the registry that ``create_app`` reads.

A surface module exposes ``router`` (a FastAPI ``APIRouter``) and ``BODIES`` (path -> pydantic model of a
body the handler parses by hand, documented in OpenAPI for JSON and msgpack), and optionally
``error_response(APIError) -> Response`` when its clients expect another error shape than ours (the
OpenAI-compatible surfaces answer ``{"error": {message, type, param, code}}``). Handlers translate their own
request and response shapes and call :mod:`teacher_server.service`; shared plumbing is in
:mod:`teacher_server.api.http`. Adding a surface is one module plus one entry in :data:`SURFACES`.
"""

from __future__ import annotations

from teacher_server.api import native, openai_api, ops, trl_api

SURFACES = (ops, native, openai_api, trl_api)
