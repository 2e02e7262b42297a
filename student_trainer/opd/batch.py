"""One micro-batch of OPD as tensors: the student's rollouts and the teacher's scores, flattened over the
micro-batch's response tokens (N): every tensor here is ``*_N`` or ``*_N_K``. ``opd.step.forward`` turns it
into a loss and metric totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from shared.wire import ScoredSequence
from student_trainer.opd.policy import PackedBatch, pack
from student_trainer.rollout.base import RolloutSample
from student_trainer.teacher.errors import TeacherProtocolError

if TYPE_CHECKING:
    from student_trainer.opd.loss_table import LossSpec


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
    engine_logprob_N: torch.Tensor | None = None  # the rollout engine's log-prob of each sampled token

    @property
    def num_tokens(self) -> int:
        return int(self.packed.targets_N.numel())


def _cat(arrays: list[np.ndarray | None], dtype: torch.dtype) -> torch.Tensor | None:
    if any(a is None for a in arrays):
        return None
    return torch.from_numpy(np.concatenate(arrays)).to(dtype)


def build_batch(
    samples: list[RolloutSample],
    scores: list[ScoredSequence],
    pad_id: int,
    device: torch.device,
    spec: LossSpec | None = None,
) -> OPDBatch:
    """Flatten rollouts and their teacher scores. Raises :class:`TeacherProtocolError` when the teacher
    scored other tokens than were sampled, or left out a field the loss ``spec`` reads."""
    if len(scores) != len(samples):
        raise TeacherProtocolError(f"the teacher returned {len(scores)} results for {len(samples)} samples")
    for i, (s, sc) in enumerate(zip(samples, scores, strict=True)):
        if not np.array_equal(s.completion_ids.numpy(), sc.completion_ids):
            raise TeacherProtocolError(
                f"sample {i}: the teacher scored different completion tokens than were sampled"
            )
        missing = [f for f in (spec.teacher_fields if spec else ()) if getattr(sc, f) is None]
        if missing:
            raise TeacherProtocolError(
                f"sample {i}: the teacher's answer has no {', '.join(missing)}, which loss.type={spec.name} "
                "reads (the teacher reported the capability but did not return it)"
            )
    packed = pack(
        [s.prompt_ids.tolist() for s in samples], [s.completion_ids.tolist() for s in samples], pad_id
    )
    batch = OPDBatch(
        packed=packed,
        student_topk_ids_N_K=torch.cat([s.topk_ids for s in samples]).long(),
        student_topk_logprobs_N_K=torch.cat([s.topk_logprobs for s in samples]).float(),
        engine_logprob_N=torch.cat([s.sampled_logprobs for s in samples]).float(),
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
