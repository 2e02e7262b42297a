"""The OpenAI/vLLM-compatible surface: ``GET /v1/models``, ``POST /v1/completions``, ``/tokenize``, ``/detokenize``.

For the field's own clients (the openai SDK, lm-eval's ``local-completions``, TRL's ``VLLMClient``), with
vLLM's extensions (``prompt_logprobs`` with ranks, ``return_token_ids``). No second scorer: a completion is
translated into the same :class:`~teacher_server.jobs.ScoreJob` s and generate calls the native
``/v1/score`` and ``/v1/generate`` run, through :mod:`teacher_server.service` (admission, metrics, limits).

How a request is served:

* sampling (``max_tokens > 0``) goes through the backend's generate; ``max_tokens = 0`` scores only;
* ``prompt_logprobs`` and the echoed prompt's ``logprobs`` come from one score job over the prompt (plus the
  sampled tokens when their ``logprobs`` are asked for too); at temperature 0 with ``max_tokens = 1`` the
  greedy token is read off that same pass (lm-eval's loglikelihood request costs one forward);
* log-probs are those of the distribution sampled from: ``log_softmax(logits / T)`` for ``T > 0`` (the hf
  backend; the vllm backend scores at T = 1 only and refuses other temperatures when log-probs are asked),
  raw (T = 1) for greedy ``T = 0``. vLLM's own server ignores the temperature in prompt log-probs.

Errors on these routes have OpenAI's shape (:func:`~teacher_server.api.openai_shapes.openai_error_body`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from shared.protocol import GenerateOptions, ScoreRequest
from shared.wire import GeneratedSample, ScoredSequence
from teacher_server import service
from teacher_server.api.http import AUTH, ERRORS, observed, parse, server_state
from teacher_server.api.openai_models import (
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ModelList,
    OpenAIError,
    TokenizeRequest,
)
from teacher_server.api.openai_shapes import (
    ScoredPositions,
    completion_logprobs,
    greedy_fixup,
    openai_error_body,
    openai_status,
    prompt_logprobs_entries,
)
from teacher_server.errors import APIError
from teacher_server.jobs import ScoreJob
from teacher_server.prepare import Limits, render_chat, score_jobs
from teacher_server.state import ServerState, require_ready

router = APIRouter()
BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
OPENAI_ERRORS = {c: {"model": OpenAIError} for c in ERRORS}


def error_response(err: APIError) -> JSONResponse:
    """How the app answers an error on this surface's routes."""
    return JSONResponse(openai_error_body(err), status_code=openai_status(err), headers=err.headers)


# ------------------------------------------------------------------------------------------------ models


def check_model(name: str | None, state: ServerState) -> None:
    """404 (as vLLM) unless ``name`` is absent, the served name or the model path."""
    if name is None or name in (state.config.name, state.config.model):
        return
    raise APIError(
        404,
        f"The model `{name}` does not exist; this server serves `{state.config.name}` (GET /v1/models)",
        field="model",
        value=name,
        limit=state.config.name,
        type="not_found",
    )


@router.get("/v1/models", response_model=ModelList, dependencies=[AUTH], responses=OPENAI_ERRORS)
async def list_models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    async with observed(state, "models"):
        require_ready(state)
        card = {
            "id": state.config.name,
            "object": "model",
            "created": int(state.loaded_at),
            "owned_by": "opd-distill",
            "root": state.config.model,
            "parent": None,
            "max_model_len": state.limits.max_model_len,
        }
        return {"object": "list", "data": [card]}


# ------------------------------------------------------------------------------------------------ prompts


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None  # the string as sent (text prompts); decoded on demand for token prompts


def check_ids(ids: list[int], where: str, limits: Limits) -> None:
    """422 naming the first id outside the vocabulary (Python ints: a huge id must not overflow numpy)."""
    for j, tid in enumerate(ids):
        if not 0 <= tid < limits.vocab_size:
            raise APIError(
                422,
                f"{where}[{j}]: token id {tid} is outside the vocabulary (0 <= id < {limits.vocab_size})",
                field=f"{where}[{j}]",
                value=tid,
                limit=f"0 <= id < {limits.vocab_size}",
            )


def _prompts(req: CompletionRequest, state: ServerState) -> list[_Prompt]:
    tok, limits = state.backend.tokenizer, state.limits
    raw = req.prompt
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
        single = True
    elif raw and all(isinstance(x, int) for x in raw):
        items, single = [list(raw)], True  # type: ignore[list-item]
    else:
        items, single = list(raw), False  # type: ignore[arg-type]
    if not items:
        raise APIError(422, "prompt: the list is empty", field="prompt", value=[], limit="at least 1 prompt")
    if len(items) * req.n > limits.max_request_sequences:
        raise APIError(
            413,
            f"prompt: {len(items)} prompts x n={req.n} choices is above the limit "
            f"{limits.max_request_sequences} per request; split the batch",
            field="prompt",
            value=len(items) * req.n,
            limit=limits.max_request_sequences,
        )
    out = []
    for i, item in enumerate(items):
        where = "prompt" if single else f"prompt[{i}]"
        if isinstance(item, str):
            ids = tok(item, add_special_tokens=req.add_special_tokens)["input_ids"]
            text: str | None = item
        else:
            ids, text = list(item), None
            check_ids(ids, where, limits)
        if not ids:
            raise APIError(
                422, f"{where}: the prompt is empty", field=where, value=item, limit="at least 1 token"
            )
        out.append(_Prompt(ids, text))
    return out


def _check_lengths(prompts: list[_Prompt], max_tokens: int, single: bool, limits: Limits) -> None:
    for i, p in enumerate(prompts):
        total = len(p.ids) + max_tokens
        if total > limits.max_model_len:
            where = "prompt" if single else f"prompt[{i}]"
            raise APIError(
                422,
                f"{where}: this model's maximum context length is {limits.max_model_len} tokens; the prompt "
                f"({len(p.ids)} tokens) plus max_tokens ({max_tokens}) asks for {total}",
                field=where,
                value=total,
                limit=f"<= {limits.max_model_len} tokens",
            )


def _check_top(name: str, value: int | None, limits: Limits) -> None:
    if value is not None and not 0 <= value <= limits.max_top_k:
        hint = " (-1, the whole vocabulary, is not served)" if value == -1 else ""
        raise APIError(
            422,
            f"{name}: {value} is outside 0..{limits.max_top_k}, this server's max_top_k{hint}; ask for fewer "
            "or start the server with a larger --max-top-k",
            field=name,
            value=value,
            limit=f"0..{limits.max_top_k}",
        )


# ----------------------------------------------------------------------------------------------- serving


@dataclass
class _Plan:
    """What one completion request needs: per prompt, which positions are scored and how."""

    max_tokens: int
    logprobs: int | None
    prompt_logprobs: int | None
    echo: bool
    score_temperature: float
    greedy_from_scores: bool  # T = 0, one token: read it off the scoring pass

    @property
    def k(self) -> int:
        return max(self.logprobs or 0, self.prompt_logprobs or 0, 1 if self.greedy_from_scores else 0)

    @property
    def prompt_side(self) -> bool:
        return self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)

    @property
    def sample_side(self) -> bool:
        return self.logprobs is not None and self.max_tokens > 0


def _plan(req: CompletionRequest, limits: Limits) -> _Plan:
    _check_top("logprobs", req.logprobs, limits)
    _check_top("prompt_logprobs", req.prompt_logprobs, limits)
    temperature = 1.0 if req.temperature is None else req.temperature
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    plan = _Plan(
        max_tokens=max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.prompt_logprobs,
        echo=req.echo,
        score_temperature=1.0 if temperature == 0 else temperature,
        greedy_from_scores=False,
    )
    plan.greedy_from_scores = (
        temperature == 0 and max_tokens == 1 and not req.stops and not req.stop_token_ids
    ) and (plan.prompt_side or plan.sample_side)
    return plan


def _jobs(sequences: list[tuple[list[int], list[int]]], plan: _Plan, state: ServerState) -> list[ScoreJob]:
    """Score jobs for (prompt, completion) id pairs through the native path's own validation."""
    req = ScoreRequest.model_validate(
        {
            "sequences": [{"prompt_ids": p, "completion_ids": c} for p, c in sequences],
            "top_k": plan.k,
            "temperature": plan.score_temperature,
            "return_ranks": True,
        }
    )
    try:
        return score_jobs(req, state.backend.tokenizer, state.limits)
    except APIError as err:  # name our fields, not the native request's
        if err.field and err.field.startswith("sequences"):
            err.field = "prompt"
            err.message = err.message.replace("sequences", "prompt", 1)
        raise


async def _sample(
    state: ServerState, req: CompletionRequest, prompts: list[_Prompt], plan: _Plan
) -> list[list[GeneratedSample]]:
    if plan.max_tokens == 0 or plan.greedy_from_scores:
        return [[] for _ in prompts]
    params = GenerateOptions(
        n=req.n,
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=plan.max_tokens,
        seed=req.seed,
        stop=req.stops,
        stop_token_ids=req.stop_token_ids,
    )
    if params.stop_token_ids:
        check_ids(params.stop_token_ids, "stop_token_ids", state.limits)
    return await service.generate(state, [p.ids for p in prompts], params)


@dataclass
class _Choice:
    prompt: int
    completion_ids: list[int]
    text: str
    finish_reason: str
    rows: ScoredPositions | None = None


def _span(plan: _Plan, prompt: list[int], c: _Choice, index: int) -> tuple[Any, list[int], int] | None:
    """(dedup key, ids to score, first scored position) of one choice, or None when nothing is scored.
    The prompt side is shared by a prompt's choices; the sampled side is each choice's own."""
    if plan.greedy_from_scores:  # placeholder last token; its row becomes the greedy token (greedy_fixup)
        return c.prompt, prompt + [0], 1
    if plan.sample_side and c.completion_ids:
        return ("choice", index), prompt + c.completion_ids, 1 if plan.prompt_side else len(prompt)
    if plan.prompt_side and len(prompt) >= 2:
        return c.prompt, prompt, 1
    return None


def _drafts(samples: list[list[GeneratedSample]], n: int) -> list[_Choice]:
    """Choices in response order: a prompt's samples, or ``n`` empty ones (score only, or a greedy token
    still to be read off the scores)."""
    choices: list[_Choice] = []
    for i, group in enumerate(samples):
        if group:
            choices += [_Choice(i, s.completion_ids.tolist(), s.text, s.finish_reason) for s in group]
        else:
            choices += [_Choice(i, [], "", "length") for _ in range(n)]
    return choices


async def _attach_scores(
    state: ServerState, plan: _Plan, prompts: list[_Prompt], choices: list[_Choice]
) -> None:
    """Score every span the choices need (each once) and hang the rows on the choices."""
    spans: dict[Any, tuple[list[int], int]] = {}
    keys = []
    for index, c in enumerate(choices):
        span = _span(plan, prompts[c.prompt].ids, c, index)
        keys.append(None if span is None else span[0])
        if span is not None:
            spans.setdefault(span[0], (span[1], span[2]))
    if not spans:
        return
    jobs = _jobs([(ids[:st], ids[st:]) for ids, st in spans.values()], plan, state)
    scored = await service.score(state, jobs)
    rows = {k: ScoredPositions(r, st) for (k, (_, st)), r in zip(spans.items(), scored, strict=True)}
    if plan.greedy_from_scores:
        tok, eos = state.backend.tokenizer, set(state.info.eos_token_ids)
        greedy = {k: greedy_fixup(r.scored)[1] for k, r in rows.items()}
    for c, key in zip(choices, keys, strict=True):
        c.rows = None if key is None else rows[key]
        if plan.greedy_from_scores:
            token = greedy[key]
            c.completion_ids = [token]
            c.text = tok.decode([token], skip_special_tokens=True)
            c.finish_reason = "stop" if token in eos else "length"


async def _choices(
    state: ServerState, req: CompletionRequest, prompts: list[_Prompt], plan: _Plan
) -> list[_Choice]:
    if plan.sample_side and not plan.greedy_from_scores:  # the sampled tokens are scored too: sample first
        choices = _drafts(await _sample(state, req, prompts, plan), req.n)
        await _attach_scores(state, plan, prompts, choices)
        return choices
    # Only the prompt side is scored (TRL's teacher request): score first, then sample. On the vllm backend
    # the one-token sample then finds the prompt in the prefix cache the scoring pass just filled instead of
    # prefilling it again (docs/BENCHMARKS.md, section 2b).
    choices = _drafts([[] for _ in prompts], req.n)
    await _attach_scores(state, plan, prompts, choices)
    samples = await _sample(state, req, prompts, plan)
    for c, s in zip(choices, (s for group in samples for s in group), strict=False):
        c.completion_ids, c.text, c.finish_reason = s.completion_ids.tolist(), s.text, s.finish_reason
    return choices


class _Decoder:
    """Token strings for a response, each id decoded once (``token_id:<id>`` when asked, as vLLM)."""

    def __init__(self, tokenizer: Any, as_ids: bool) -> None:
        self.tok, self.as_ids, self.cache = tokenizer, as_ids, {}

    def __call__(self, tid: int) -> str:
        if self.as_ids:
            return f"token_id:{tid}"
        out = self.cache.get(tid)
        if out is None:
            out = self.cache[tid] = self.tok.decode([tid])
        return out


def _response(
    state: ServerState, req: CompletionRequest, prompts: list[_Prompt], plan: _Plan, choices: list[_Choice]
) -> dict[str, Any]:
    tok = state.backend.tokenizer
    decode = _Decoder(tok, bool(req.return_tokens_as_token_ids))
    prompt_text: dict[int, str] = {}
    out = []
    for index, c in enumerate(choices):
        p = prompts[c.prompt]
        text = c.text
        if plan.echo:
            if c.prompt not in prompt_text:
                prompt_text[c.prompt] = p.text if p.text is not None else tok.decode(p.ids)
            text = prompt_text[c.prompt] + text
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": c.finish_reason,
            "stop_reason": None,
        }
        rows = c.rows if c.rows is not None else _EMPTY
        if plan.logprobs is not None:
            ids = (p.ids + c.completion_ids) if plan.echo else c.completion_ids
            first = 0 if plan.echo else len(p.ids)
            choice["logprobs"] = completion_logprobs(ids, rows, first, plan.logprobs, decode)
        if plan.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_entries(
                rows, range(len(p.ids)), plan.prompt_logprobs, decode
            )
        if req.return_token_ids:
            choice["prompt_token_ids"] = p.ids
            choice["token_ids"] = c.completion_ids
        out.append(choice)
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = sum(len(c.completion_ids) for c in choices)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.config.name,
        "choices": out,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


_EMPTY = ScoredPositions(
    ScoredSequence(
        completion_ids=np.zeros(0, np.int32),
        logprobs=np.zeros(0, np.float32),
        topk_ids=np.zeros((0, 0), np.int32),
        topk_logprobs=np.zeros((0, 0), np.float32),
    ),
    start=0,
)


def _sse(doc: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """The finished response as server-sent events: one chunk per choice, usage if asked, ``[DONE]``."""

    async def events() -> AsyncIterator[bytes]:
        head = {k: doc[k] for k in ("id", "object", "created", "model")}
        for choice in doc["choices"]:
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode()
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': doc['usage']})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return events()


@router.post(
    "/v1/completions",
    dependencies=[AUTH],
    responses={200: {"model": CompletionResponse}, **OPENAI_ERRORS},
    summary="OpenAI/vLLM completions: sampling, echo, logprobs and vLLM's prompt_logprobs",
)
async def completions(request: Request) -> Response:
    state = server_state(request)
    async with observed(state, "completions"):
        require_ready(state)
        req, _ = await parse(request, CompletionRequest, state)
        check_model(req.model, state)
        plan = _plan(req, state.limits)
        prompts = _prompts(req, state)
        single = isinstance(req.prompt, str) or bool(req.prompt) and isinstance(req.prompt[0], int)
        _check_lengths(prompts, plan.max_tokens, single, state.limits)
        choices = await _choices(state, req, prompts, plan)
        doc = _response(state, req, prompts, plan, choices)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(doc, include), media_type="text/event-stream")
        return JSONResponse(doc)


# ----------------------------------------------------------------------------------------------- tokenize


@router.post("/tokenize", dependencies=[AUTH], responses=OPENAI_ERRORS, summary="vLLM: text or chat -> ids")
async def tokenize(request: Request) -> dict[str, Any]:
    state = server_state(request)
    async with observed(state, "tokenize"):
        require_ready(state)
        req, _ = await parse(request, TokenizeRequest, state)
        check_model(req.model, state)
        tok = state.backend.tokenizer
        if req.messages is not None:
            if not req.add_generation_prompt:
                raise APIError(
                    422,
                    "add_generation_prompt: only true is supported (messages are rendered as a prompt for the "
                    "teacher's reply)",
                    field="add_generation_prompt",
                    value=False,
                    limit="true",
                )
            ids = render_chat(
                tok, req.messages, "messages", state.limits.has_chat_template, req.chat_template_kwargs
            )
        else:
            ids = tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        doc: dict[str, Any] = {"count": len(ids), "max_model_len": state.limits.max_model_len, "tokens": ids}
        if req.return_token_strs:
            doc["token_strs"] = tok.convert_ids_to_tokens(ids)
        return doc


@router.post("/detokenize", dependencies=[AUTH], responses=OPENAI_ERRORS, summary="vLLM: ids -> text")
async def detokenize(request: Request) -> dict[str, Any]:
    state = server_state(request)
    async with observed(state, "detokenize"):
        require_ready(state)
        req, _ = await parse(request, DetokenizeRequest, state)
        check_model(req.model, state)
        check_ids(req.tokens, "tokens", state.limits)
        return {"prompt": state.backend.tokenizer.decode(req.tokens)}
