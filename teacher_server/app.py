"""The FastAPI application: routes, body handling, auth, admission control. Built by :func:`create_app`.

The model is loaded by a task started in the lifespan (never at import), so ``/health`` answers at once
and ``/ready`` turns true only after the weights are in memory; scoring before that gets 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import codec
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponseDoc,
    ModelInfo,
    ScoreRequest,
    ScoreResponseDoc,
)
from teacher_server.backends import create_backend
from teacher_server.backends.base import Backend
from teacher_server.config import ServerConfig
from teacher_server.errors import APIError, from_validation_error
from teacher_server.jobs import ScoreJob, ScoreResult
from teacher_server.metrics import Metrics
from teacher_server.prepare import Limits, generate_jobs, score_jobs

log = logging.getLogger("teacher_server")

_LARGE_RESPONSE_POSITIONS = 4096  # encode bigger responses off the event loop


class ServerState:
    """Everything a request handler needs; lives on ``app.state.server``."""

    def __init__(self, config: ServerConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.metrics = Metrics()
        self.ready = False
        self.load_error: str | None = None
        self.limits: Limits | None = None
        self.info: ModelInfo | None = None
        self.inflight_tokens = 0

    def on_loaded(self) -> None:
        b, cfg = self.backend, self.config
        tok = b.tokenizer
        caps = b.capabilities()
        has_template = bool(getattr(tok, "chat_template", None))
        vocab = min(len(tok), b.model_vocab_size)
        self.limits = Limits(
            vocab_size=vocab,
            max_model_len=b.max_model_len,
            max_top_k=cfg.max_top_k,
            max_candidates=cfg.max_candidates,
            max_request_sequences=cfg.max_request_sequences,
            max_request_tokens=cfg.max_request_tokens,
            has_chat_template=has_template,
            candidate_ids=caps.candidate_ids,
            temperature=caps.temperature,
            entropy=caps.entropy,
            backend=b.name,
        )
        eos = tok.eos_token_id
        self.info = ModelInfo(
            model=cfg.name,
            backend=b.name,
            max_model_len=b.max_model_len,
            max_top_k=cfg.max_top_k,
            vocab_size=vocab,
            model_vocab_size=b.model_vocab_size,
            tokenizer_fingerprint=tokenizer_fingerprint(tok),
            chat_template=has_template,
            eos_token_ids=[] if eos is None else [eos],
            capabilities=caps,
            limits={
                "max_request_sequences": cfg.max_request_sequences,
                "max_request_tokens": cfg.max_request_tokens,
                "max_candidates": cfg.max_candidates,
                "max_body_bytes": cfg.max_body_bytes,
                "max_queue_tokens": cfg.max_queue_tokens,
            },
        )
        self.ready = True
        self.metrics.ready.set(1)


def create_app(
    config: ServerConfig,
    backend: Backend | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app. ``backend`` defaults to the configured one; it is loaded in the lifespan."""
    state = ServerState(config, backend or create_backend(config))

    async def load() -> None:
        t0 = time.perf_counter()
        try:
            await state.backend.load()
            if hasattr(state.backend, "on_batch"):
                state.backend.on_batch = state.metrics.observe_batch
            state.on_loaded()
            log.info(
                "model %s loaded (%s backend) in %.1fs; ready",
                config.name,
                state.backend.name,
                time.perf_counter() - t0,
            )
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading model %r failed: %s", config.model, state.load_error)
            if on_load_failure:
                on_load_failure(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load(), name="load-model")
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
    _install_error_handlers(app)
    _install_routes(app, state)
    _install_openapi(app)
    return app


# ------------------------------------------------------------------------------------------------ helpers


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation_error(ValidationError.from_exception_data("request", exc.errors()))
        return JSONResponse(err.body(), status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        body = {
            "error": {
                "type": "internal",
                "message": f"internal server error: {type(exc).__name__}: {exc}",
                "field": None,
                "value": None,
                "limit": None,
            }
        }
        return JSONResponse(body, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "error": {"type": "http", "message": str(exc.detail), "field": None, "value": None, "limit": None}
        }
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _auth_dependency(state: ServerState) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        key = state.config.api_key
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

    return check


async def _read_body(request: Request, limit: int) -> bytes:
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


async def _parse(request: Request, model: type[BaseModel], state: ServerState) -> tuple[Any, str]:
    """Decode + validate a request body; returns (model instance, response format)."""
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
    body = await _read_body(request, state.config.max_body_bytes)
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


def _require_ready(state: ServerState) -> None:
    if not state.ready:
        msg = f"model failed to load: {state.load_error}" if state.load_error else "model is still loading"
        raise APIError(503, msg, type="not_ready", headers={"Retry-After": "5"})


class _Admission:
    """Bounded queue: refuse (503 + Retry-After) instead of growing without limit."""

    def __init__(self, state: ServerState, tokens: int) -> None:
        self.state, self.tokens = state, tokens

    def __enter__(self) -> None:
        s = self.state
        if s.inflight_tokens and s.inflight_tokens + self.tokens > s.config.max_queue_tokens:
            s.metrics.rejected.inc()
            raise APIError(
                503,
                f"server busy: {s.inflight_tokens} tokens queued (limit "
                f"{s.config.max_queue_tokens}); retry shortly",
                type="overloaded",
                value=s.inflight_tokens,
                limit=s.config.max_queue_tokens,
                headers={"Retry-After": "1"},
            )
        s.inflight_tokens += self.tokens
        s.metrics.inflight_tokens.set(s.inflight_tokens)

    def __exit__(self, *exc: Any) -> None:
        self.state.inflight_tokens -= self.tokens
        self.state.metrics.inflight_tokens.set(self.state.inflight_tokens)


def _result_doc(job: ScoreJob, res: ScoreResult, tokens: list[str] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "completion_ids": job.completion_ids,
        "logprobs": res.logprobs,
        "topk_ids": res.topk_ids,
        "topk_logprobs": res.topk_logprobs,
        "prompt_tokens": int(job.prompt_ids.shape[0]),
    }
    if res.candidate_logprobs is not None:
        doc["candidate_logprobs"] = res.candidate_logprobs
    if res.entropy is not None:
        doc["entropy"] = res.entropy
    if tokens is not None:
        doc["tokens"] = tokens
    return doc


async def _respond(doc: dict[str, Any], fmt: str, positions: int) -> Response:
    if positions > _LARGE_RESPONSE_POSITIONS:
        body = await asyncio.to_thread(codec.encode, doc, fmt)
    else:
        body = codec.encode(doc, fmt)
    return Response(body, media_type=fmt)


def _install_routes(app: FastAPI, state: ServerState) -> None:
    auth = Depends(_auth_dependency(state))
    errors: dict[int | str, dict[str, Any]] = {
        c: {"model": ErrorResponse} for c in (400, 401, 413, 415, 422, 503)
    }

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "ready": state.ready}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded, 503 before")
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": state.load_error}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=[auth])
    async def metrics() -> Response:
        return Response(state.metrics.render(state.backend.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/model", response_model=ModelInfo, dependencies=[auth], responses=errors)
    async def model_info() -> ModelInfo:
        _require_ready(state)
        return state.info

    @app.post(
        "/v1/score",
        dependencies=[auth],
        responses={200: {"model": ScoreResponseDoc}, **errors},
        summary="Teacher log-probs, top-k, candidate log-probs and entropy per completion token",
    )
    async def score(request: Request) -> Response:
        async with _observed(state, "score"):
            _require_ready(state)
            req, fmt = await _parse(request, ScoreRequest, state)
            jobs = score_jobs(req, state.backend.tokenizer, state.limits)
            tokens = sum(j.num_tokens for j in jobs)
            with _Admission(state, tokens):
                results = await state.backend.score(jobs)
            scored = sum(len(j.completion_ids) for j in jobs)
            prompt = tokens - scored
            decoded = _decode_tokens(state, jobs) if req.return_tokens else [None] * len(jobs)
            doc = {
                "model": state.config.name,
                "results": [_result_doc(j, r, d) for j, r, d in zip(jobs, results, decoded, strict=True)],
                "usage": {"prompt_tokens": prompt, "scored_tokens": scored},
            }
            state.metrics.scored_tokens.inc(scored)
            state.metrics.prompt_tokens.inc(prompt)
            return await _respond(doc, fmt, scored)

    @app.post(
        "/v1/generate",
        dependencies=[auth],
        responses={200: {"model": GenerateResponseDoc}, **errors},
        summary="Teacher rollouts: n samples per prompt",
    )
    async def generate(request: Request) -> Response:
        async with _observed(state, "generate"):
            _require_ready(state)
            if not state.backend.capabilities().generate:
                raise APIError(422, f"the {state.backend.name} backend does not generate", type="unsupported")
            req, fmt = await _parse(request, GenerateRequest, state)
            prompts, params = generate_jobs(req, state.backend.tokenizer, state.limits)
            budget = sum(len(p) + params.max_tokens for p in prompts) * params.n
            with _Admission(state, budget):
                samples = await state.backend.generate(prompts, params)
            results = [
                {"prompt_tokens": len(p), "samples": [s.__dict__ for s in group]}
                for p, group in zip(prompts, samples, strict=True)
            ]
            gen = sum(len(s.completion_ids) for group in samples for s in group)
            state.metrics.generated_tokens.inc(gen)
            doc = {
                "model": state.config.name,
                "results": results,
                "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": gen},
            }
            return await _respond(doc, fmt, gen)


@asynccontextmanager
async def _observed(state: ServerState, endpoint: str):
    """Count the request by final status and time it (Prometheus), whatever the outcome."""
    t0 = time.perf_counter()
    status = "500"
    try:
        yield
        status = "200"
    except APIError as exc:
        status = str(exc.status)
        raise
    finally:
        state.metrics.requests.labels(endpoint, status).inc()
        state.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def _decode_tokens(state: ServerState, jobs: list[ScoreJob]) -> list[list[str]]:
    tok = state.backend.tokenizer
    return [tok.batch_decode([[int(i)] for i in j.completion_ids]) for j in jobs]


def _install_openapi(app: FastAPI) -> None:
    """Document the request bodies (parsed by hand, so FastAPI cannot see them) in the OpenAPI schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (("/v1/score", ScoreRequest), ("/v1/generate", GenerateRequest)):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model.__name__] = js
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {codec.JSON: {"schema": ref}, codec.MSGPACK: {"schema": ref}},
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
