"""The rollout engine against the training model: where the student's top-k S_t comes from, and how far the
engine's distribution is from the one the loss differentiates.

An inference engine (vLLM, a bf16 shadow, even transformers' incremental decode) computes log-probs with
other kernels, other precision and other batching than the training forward. On-policy distillation assumes
they are the same distribution; where they are not, the sampled-token loss is silently off-policy and the
student-top-k loss reads a support S_t the trainer would not have chosen. Both are measured every step:

- ``rollout/logprob_gap_mean`` / ``_max``: |log p_engine(y_t) - log p_trainer(y_t)| at the sampled tokens,
  the trainer's taken from the training forward itself (same weights: the step has not updated yet).
- ``rollout/topk_mismatch``: the share of positions whose recorded top-k SET differs from the training
  forward's own top-k.

``rollout.topk_source: trainer`` replaces the engine's recorded S_t by a no-grad forward of the training
model (:func:`trainer_topk`) before the teacher is asked, at the cost of that forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from student_trainer.opd.chunked import gather_logprobs
from student_trainer.opd.metrics import MetricTotals
from student_trainer.opd.policy import pack

if TYPE_CHECKING:
    from student_trainer.rollout.base import RolloutBatch

TOPK_SOURCES = ("engine", "trainer")


def engine_gap_totals(
    engine_logprob_N: torch.Tensor,
    trainer_logprob_N: torch.Tensor,
    stored_topk_ids_N_K: torch.Tensor,
    trainer_topk_ids_N_K: torch.Tensor | None,
) -> MetricTotals:
    """Sums, counts and the peak of the engine/trainer gap over N response tokens (no gradient).

    Args:
        engine_logprob_N: (N,) the engine's recorded log-prob of each sampled token.
        trainer_logprob_N: (N,) the training forward's log-prob of the same token (same distribution:
            temperature, vocabulary).
        stored_topk_ids_N_K: (N, K) the recorded top-k ids (the loss's S_t).
        trainer_topk_ids_N_K: (N, K) the training forward's own top-k ids; None or K = 0: no mismatch row.
    Returns:
        :class:`MetricTotals` with ``rollout/logprob_gap_mean``, ``rollout/topk_mismatch`` and the peak
        ``rollout/logprob_gap_max``.
    """
    gap_N = (
        engine_logprob_N.detach().double() - trainer_logprob_N.detach().double().to(engine_logprob_N.device)
    ).abs()
    n = torch.tensor(float(gap_N.numel()), dtype=torch.float64, device=gap_N.device)
    names, sums, counts = ["rollout/logprob_gap_mean"], [gap_N.sum()], [n]
    k = stored_topk_ids_N_K.shape[1]
    if trainer_topk_ids_N_K is not None and k:
        stored = stored_topk_ids_N_K.sort(dim=1).values
        own = trainer_topk_ids_N_K.to(stored.device).sort(dim=1).values
        names.append("rollout/topk_mismatch")
        sums.append((stored != own).any(1).sum().double())
        counts.append(n)
    peak = gap_N.max() if gap_N.numel() else torch.zeros((), dtype=torch.float64, device=gap_N.device)
    return MetricTotals(
        tuple(names), torch.stack(sums), torch.stack(counts), ("rollout/logprob_gap_max",), peak[None]
    )


def trainer_topk(
    policy: Callable[..., Any],
    rollouts: RolloutBatch,
    *,
    pad_id: int,
    device: torch.device,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_rows: int = 1024,
) -> None:
    """Overwrite every sample's recorded top-k (``topk_ids``, ``topk_logprobs``) with the training model's
    own, from one no-grad forward of the micro-batch (``policy``: a ``HiddenStatesLM``, the head applied inside
    its forward as in the training forward, so a sharded head is whole there). The engine's
    ``sampled_logprobs`` are kept: they say what the engine sampled with (the gap metrics read them)."""
    samples, k = rollouts.samples, rollouts.top_k
    if not samples or not k:
        return
    packed = pack(
        [s.prompt_ids.tolist() for s in samples], [s.completion_ids.tolist() for s in samples], pad_id
    ).to(device)

    def head_fn(hidden_B_L_H: torch.Tensor, head: torch.nn.Module):
        vocab = None if vocab_size is None else min(vocab_size, head.weight.shape[0])
        return gather_logprobs(
            packed.hidden_at_completion(hidden_B_L_H),
            head,
            packed.targets_N[:, None],
            top_k=k,
            temperature=temperature,
            vocab_size=vocab,
            chunk_rows=chunk_rows,
        )

    with torch.no_grad():
        g = policy(packed.input_ids_B_L, packed.attention_mask_B_L, head_fn=head_fn)
    ids_N_K, lps_N_K = g.topk_ids_N_k.cpu(), g.topk_logprobs_N_k.float().cpu()
    start = 0
    for s, length in zip(samples, packed.lengths, strict=True):
        s.topk_ids = ids_N_K[start : start + length].clone()
        s.topk_logprobs = lps_N_K[start : start + length].clone()
        start += length
