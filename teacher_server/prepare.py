"""Validated requests -> backend jobs: tokenize text and chat forms, enforce every limit with a clear error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.protocol import (
    ChatMessage,
    GenerateOptions,
    GenerateRequest,
    ScoreOptions,
    ScoreRequest,
    ScoreSequence,
    check_chat_template_kwargs,
)
from teacher_server.errors import APIError
from teacher_server.jobs import ScoreJob


@dataclass
class Limits:
    """What a request may ask of this server (reported under ``limits`` by GET /v1/model)."""

    vocab_size: int  # ids must be below it
    max_model_len: int
    max_top_k: int
    max_candidates: int
    max_request_sequences: int
    max_request_tokens: int
    has_chat_template: bool
    candidate_ids: bool = True  # capability
    temperature: bool = True  # capability
    entropy: bool = True  # capability
    backend: str = "hf"


def _check_ids(ids: np.ndarray, where: str, vocab: int) -> None:
    if ids.size == 0:
        return
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        idx = np.unravel_index(int(bad[0]), ids.shape)
        path = where + "".join(f"[{i}]" for i in idx)
        raise APIError(
            422,
            f"{path}: token id {int(ids[idx])} is outside the vocabulary (0 <= id < {vocab})",
            field=path,
            value=int(ids[idx]),
            limit=f"0 <= id < {vocab}",
        )


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    where: str,
    has_template: bool,
    chat_template_kwargs: dict[str, Any] | None = None,
    kwargs_field: str = "chat_template_kwargs",
) -> list[int]:
    """Prompt ids from chat messages with the TEACHER's template and ``add_generation_prompt=True``.

    ``chat_template_kwargs`` (validated by :func:`shared.protocol.check_chat_template_kwargs`: template
    variables, never apply_chat_template's own arguments) reach the template as variables. Bad kwargs are a
    422 at ``kwargs_field``; an error raised by the template (a role or a value it rejects) a 422 at ``where``
    whose message shows the kwargs.
    """
    if not has_template:
        raise APIError(
            422,
            f"{where}: the teacher model has no chat template; send the prompt as text ('prompt') or as "
            "token ids ('prompt_ids') instead of 'messages'",
            field=where,
            value="messages",
            limit="requires a chat template",
        )
    kwargs = _template_kwargs(chat_template_kwargs, kwargs_field)
    try:
        text = tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False, **kwargs
        )
    except Exception as exc:  # jinja errors (e.g. a template that rejects a role or a value) are the client's
        blame = f"{where} with {kwargs_field}={kwargs}" if kwargs else where
        raise APIError(
            422, f"{blame}: the chat template rejected these messages: {exc}", field=where
        ) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template_kwargs(value: dict[str, Any] | None, field: str) -> dict[str, Any]:
    """Checked again here: render_chat is also called with kwargs that did not come through pydantic."""
    try:
        return check_chat_template_kwargs(value) or {}
    except ValueError as exc:
        raise APIError(422, f"{field}: {exc}", field=field, value=repr(value)[:200]) from None


def _prompt_ids(seq: ScoreSequence | Any, tokenizer: Any, where: str, limits: Limits) -> list[int]:
    if seq.prompt_ids is not None:
        return seq.prompt_ids
    if seq.messages is not None:
        return render_chat(
            tokenizer,
            seq.messages,
            f"{where}.messages",
            limits.has_chat_template,
            seq.chat_template_kwargs,
            f"{where}.chat_template_kwargs",
        )
    return tokenizer(seq.prompt, add_special_tokens=False)["input_ids"]


_PROMPT_FIELD = {"tokens": "prompt_ids", "text": "prompt", "chat": "messages"}


def _job(seq: ScoreSequence, options: ScoreOptions, tokenizer: Any, where: str, limits: Limits) -> ScoreJob:
    prompt = np.asarray(_prompt_ids(seq, tokenizer, where, limits), dtype=np.int64)
    if seq.completion_ids is not None:
        completion = np.asarray(seq.completion_ids, dtype=np.int64)
    else:
        completion = np.asarray(tokenizer(seq.completion, add_special_tokens=False)["input_ids"], np.int64)
    pfield = f"{where}.{_PROMPT_FIELD[seq.form]}"
    cfield = f"{where}." + ("completion_ids" if seq.completion_ids is not None else "completion")
    if prompt.size == 0:
        raise APIError(
            422,
            f"{pfield}: the prompt is empty; at least 1 token is needed to predict the "
            "first completion token",
            field=pfield,
            value=[],
            limit="at least 1 token",
        )
    if completion.size == 0:
        raise APIError(
            422,
            f"{cfield}: the completion is empty; nothing to score",
            field=cfield,
            value=seq.completion if seq.completion is not None else [],
            limit="at least 1 token",
        )
    _check_ids(prompt, pfield, limits.vocab_size)
    _check_ids(completion, cfield, limits.vocab_size)
    total = prompt.size + completion.size
    if total > limits.max_model_len:
        raise APIError(
            422,
            f"{where}: prompt ({prompt.size}) + completion ({completion.size}) = {total} tokens is longer than "
            f"the server's max_model_len {limits.max_model_len}",
            field=where,
            value=total,
            limit=f"<= {limits.max_model_len} tokens",
        )
    return ScoreJob(
        prompt_ids=prompt,
        completion_ids=completion,
        options=options,
        candidate_ids=_candidates(seq, completion.size, where, limits),
    )


def _candidates(seq: ScoreSequence, t: int, where: str, limits: Limits) -> np.ndarray | None:
    if seq.candidate_ids is None:
        return None
    path = f"{where}.candidate_ids"
    if not limits.candidate_ids:
        raise APIError(
            422,
            f"{path}: the {limits.backend} backend cannot return log-probs at arbitrary ids; use the hf backend "
            "or a loss that needs only the teacher's top-k (see GET /v1/model capabilities)",
            field=path,
            value="given",
            limit="capabilities.candidate_ids = false",
        )
    rows = seq.candidate_ids
    if len(rows) != t:
        raise APIError(
            422,
            f"{path}: expected {t} rows (one per completion token), got {len(rows)}",
            field=path,
            value=f"{len(rows)} rows",
            limit=f"{t} rows",
        )
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise APIError(
            422,
            f"{path}: every row must have the same number of ids, got widths {sorted(widths)}",
            field=path,
            value=sorted(widths),
            limit="one width K for all rows",
        )
    k = widths.pop()
    if not 1 <= k <= limits.max_candidates:
        raise APIError(
            422,
            f"{path}: {k} ids per position is outside 1..{limits.max_candidates}",
            field=path,
            value=k,
            limit=f"1..{limits.max_candidates}",
        )
    arr = np.asarray(rows, dtype=np.int64)
    _check_ids(arr, path, limits.vocab_size)
    return arr


def _check_request_size(n_items: int, field: str, limits: Limits) -> None:
    if n_items > limits.max_request_sequences:
        raise APIError(
            413,
            f"{field}: {n_items} items in one request is above the limit {limits.max_request_sequences}; "
            "split the batch",
            field=field,
            value=n_items,
            limit=limits.max_request_sequences,
        )


def score_jobs(req: ScoreRequest, tokenizer: Any, limits: Limits) -> list[ScoreJob]:
    """All jobs of a score request, or an APIError for the first problem found."""
    _check_request_size(len(req.sequences), "sequences", limits)
    if req.top_k > limits.max_top_k:
        raise APIError(
            422,
            f"top_k: {req.top_k} is above this server's max_top_k {limits.max_top_k}",
            field="top_k",
            value=req.top_k,
            limit=f"0..{limits.max_top_k}",
        )
    if req.temperature != 1.0 and not limits.temperature:
        raise APIError(
            422,
            f"temperature: the {limits.backend} backend scores at temperature 1.0 only (its prompt "
            "log-probs ignore temperature); send 1.0 or use the hf backend",
            field="temperature",
            value=req.temperature,
            limit="1.0",
        )
    if req.return_entropy and not limits.entropy:
        raise APIError(
            422,
            f"return_entropy: the {limits.backend} backend cannot compute the teacher's full-distribution "
            "entropy; send false or use the hf backend (see GET /v1/model capabilities)",
            field="return_entropy",
            value=True,
            limit="capabilities.entropy = false",
        )
    options = req.options()  # one object shared by every job of the request
    jobs = [_job(seq, options, tokenizer, f"sequences[{i}]", limits) for i, seq in enumerate(req.sequences)]
    total = sum(j.num_tokens for j in jobs)
    if total > limits.max_request_tokens:
        raise APIError(
            413,
            f"sequences: {total} tokens in one request is above the limit "
            f"{limits.max_request_tokens}; split the batch",
            field="sequences",
            value=total,
            limit=limits.max_request_tokens,
        )
    return jobs


def generate_jobs(
    req: GenerateRequest, tokenizer: Any, limits: Limits
) -> tuple[list[list[int]], GenerateOptions]:
    """Prompt ids and sampling parameters of a generate request, validated against the limits."""
    _check_request_size(len(req.prompts) * req.n, "prompts", limits)
    prompts = []
    for i, p in enumerate(req.prompts):
        where = f"prompts[{i}]"
        ids = np.asarray(_prompt_ids(p, tokenizer, where, limits), dtype=np.int64)
        field = f"{where}." + (
            "prompt_ids" if p.prompt_ids is not None else "messages" if p.messages else "prompt"
        )
        if ids.size == 0:
            raise APIError(
                422, f"{field}: the prompt is empty", field=field, value=[], limit="at least 1 token"
            )
        _check_ids(ids, field, limits.vocab_size)
        if ids.size >= limits.max_model_len:
            raise APIError(
                422,
                f"{field}: prompt of {ids.size} tokens leaves no room to generate under "
                f"max_model_len {limits.max_model_len}",
                field=field,
                value=int(ids.size),
                limit=f"< {limits.max_model_len} tokens",
            )
        prompts.append(ids.tolist())
    if req.max_tokens > limits.max_model_len:
        raise APIError(
            422,
            f"max_tokens: {req.max_tokens} is above max_model_len {limits.max_model_len}",
            field="max_tokens",
            value=req.max_tokens,
            limit=f"<= {limits.max_model_len}",
        )
    if req.stop_token_ids:
        _check_ids(np.asarray(req.stop_token_ids), "stop_token_ids", limits.vocab_size)
    return prompts, req.options()
