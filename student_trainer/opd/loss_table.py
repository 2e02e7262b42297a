"""The OPD losses as one table: each row says what the loss reads and how it is computed.

Config validation (``loss.type``, ``loss.top_k``, ``teacher.local``), the teacher connection (which
capabilities a teacher must report) and the batch builder (which teacher fields must have come back) all
read :data:`LOSSES`; adding a loss is one function here plus one row (and its pure math in ``losses.py``).
The math and its semantics: docs/OPD.md, section 2 "The losses".

Every loss gathers the student's log-probs at the sampled token and at its stored top-k S_t (the metrics
need both); ``gathers_teacher_topk`` adds the teacher's top-k ids. Columns of ``LossInputs.logprobs_N_M``:
``[:, 0]`` sampled token, ``[:, 1:1+K]`` student top-k, ``[:, 1+K:]`` teacher top-k (when gathered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from student_trainer.opd.batch import OPDBatch


@dataclass
class LossInputs:
    """What a loss function may read for one micro-batch (N response tokens, K = student top-k)."""

    logprobs_N_M: torch.Tensor  # student log-probs at the gathered ids (with grad unless full_vocab)
    batch: OPDBatch
    normalizer: float  # the step's token count: micro-batch losses add up to the step's token mean
    topk_form: str  # loss.topk_form: "paper" | "direct"
    hidden_N_H: torch.Tensor  # student hidden states (full_vocab applies the head itself)
    head: torch.nn.Module
    chunk_rows: int
    teacher_logits: Callable[[int, int], torch.Tensor] | None = None  # in-process teacher, rows [a, b)
    vocab_size: int | None = None  # normalise over the tokenizer's ids (padded output rows excluded)
    temperature: float = 1.0  # the rollout temperature: both sides' logits are divided by it

    @property
    def num_student_topk(self) -> int:
        return int(self.batch.student_topk_ids_N_K.shape[1])


@dataclass(frozen=True)
class LossSpec:
    """One loss. ``needs`` are teacher capabilities (``shared.protocol.Capabilities`` fields) without which it
    cannot run; ``teacher_fields`` are the ``ScoredSequence`` fields it reads."""

    name: str
    summary: str
    compute: Callable[[LossInputs], torch.Tensor]
    needs: tuple[str, ...] = ()
    teacher_fields: tuple[str, ...] = ()
    gathers_teacher_topk: bool = False
    local_teacher: bool = False  # needs the teacher's whole distribution: teacher.local only
    min_top_k: int = 1  # loss.top_k must be at least this
    differentiates_gather: bool = True  # False: the gathered log-probs are only for the metrics


def _sampled_token(x: LossInputs) -> torch.Tensor:
    from student_trainer.opd import losses

    return losses.sampled_token_loss(x.logprobs_N_M[:, 0], x.batch.teacher_logprob_N, None, x.normalizer)


def _student_topk(x: LossInputs) -> torch.Tensor:
    from student_trainer.opd import losses

    k = x.num_student_topk
    return losses.student_topk_loss(
        x.logprobs_N_M[:, 1 : 1 + k],
        x.batch.teacher_candidate_logprobs_N_K,
        None,
        mode=x.topk_form,
        normalizer=x.normalizer,
    )


def _teacher_topk(x: LossInputs) -> torch.Tensor:
    from student_trainer.opd import losses

    k = x.num_student_topk
    return losses.teacher_topk_tail_loss(
        x.logprobs_N_M[:, 1 + k :], x.batch.teacher_topk_logprobs_N_k, None, normalizer=x.normalizer
    )


def _full_vocab(x: LossInputs) -> torch.Tensor:
    from student_trainer.opd import losses
    from student_trainer.opd.chunked import full_vocab_reverse_kl

    kl = full_vocab_reverse_kl(
        x.hidden_N_H,
        x.head,
        x.teacher_logits,
        vocab_size=x.vocab_size,
        sample_ids_N=x.batch.packed.targets_N,
        temperature=x.temperature,
        chunk_rows=x.chunk_rows,
    )
    return losses.full_vocab_loss(kl.kl_N, None, x.normalizer)


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "student_topk",
            "reverse KL on the student's top-k (the paper's default); needs log-probs at the student's ids",
            _student_topk,
            needs=("candidate_ids",),
            teacher_fields=("candidate_logprobs",),
        ),
        LossSpec(
            "sampled_token",
            "reverse KL estimated at the sampled token (policy gradient with advantage log q - log p)",
            _sampled_token,
            teacher_fields=("logprobs",),
            min_top_k=0,
        ),
        LossSpec(
            "teacher_topk",
            "KL over the teacher's top-k plus one tail bucket (verl/TRL style; works with a stock vLLM teacher)",
            _teacher_topk,
            teacher_fields=("topk_logprobs",),
            gathers_teacher_topk=True,
        ),
        LossSpec(
            "full_vocab",
            "exact reverse KL over the whole vocabulary; needs an in-process teacher (teacher.local)",
            _full_vocab,
            local_teacher=True,
            differentiates_gather=False,
        ),
    )
}


def loss_spec(name: str) -> LossSpec:
    """The row of ``name``; a ConfigError listing the known losses otherwise."""
    from student_trainer.errors import ConfigError

    if name not in LOSSES:
        raise ConfigError(f"loss.type={name!r} is unknown; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
