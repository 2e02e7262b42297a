"""The native surface: ``/v1/model``, ``/v1/score``, ``/v1/generate`` in the shapes of :mod:`shared.wire`.

Each handler parses its body, calls :mod:`teacher_server.service` and wraps the results with
:func:`shared.wire.score_response` / :func:`~shared.wire.generate_response`; nothing else.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from shared.protocol import GenerateRequest, GenerateResponseDoc, ModelInfo, ScoreRequest, ScoreResponseDoc
from shared.wire import generate_response, score_response
from teacher_server import service
from teacher_server.api.http import AUTH, ERRORS, observed, parse, respond, server_state
from teacher_server.state import require_ready

router = APIRouter()
# Bodies are parsed by hand (JSON or msgpack), so FastAPI cannot see them; these models document them.
BODIES: dict[str, type[BaseModel]] = {"/v1/score": ScoreRequest, "/v1/generate": GenerateRequest}


@router.get("/v1/model", response_model=ModelInfo, dependencies=[AUTH], responses=ERRORS)
async def model_info(request: Request) -> ModelInfo:
    state = server_state(request)
    require_ready(state)
    return state.info


@router.post(
    "/v1/score",
    dependencies=[AUTH],
    responses={200: {"model": ScoreResponseDoc}, **ERRORS},
    summary="Teacher log-probs, top-k, candidate log-probs and entropy per completion token",
)
async def score(request: Request) -> Response:
    state = server_state(request)
    async with observed(state, "score"):
        require_ready(state)
        req, fmt = await parse(request, ScoreRequest, state)
        doc = score_response(state.config.name, await service.score_request(state, req))
        return await respond(doc, fmt, doc["usage"]["scored_tokens"])


@router.post(
    "/v1/generate",
    dependencies=[AUTH],
    responses={200: {"model": GenerateResponseDoc}, **ERRORS},
    summary="Teacher rollouts: n samples per prompt",
)
async def generate(request: Request) -> Response:
    state = server_state(request)
    async with observed(state, "generate"):
        require_ready(state)
        service.require_generate(state)  # before parsing, so a backend that cannot sample says so first
        req, fmt = await parse(request, GenerateRequest, state)
        prompts, samples = await service.generate_request(state, req)
        doc = generate_response(state.config.name, [len(p) for p in prompts], samples)
        return await respond(doc, fmt, doc["usage"]["completion_tokens"])
