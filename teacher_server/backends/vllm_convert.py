"""vLLM prompt log-probs -> the shared packed arrays. Pure functions, no engine; shapes in the docstrings.

vLLM reports prompt log-probs per prompt position ``j`` (the prediction of token ``j`` from tokens ``< j``;
position 0 is None). Each position holds the actual token first, then the top-k in rank order (ranks
1..k). Our sequence is ``prompt + completion`` sent as one prompt, so completion token ``i`` is position
``P + i``, i.e. row ``P - 1 + i`` once position 0 is dropped.

Two input forms exist:

* ``FlatLogprobs`` (``SamplingParams(flat_logprobs=True)``, vLLM >= 0.11): plain Python lists, one entry per
  (position, rank) with duplicates kept, so every position has exactly ``k + 1`` entries and the lists
  reshape to ``[positions, k + 1]`` without touching a Python object per token.
* ``list[dict[int, Logprob] | None]`` (older vLLM): the actual token is the dict's first key; when it is also
  in the top-k, the top-k entry overwrites it in place, leaving ``k`` entries instead of ``k + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _sort_desc(ids_T_K: np.ndarray, lps_T_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Guarantee the wire contract (top-k sorted by log-prob, descending); vLLM's topk already is, so the
    check is all that normally runs. A stable sort keeps vLLM's order among equal values."""
    if lps_T_K.shape[1] < 2 or bool(np.all(lps_T_K[:, :-1] >= lps_T_K[:, 1:])):
        return ids_T_K, lps_T_K
    order = np.argsort(-lps_T_K, axis=1, kind="stable")
    return np.take_along_axis(ids_T_K, order, 1), np.take_along_axis(lps_T_K, order, 1)


def completion_rows_flat(
    flat: Any, prompt_len: int, completion_len: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of the completion tokens from a ``FlatLogprobs`` of the whole ``prompt + completion``.

    Args:
        flat: FlatLogprobs with ``start_indices``, ``end_indices``, ``token_ids``, ``logprobs`` (lists)
            for P + T positions, position 0 empty.
        prompt_len: P >= 1. completion_len: T >= 1. k: top-k requested (0 allowed).
    Returns:
        logprobs_T (T,) float32, topk_ids_T_K (T, k) int32, topk_logprobs_T_K (T, k) float32.
    """
    width = k + 1
    first = flat.start_indices[prompt_len]
    last = flat.end_indices[prompt_len + completion_len - 1]
    if last - first != completion_len * width:
        raise ValueError(
            f"vLLM returned {last - first} prompt log-prob entries for {completion_len} positions; "
            f"expected {width} per position (the actual token + top-{k})"
        )
    ids_T_W = np.asarray(flat.token_ids[first:last], dtype=np.int32).reshape(completion_len, width)
    lps_T_W = np.asarray(flat.logprobs[first:last], dtype=np.float32).reshape(completion_len, width)
    topk_ids, topk_lps = _sort_desc(ids_T_W[:, 1:], lps_T_W[:, 1:])
    return lps_T_W[:, 0].copy(), np.ascontiguousarray(topk_ids), np.ascontiguousarray(topk_lps)


def actual_ranks(prompt_logprobs: Any, prompt_len: int, completion_len: int) -> np.ndarray:
    """vLLM's rank of each completion token (1 = most likely): the first entry of each scored position.

    Args:
        prompt_logprobs: FlatLogprobs or the per-position dict list, for P + T positions.
    Returns:
        ranks_T (T,) int32.
    """
    if hasattr(prompt_logprobs, "start_indices"):
        starts = prompt_logprobs.start_indices[prompt_len : prompt_len + completion_len]
        return np.asarray([prompt_logprobs.ranks[s] for s in starts], dtype=np.int32)
    rows = prompt_logprobs[prompt_len : prompt_len + completion_len]
    return np.asarray([next(iter(entries.values())).rank for entries in rows], dtype=np.int32)


def completion_rows_dicts(
    positions: Sequence[dict[int, Any] | None], completion_ids: np.ndarray, prompt_len: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same result as :func:`completion_rows_flat` from the per-position dict form of older vLLM.

    Args:
        positions: P + T entries, each ``{token_id: Logprob(logprob, rank)}`` (position 0 is None).
        completion_ids: (T,) the completion tokens (the actual token of each scored position).
        prompt_len: P. k: top-k requested.
    Returns:
        logprobs_T (T,) float32, topk_ids_T_K (T, k) int32, topk_logprobs_T_K (T, k) float32.
    """
    t = int(completion_ids.shape[0])
    logprobs_T = np.empty(t, dtype=np.float32)
    ids_T_K = np.empty((t, k), dtype=np.int32)
    lps_T_K = np.empty((t, k), dtype=np.float32)
    for i in range(t):
        entries = positions[prompt_len + i]
        actual = int(completion_ids[i])
        logprobs_T[i] = entries[actual].logprob
        items = list(entries.items())
        # k + 1 entries: the actual token (first) is outside the top-k; k entries: it is one of them, with
        # its top-k rank. Rank order is the top-k order either way.
        top = items[1:] if len(items) == k + 1 else sorted(items, key=lambda kv: kv[1].rank)
        if len(top) != k:
            raise ValueError(f"vLLM returned {len(items)} prompt log-probs at a position; expected top-{k}")
        ids_T_K[i] = [tok for tok, _ in top]
        lps_T_K[i] = [lp.logprob for _, lp in top]
    ids_T_K, lps_T_K = _sort_desc(ids_T_K, lps_T_K)
    return logprobs_T, ids_T_K, lps_T_K


def completion_rows(
    prompt_logprobs: Any, completion_ids: np.ndarray, prompt_len: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dispatch on the form vLLM returned (flat when it has ``start_indices``). Shapes as above."""
    if hasattr(prompt_logprobs, "start_indices"):
        return completion_rows_flat(prompt_logprobs, prompt_len, int(completion_ids.shape[0]), k)
    return completion_rows_dicts(prompt_logprobs, completion_ids, prompt_len, k)


def candidate_rows(token_id_logprobs: Any, completion_len: int, num_candidates: int) -> np.ndarray:
    """Candidate log-probs from vLLM's ``prompt_token_id_logprobs`` requested with
    ``prompt_logprob_start = P - 1``: row ``i`` predicts prompt token ``P + i`` = completion token ``i``.

    Args:
        token_id_logprobs: array-like (T, K) float, full-vocabulary log-probs at the requested ids.
    Returns:
        candidate_logprobs_T_K (T, K) float32.
    """
    arr = np.asarray(token_id_logprobs, dtype=np.float32)
    if arr.shape != (completion_len, num_candidates):
        raise ValueError(
            f"vLLM returned candidate log-probs of shape {arr.shape}; expected "
            f"({completion_len}, {num_candidates})"
        )
    return np.ascontiguousarray(arr)
