"""One OPD step as typed functions, the only copy: ``OPDTrainer`` trains with them, the probe and the
pre-flight measure with them, so a number the probe prints is the number ``train`` logs at step 1.

    micro = split_micro(prompts, cfg.train.micro_batch_prompts)
    batches, times = rollout_phase(engine, teacher, micro, cfg, step=s, rank=r, autocast=acc.autocast)
    for mb in batches:                                   # scored while the next micro-batch was sampled
        batch = build_batch(mb.rollouts.samples, mb.pending.result().scores, pad_id, device, spec)
        loss, totals = forward(policy, policy.head, batch, cfg.loss, spec, normalizer)

Rollouts are seeded by :func:`rollout_seed` from the position in training alone, so ``--resume`` replays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from student_trainer.opd.batch import OPDBatch
from student_trainer.opd.chunked import gather_logprobs
from student_trainer.opd.loss_table import LossInputs, LossSpec
from student_trainer.opd.metrics import MetricTotals, opd_metric_totals

if TYPE_CHECKING:
    from student_trainer.config import Config, LossConfig
    from student_trainer.data.prompts import Prompt
    from student_trainer.rollout.base import RolloutBatch, RolloutEngine
    from student_trainer.teacher.base import PendingScores, Teacher

Autocast = Callable[[], AbstractContextManager]


def rollout_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """Rollout sampling seed: a pure function of the position in training, so --resume replays exactly."""
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + micro) % (2**31 - 1)


def split_micro(prompts: Sequence[Prompt], size: int) -> list[list[Prompt]]:
    """Consecutive micro-batches of at most ``size`` prompts."""
    return [list(prompts[i : i + size]) for i in range(0, len(prompts), size)]


@dataclass
class MicroBatch:
    """One micro-batch in flight: its prompts, the student's rollouts, and the teacher's pending answer."""

    prompts: list[Prompt]
    rollouts: RolloutBatch
    pending: PendingScores

    @property
    def num_tokens(self) -> int:
        return self.rollouts.num_tokens


def sample(
    engine: RolloutEngine, prompts: Sequence[Prompt], cfg: Config, seed: int, autocast: Autocast
) -> RolloutBatch:
    """The student's rollouts of ``prompts`` with the config's sampling settings; top-k recorded for the loss."""
    r = cfg.rollout
    with torch.no_grad(), autocast():
        return engine.generate(
            [p.student_ids for p in prompts],
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
            top_k_record=cfg.loss.top_k,
            seed=seed,
        )


def rollout_phase(
    engine: RolloutEngine,
    teacher: Teacher,
    micro: Sequence[Sequence[Prompt]],
    cfg: Config,
    *,
    step: int,
    rank: int,
    autocast: Autocast,
) -> tuple[list[MicroBatch], dict[str, float]]:
    """Sample each micro-batch and hand it to the teacher at once, so the teacher scores micro-batch i while
    i + 1 is sampled (``train.overlap_scoring=false``: wait for each answer first, the sequential baseline).
    Returns the micro-batches in flight and the phase's times (``generate``, ``teacher_wait``)."""
    times = {"generate": 0.0, "teacher_wait": 0.0}
    batches = []
    for i, prompts in enumerate(micro):
        g0 = time.perf_counter()
        rollouts = sample(engine, prompts, cfg, rollout_seed(cfg.train.seed, step, rank, i), autocast)
        times["generate"] += time.perf_counter() - g0
        pending = teacher.submit(prompts, rollouts, cfg.loss.top_k)
        if not cfg.train.overlap_scoring:
            w0 = time.perf_counter()
            pending.wait()
            times["teacher_wait"] += time.perf_counter() - w0
        batches.append(MicroBatch(list(prompts), rollouts, pending))
    return batches, times


def forward(
    policy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    head: torch.nn.Module,
    batch: OPDBatch,
    loss_cfg: LossConfig,
    spec: LossSpec | None,
    normalizer: float,
    *,
    teacher_logits: Callable[[int, int], torch.Tensor] | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor | None, MetricTotals]:
    """The student's forward on one micro-batch (``policy``: a ``HiddenStatesLM``, possibly wrapped by
    accelerate; ``head``: its output layer): the loss of ``spec`` (its share of the step's token mean,
    ``normalizer`` = the step's token count) and the metric totals. ``spec=None``: metrics only, no graph.

    One chunked pass over the output layer gathers every id set: the sampled token, the stored student top-k
    S_t and, for a loss that reads them, the teacher's top-k (column layout: ``opd.loss_table``).
    """
    hidden_B_L_H = policy(batch.packed.input_ids_B_L, batch.packed.attention_mask_B_L)
    hidden_N_H = batch.packed.hidden_at_completion(hidden_B_L_H)
    ids = [batch.packed.targets_N[:, None], batch.student_topk_ids_N_K]
    if spec is not None and spec.gathers_teacher_topk:
        ids.append(batch.teacher_topk_ids_N_k)
    ids_N_M = torch.cat(ids, 1)
    rows = loss_cfg.chunk_rows
    if spec is not None and spec.differentiates_gather:
        g = gather_logprobs(hidden_N_H, head, ids_N_M, want_entropy=True, chunk_rows=rows)
    else:
        with torch.no_grad():
            g = gather_logprobs(hidden_N_H.detach(), head, ids_N_M, want_entropy=True, chunk_rows=rows)
    loss = None
    if spec is not None:
        inputs = LossInputs(
            logprobs_N_M=g.logprobs_N_M,
            batch=batch,
            normalizer=normalizer,
            topk_form=loss_cfg.topk_form,
            hidden_N_H=hidden_N_H,
            head=head,
            chunk_rows=rows,
            teacher_logits=teacher_logits,
            vocab_size=vocab_size,
        )
        loss = spec.compute(inputs)
    return loss, metric_totals(batch, g.logprobs_N_M.detach(), g.entropy_N)


def metric_totals(batch: OPDBatch, logprobs_N_M: torch.Tensor, entropy_N: torch.Tensor) -> MetricTotals:
    """The paper's metrics (``opd.metrics``) from the gathered student log-probs and the teacher's scores."""
    k = batch.student_topk_ids_N_K.shape[1]
    return opd_metric_totals(
        student_topk_ids_N_k=batch.student_topk_ids_N_K,
        student_topk_logprobs_N_k=logprobs_N_M[:, 1 : 1 + k],
        teacher_topk_ids_N_k=batch.teacher_topk_ids_N_k,
        teacher_topk_logprobs_N_k=batch.teacher_topk_logprobs_N_k,
        student_logprob_N=logprobs_N_M[:, 0],
        teacher_logprob_N=batch.teacher_logprob_N,
        teacher_candidate_logprobs_N_k=batch.teacher_candidate_logprobs_N_K,
        student_entropy_N=entropy_N,
        teacher_entropy_N=batch.teacher_entropy_N,
    )
