"""Pure translation between our scores and the OpenAI/vLLM response shapes (no HTTP, no backend).

Positions are absolute in a choice's ``prompt + completion``: position ``j`` is the prediction of token
``j`` from tokens ``< j`` (position 0 has none), which is how vLLM numbers ``prompt_logprobs``.
:class:`ScoredPositions` maps them onto the rows of a :class:`shared.wire.ScoredSequence` whose first
completion token sits at position ``start``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.wire import ScoredSequence
from teacher_server.errors import APIError

JSON_FLOOR = -9999.0  # vLLM's stand-in for -inf in JSON log-probs

Decode = Callable[[int], str]


@dataclass
class ScoredPositions:
    """Rows of ``scored`` addressed by absolute position: row ``i`` is position ``start + i``."""

    scored: ScoredSequence
    start: int

    def covers(self, position: int) -> bool:
        return self.start <= position < self.start + int(self.scored.completion_ids.shape[0])

    def row(self, position: int) -> int:
        return position - self.start


def _lp(value: float) -> float:
    return max(float(value), JSON_FLOOR)


def prompt_logprobs_entries(
    rows: ScoredPositions, positions: Iterable[int], k: int, decode: Decode
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` for ``positions``: per position ``{"<id>": {logprob, rank, decoded_token}}``
    with the actual token first (its true rank), then the top-``k`` (ranks 1..k); None where not covered."""
    s = rows.scored
    out: list[dict[str, dict[str, Any]] | None] = []
    for pos in positions:
        if not rows.covers(pos):
            out.append(None)
            continue
        r = rows.row(pos)
        actual = int(s.completion_ids[r])
        rank = int(s.ranks[r]) if s.ranks is not None else None
        entry = {str(actual): {"logprob": _lp(s.logprobs[r]), "rank": rank, "decoded_token": decode(actual)}}
        for j in range(min(k, s.topk_ids.shape[1])):
            tid = int(s.topk_ids[r, j])
            entry[str(tid)] = {
                "logprob": _lp(s.topk_logprobs[r, j]),
                "rank": j + 1,
                "decoded_token": decode(tid),
            }
        out.append(entry)
    return out


def completion_logprobs(
    token_ids: list[int], rows: ScoredPositions, first_position: int, k: int, decode: Decode
) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object for ``token_ids`` sitting at positions ``first_position, ...``:
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (the token itself, then the top-``k``, keyed by decoded
    string, so up to k + 1 entries, as OpenAI documents) and ``text_offset`` (cumulative from 0, as vLLM)."""
    s = rows.scored
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0
    for i, tid in enumerate(token_ids):
        pos = first_position + i
        token = decode(tid)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if not rows.covers(pos):
            token_lps.append(None)
            tops.append(None)
            continue
        r = rows.row(pos)
        lp = _lp(s.logprobs[r])
        token_lps.append(lp)
        top = {token: lp}
        for j in range(min(k, s.topk_ids.shape[1])):
            top.setdefault(decode(int(s.topk_ids[r, j])), _lp(s.topk_logprobs[r, j]))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def greedy_fixup(scored: ScoredSequence) -> tuple[ScoredSequence, int]:
    """A sequence scored with a placeholder last token: make the last row the greedy choice (top-1), so one
    forward pass gives both the prompt's scores and the temperature-0 next token. Returns (scores, token)."""
    token = int(scored.topk_ids[-1, 0])
    scored.completion_ids = np.array(scored.completion_ids, copy=True)
    scored.completion_ids[-1] = token
    scored.logprobs = np.array(scored.logprobs, copy=True)
    scored.logprobs[-1] = scored.topk_logprobs[-1, 0]
    if scored.ranks is not None:
        scored.ranks = np.array(scored.ranks, copy=True)
        scored.ranks[-1] = 1
    return scored, token


# ------------------------------------------------------------------------------------------------ errors

_OPENAI_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    415: "BadRequestError",
    503: "ServiceUnavailableError",
}


def openai_status(err: APIError) -> int:
    """OpenAI-compatible servers answer a request they cannot validate with 400 (we say 422 natively)."""
    return 400 if err.status == 422 else err.status


def openai_error_body(err: APIError) -> dict[str, Any]:
    """``{"error": {message, type, param, code}}`` as vLLM's OpenAI server writes it (code = HTTP status)."""
    status = openai_status(err)
    kind = _OPENAI_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": err.message, "type": kind, "param": err.field, "code": status}}
