"""One micro-batch of OPD: rollouts + teacher scores -> tensors -> loss (with gradient) and metric totals.

Flattened over the micro-batch's response tokens (N): every tensor here is ``*_N`` or ``*_N_K``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from shared.protocol import ScoredSequence
from student_trainer import losses
from student_trainer.chunked import full_vocab_reverse_kl, gather_logprobs
from student_trainer.opd_metrics import MetricTotals, opd_metric_totals
from student_trainer.policy import PackedBatch, pack
from student_trainer.rollout import RolloutSample


@dataclass
class OPDBatch:
    """Student side from the rollout pass, teacher side from the service; all on one device."""

    packed: PackedBatch
    student_topk_ids_N_K: torch.Tensor  # stored S_t (rollout pass)
    student_topk_logprobs_N_K: torch.Tensor
    teacher_logprob_N: torch.Tensor
    teacher_topk_ids_N_k: torch.Tensor
    teacher_topk_logprobs_N_k: torch.Tensor
    teacher_candidate_logprobs_N_K: torch.Tensor | None
    teacher_entropy_N: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        return int(self.packed.targets_N.numel())


def _cat(arrays: list[np.ndarray | None], dtype: torch.dtype) -> torch.Tensor | None:
    if any(a is None for a in arrays):
        return None
    return torch.from_numpy(np.concatenate(arrays)).to(dtype)


def build_batch(
    samples: list[RolloutSample], scores: list[ScoredSequence], pad_id: int, device: torch.device
) -> OPDBatch:
    """Flatten rollouts and their teacher scores; checks that the teacher scored the same tokens."""
    for i, (s, sc) in enumerate(zip(samples, scores, strict=True)):
        if not np.array_equal(s.completion_ids.numpy(), sc.completion_ids):
            raise RuntimeError(
                f"sample {i}: the teacher scored different completion tokens than were sampled"
            )
    packed = pack(
        [s.prompt_ids.tolist() for s in samples], [s.completion_ids.tolist() for s in samples], pad_id
    )
    batch = OPDBatch(
        packed=packed,
        student_topk_ids_N_K=torch.cat([s.topk_ids for s in samples]).long(),
        student_topk_logprobs_N_K=torch.cat([s.topk_logprobs for s in samples]).float(),
        teacher_logprob_N=_cat([sc.logprobs for sc in scores], torch.float32),
        teacher_topk_ids_N_k=_cat([sc.topk_ids for sc in scores], torch.long),
        teacher_topk_logprobs_N_k=_cat([sc.topk_logprobs for sc in scores], torch.float32),
        teacher_candidate_logprobs_N_K=_cat([sc.candidate_logprobs for sc in scores], torch.float32),
        teacher_entropy_N=_cat([sc.entropy for sc in scores], torch.float32),
    )
    return _to(batch, device)


def _to(batch: OPDBatch, device: torch.device) -> OPDBatch:
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.__dict__.items()}
    moved["packed"] = batch.packed.to(device)
    return OPDBatch(**moved)


def microbatch_loss(
    hidden_N_H: torch.Tensor,
    head: torch.nn.Linear,
    batch: OPDBatch,
    loss_type: str,
    normalizer: float,
    *,
    topk_mode: str = "code",
    chunk_rows: int = 1024,
    teacher_logits: Callable[[int, int], torch.Tensor] | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, MetricTotals]:
    """The micro-batch's share of the step's token-mean loss (``normalizer`` = the step's token count) and
    the metric totals. One chunked pass over the output layer gathers every id set the loss needs."""
    n_s = batch.student_topk_ids_N_K.shape[1]
    ids = [batch.packed.targets_N[:, None], batch.student_topk_ids_N_K]
    if loss_type == "teacher_topk":
        ids.append(batch.teacher_topk_ids_N_k)
    if loss_type == "full_vocab":
        kl = full_vocab_reverse_kl(
            hidden_N_H,
            head,
            teacher_logits,
            vocab_size=vocab_size,
            sample_ids_N=batch.packed.targets_N,
            chunk_rows=chunk_rows,
        )
        loss = losses.full_vocab_loss(kl.kl_N, None, normalizer)
        with torch.no_grad():
            g = gather_logprobs(
                hidden_N_H.detach(), head, torch.cat(ids, 1), want_entropy=True, chunk_rows=chunk_rows
            )
    else:
        g = gather_logprobs(hidden_N_H, head, torch.cat(ids, 1), want_entropy=True, chunk_rows=chunk_rows)
        lp = g.logprobs_N_M
        if loss_type == "sampled_token":
            loss = losses.sampled_token_loss(lp[:, 0], batch.teacher_logprob_N, None, normalizer)
        elif loss_type == "student_topk":
            loss = losses.student_topk_loss(
                lp[:, 1 : 1 + n_s],
                batch.teacher_candidate_logprobs_N_K,
                None,
                mode=topk_mode,
                normalizer=normalizer,
            )
        elif loss_type == "teacher_topk":
            loss = losses.teacher_topk_tail_loss(
                lp[:, 1 + n_s :], batch.teacher_topk_logprobs_N_k, None, normalizer=normalizer
            )
        else:
            raise ValueError(f"unknown loss type {loss_type!r}")
    lp = g.logprobs_N_M.detach()
    totals = opd_metric_totals(
        student_topk_ids_N_k=batch.student_topk_ids_N_K,
        student_topk_logprobs_N_k=lp[:, 1 : 1 + n_s],
        teacher_topk_ids_N_k=batch.teacher_topk_ids_N_k,
        teacher_topk_logprobs_N_k=batch.teacher_topk_logprobs_N_k,
        student_logprob_N=lp[:, 0],
        teacher_logprob_N=batch.teacher_logprob_N,
        teacher_candidate_logprobs_N_k=batch.teacher_candidate_logprobs_N_K,
        student_entropy_N=g.entropy_N,
        teacher_entropy_N=batch.teacher_entropy_N,
    )
    return loss, totals
