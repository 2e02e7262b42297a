"""Exact teacher scores from final hidden states, in row chunks.

The output layer is applied a chunk of rows at a time and everything after it runs in fp32, so a full
``[tokens, vocab]`` fp32 tensor is never materialised: peak extra memory is ``chunk_rows * vocab * 8``
bytes (logits plus one temporary), whatever the number of scored positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadOutputs:
    """Scores for N positions. Shapes in the field comments; all log-probs fp32, normalised over the
    vocabulary (the first ``vocab_limit`` ids when :func:`chunked_head_scores` is given one)."""

    logprobs: torch.Tensor  # (N,) log-prob of each target id
    topk_ids: torch.Tensor  # (N, k) int64, descending log-prob
    topk_logprobs: torch.Tensor  # (N, k)
    candidate_logprobs: torch.Tensor | None  # (N, K)
    entropy: torch.Tensor | None  # (N,)
    ranks: torch.Tensor | None = None  # (N,) int64: 1 + number of ids with a larger logit than the target


def chunk_rows_for(vocab: int, budget_bytes: int, min_rows: int = 16) -> int:
    """Rows per chunk so that the fp32 logits plus one temporary of the same size fit ``budget_bytes``."""
    return max(min_rows, budget_bytes // (vocab * 8))


def logits_to_scores(
    logits_N_V: torch.Tensor,
    targets_N: torch.Tensor,
    k: int,
    candidates_N_K: torch.Tensor | None = None,
    want_entropy: bool = False,
    want_ranks: bool = False,
) -> HeadOutputs:
    """Scores from fp32 logits (already divided by the temperature) of N positions over V ids.

    Args:
        logits_N_V: (N, V) fp32 logits.
        targets_N: (N,) int64 ids whose log-prob is wanted.
        k: top-k size, 0..V.
        candidates_N_K: (N, K) int64 ids, or None.
        want_entropy: also return H = -sum_v p(v) log p(v), in nats.
        want_ranks: also return each target's rank, 1 + #{v: logit(v) > logit(target)} (vLLM's convention).
    """
    lse_N = torch.logsumexp(logits_N_V, dim=-1)
    logprobs = logits_N_V.gather(1, targets_N[:, None]).squeeze(1) - lse_N
    if k > 0:
        top_v, top_i = logits_N_V.topk(k, dim=-1, sorted=True)
        top_lp = top_v - lse_N[:, None]
    else:
        top_i = torch.empty(logits_N_V.shape[0], 0, dtype=torch.long, device=logits_N_V.device)
        top_lp = torch.empty(logits_N_V.shape[0], 0, dtype=torch.float32, device=logits_N_V.device)
    cand = None
    if candidates_N_K is not None:
        cand = logits_N_V.gather(1, candidates_N_K) - lse_N[:, None]
    entropy = None
    if want_entropy:
        # H = lse - sum_v p(v) * logit(v); exp of (logits - lse) stays in [0, 1], no overflow.
        p_N_V = torch.exp(logits_N_V - lse_N[:, None])
        entropy = lse_N - (p_N_V * logits_N_V.nan_to_num(neginf=0.0)).sum(-1)
    ranks = None
    if want_ranks:
        target_N = logits_N_V.gather(1, targets_N[:, None])
        ranks = (logits_N_V > target_N).sum(-1) + 1
    return HeadOutputs(logprobs, top_i, top_lp, cand, entropy, ranks)


def chunked_head_scores(
    hidden_N_H: torch.Tensor,
    head: torch.nn.Module,
    targets_N: torch.Tensor,
    k: int,
    candidates_N_K: torch.Tensor | None = None,
    temperature: float = 1.0,
    want_entropy: bool = False,
    chunk_rows: int = 1024,
    softcap: float | None = None,
    vocab_limit: int | None = None,
    want_ranks: bool = False,
) -> HeadOutputs:
    """Apply the output layer ``head`` to N hidden states in chunks and score each position.

    Args:
        hidden_N_H: (N, H) final hidden states (model dtype) of the positions that predict the targets.
        head: the model's output embedding (``lm_head``), applied in the model dtype like HF's forward.
        targets_N / candidates_N_K / k / want_entropy / want_ranks: see :func:`logits_to_scores`.
        temperature: logits are divided by it before normalisation.
        chunk_rows: rows per chunk.
        softcap: final logit soft-capping (Gemma-style ``cap * tanh(x / cap)``), applied before temperature.
        vocab_limit: score over ids [0, vocab_limit) only, the tokenizer's (output rows past it are padding:
            no mass, no top-k place, no entropy); targets and candidates must lie below it. None = every row.
    Returns:
        :class:`HeadOutputs` with N rows, on the hidden states' device.
    """
    parts: list[HeadOutputs] = []
    for start in range(0, hidden_N_H.shape[0], chunk_rows):
        stop = start + chunk_rows
        logits = head(hidden_N_H[start:stop])
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits[:, :vocab_limit]
        logits = logits.float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if temperature != 1.0:
            logits = logits / temperature
        cand = None if candidates_N_K is None else candidates_N_K[start:stop]
        parts.append(logits_to_scores(logits, targets_N[start:stop], k, cand, want_entropy, want_ranks))
        del logits
    return _concat(parts)


def _concat(parts: list[HeadOutputs]) -> HeadOutputs:
    def cat(name: str) -> torch.Tensor | None:
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else torch.cat(vals, dim=0)

    return HeadOutputs(
        *(cat(n) for n in ("logprobs", "topk_ids", "topk_logprobs", "candidate_logprobs", "entropy", "ranks"))
    )
