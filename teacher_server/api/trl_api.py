"""TRL's legacy teacher endpoint: ``POST /get_sequence_logprobs/`` of ``trl vllm-serve`` (TRL <= 1.10).

The request carries whole sequences and prompt lengths; the answer is the teacher's top-k per completion
position, sorted by rank, as nested JSON lists (``response_format: "json"``, where a position also lists the
actual token after the top-k when it is not one of them, as vLLM's rank-sorted dict gives) or as base64
float32/int32 arrays padded to the longest completion (``"binary"``: ``logprobs_b64``, ``token_ids_b64``,
``actual_logprobs_b64``, ``actual_token_ids_b64``, ``shape = [batch, max_completion_len, top_k]``,
``completion_lengths``). Padding is ``-inf`` / id 0, and so is position 0 of a sequence with prompt length 0
(nothing predicts the first token). It runs the same score jobs as ``/v1/score``.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from shared.protocol import ScoreRequest
from shared.wire import ScoredSequence
from teacher_server import service
from teacher_server.api.http import AUTH, observed, parse, server_state
from teacher_server.api.openai_api import OPENAI_ERRORS, check_ids, error_response

__all__ = ["BODIES", "error_response", "router"]
from teacher_server.api.openai_models import SequenceLogprobsRequest
from teacher_server.errors import APIError
from teacher_server.prepare import score_jobs
from teacher_server.state import ServerState, require_ready

router = APIRouter()
BODIES: dict[str, type[BaseModel]] = {"/get_sequence_logprobs/": SequenceLogprobsRequest}


def _check(req: SequenceLogprobsRequest, state: ServerState) -> None:
    limits = state.limits
    if req.top_logprobs > limits.max_top_k:
        raise APIError(
            422,
            f"top_logprobs: {req.top_logprobs} is above this server's max_top_k {limits.max_top_k}; ask for "
            f"fewer (TRL's default is 100) or start the server with --max-top-k {req.top_logprobs}",
            field="top_logprobs",
            value=req.top_logprobs,
            limit=f"1..{limits.max_top_k}",
        )
    for i, seq in enumerate(req.sequences):
        check_ids(seq, f"sequences[{i}]", limits)
        if len(seq) > limits.max_model_len:
            raise APIError(
                422,
                f"sequences[{i}]: {len(seq)} tokens exceed max_model_len {limits.max_model_len}; truncate the "
                "sequences or start the server with a larger --max-model-len",
                field=f"sequences[{i}]",
                value=len(seq),
                limit=f"<= {limits.max_model_len} tokens",
            )


async def _scores(req: SequenceLogprobsRequest, state: ServerState) -> list[ScoredSequence | None]:
    """One result per sequence: rows for positions max(prompt_length, 1).. (None when there are none)."""
    firsts = [max(pl, 1) for pl in req.prompt_lengths]
    todo = [i for i, seq in enumerate(req.sequences) if len(seq) > firsts[i]]
    out: list[ScoredSequence | None] = [None] * len(req.sequences)
    if not todo:
        return out
    native = ScoreRequest.model_validate(
        {
            "sequences": [
                {"prompt_ids": req.sequences[i][: firsts[i]], "completion_ids": req.sequences[i][firsts[i] :]}
                for i in todo
            ],
            "top_k": req.top_logprobs,
            "temperature": req.temperature,
        }
    )
    jobs = score_jobs(native, state.backend.tokenizer, state.limits)
    for i, r in zip(todo, await service.score(state, jobs), strict=True):
        out[i] = r
    return out


def _json_rows(req: SequenceLogprobsRequest, scores: list[ScoredSequence | None]) -> dict[str, Any]:
    all_lps, all_ids = [], []
    for seq, pl, s in zip(req.sequences, req.prompt_lengths, scores, strict=True):
        lps_rows: list[list[float]] = [[] for _ in range(len(seq) - pl)]
        ids_rows: list[list[int]] = [[] for _ in range(len(seq) - pl)]
        if s is not None:
            skip = 1 if pl == 0 else 0  # position 0 has no log-prob
            for r in range(s.completion_ids.shape[0]):
                ids, lps = s.topk_ids[r].tolist(), s.topk_logprobs[r].tolist()
                actual = int(s.completion_ids[r])
                if actual not in ids:  # rank > k: vLLM's dict lists it after the top-k
                    ids.append(actual)
                    lps.append(float(s.logprobs[r]))
                ids_rows[r + skip] = ids
                lps_rows[r + skip] = [v if np.isfinite(v) else None for v in lps]  # JSON has no -inf
        all_lps.append(lps_rows)
        all_ids.append(ids_rows)
    return {"logprobs": all_lps, "logprob_token_ids": all_ids}


def _binary(req: SequenceLogprobsRequest, scores: list[ScoredSequence | None]) -> dict[str, Any]:
    k = req.top_logprobs
    lengths = [len(seq) - pl for seq, pl in zip(req.sequences, req.prompt_lengths, strict=True)]
    b, t = len(lengths), max(lengths, default=0)
    lps = np.full((b, t, k), -np.inf, np.float32)
    ids = np.zeros((b, t, k), np.int32)
    actual_lps = np.full((b, t, 1), -np.inf, np.float32)
    actual_ids = np.zeros((b, t, 1), np.int32)
    for i, (pl, s) in enumerate(zip(req.prompt_lengths, scores, strict=True)):
        if s is None:
            continue
        a = 1 if pl == 0 else 0
        n = s.completion_ids.shape[0]
        lps[i, a : a + n] = s.topk_logprobs
        ids[i, a : a + n] = s.topk_ids
        actual_lps[i, a : a + n, 0] = s.logprobs
        actual_ids[i, a : a + n, 0] = s.completion_ids

    def b64(a: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")

    return {
        "logprobs_b64": b64(lps),
        "token_ids_b64": b64(ids),
        "actual_logprobs_b64": b64(actual_lps),
        "actual_token_ids_b64": b64(actual_ids),
        "shape": [b, t, k],
        "completion_lengths": lengths,
    }


@router.post(
    "/get_sequence_logprobs/",
    dependencies=[AUTH],
    responses=OPENAI_ERRORS,
    summary="TRL <= 1.10: teacher top-k log-probs of whole sequences (json or base64 binary)",
)
async def get_sequence_logprobs(request: Request) -> Response:
    state = server_state(request)
    async with observed(state, "get_sequence_logprobs"):
        require_ready(state)
        req, _ = await parse(request, SequenceLogprobsRequest, state)
        _check(req, state)
        scores = await _scores(req, state)
        shape = _binary if req.response_format == "binary" else _json_rows
        doc = await asyncio.to_thread(shape, req, scores)
        return JSONResponse(doc)
