"""One OPD step as typed functions, the only copy: ``OPDTrainer`` trains with them, the probe and the
pre-flight measure with them, so a number the probe prints is the number ``train`` logs at step 1.

    micro = split_micro(prompts, cfg.train.micro_batch_prompts)
    batches, times = rollout_phase(engine, teacher, micro, cfg, step=s, rank=r, autocast=acc.autocast)
    for mb in batches:                                   # scored while the next micro-batch was sampled
        batch = build_batch(mb.rollouts.samples, mb.pending.result().scores, pad_id, device, spec)
        loss, totals = forward(policy, batch, cfg.loss, spec, normalizer,
                               temperature=cfg.rollout.temperature, vocab_size=len(tokenizer))

Rollouts are seeded by :func:`rollout_seed` from the position in training alone, so ``--resume`` replays.
The objective is the KL of the distributions the tokens are sampled from: at ``rollout.temperature`` T the
student's log-probs (rollout record, training forward) and the teacher's are all log_softmax(logits / T),
normalised over the tokenizer's ids (docs/OPD.md, "Temperature, top-p and padded rows").
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
from student_trainer.opd.engine_gap import engine_gap_totals
from student_trainer.opd.loss_table import LossInputs, LossSpec
from student_trainer.opd.metrics import MetricTotals, opd_metric_totals

if TYPE_CHECKING:
    from student_trainer.config import Config, LossConfig
    from student_trainer.data.prompts import Prompt
    from student_trainer.rollout.base import RolloutBatch, RolloutEngine
    from student_trainer.teacher.base import PendingScores, Teacher

Autocast = Callable[[], AbstractContextManager]


def rollout_seed(seed: int, step: int, rank: int, micro: int, world: int = 1) -> int:
    """Rollout sampling seed: a pure function of the position in training, so --resume replays exactly.

    Micro-batch ``micro`` of process ``rank`` is the step's micro-batch ``micro * world + rank``: with one
    prompt per micro-batch that is the prompt's index in the step on any number of processes (process r takes
    prompts r, r + world, ...), so a 1-process and an N-process run sample the same rollouts."""
    return (seed * 1_000_003 + step * 10_007 + micro * world + rank) % (2**31 - 1)


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
    rescore: Callable[[RolloutBatch], None] | None = None,
    world: int = 1,
) -> tuple[list[MicroBatch], dict[str, float]]:
    """Sample each micro-batch and hand it to the teacher at once, so the teacher scores micro-batch i while
    i + 1 is sampled (``train.overlap_scoring=false``: wait for each answer first, the sequential baseline).
    ``rescore`` (``rollout.topk_source=trainer``): replaces the recorded top-k before the teacher is asked.
    ``world``: the number of processes (the rollout seeds, :func:`rollout_seed`).
    Returns the micro-batches in flight and the phase's times (``generate``, ``topk_forward``,
    ``teacher_wait``)."""
    times = {"generate": 0.0, "topk_forward": 0.0, "teacher_wait": 0.0}
    batches = []
    for i, prompts in enumerate(micro):
        g0 = time.perf_counter()
        rollouts = sample(engine, prompts, cfg, rollout_seed(cfg.train.seed, step, rank, i, world), autocast)
        times["generate"] += time.perf_counter() - g0
        if rescore is not None:
            r0 = time.perf_counter()
            with autocast():
                rescore(rollouts)
            times["topk_forward"] += time.perf_counter() - r0
        pending = teacher.submit(prompts, rollouts, cfg.loss.top_k, temperature=cfg.rollout.temperature)
        if not cfg.train.overlap_scoring:
            w0 = time.perf_counter()
            pending.wait()
            times["teacher_wait"] += time.perf_counter() - w0
        batches.append(MicroBatch(list(prompts), rollouts, pending))
    return batches, times


def forward(
    policy: Callable[..., tuple[torch.Tensor | None, MetricTotals]],
    batch: OPDBatch,
    loss_cfg: LossConfig,
    spec: LossSpec | None,
    normalizer: float,
    *,
    teacher_logits: Callable[[int, int], torch.Tensor] | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor | None, MetricTotals]:
    """The student's forward on one micro-batch (``policy``: a ``HiddenStatesLM``, possibly wrapped by
    accelerate): the loss of ``spec`` (its share of the step's token mean, ``normalizer`` = the step's token
    count) and the metric totals. ``spec=None``: metrics only, no graph.

    The output layer is applied inside the policy's own forward (``policy(ids, mask, head_fn=...)``), where a
    sharded head (FSDP2, ZeRO-3) is whole (``opd.distributed``). One chunked pass over it gathers every id set:
    the sampled token, the stored student top-k S_t and, for a loss that reads them, the teacher's top-k
    (column layout: ``opd.loss_table``), as log_softmax(logits / ``temperature``) over the first
    ``vocab_size`` ids (the tokenizer's; None = every output row): pass the rollout temperature, so the loss
    differentiates the distribution that sampled the tokens (the teacher's scores must be at the same
    temperature). ``teacher_logits`` (in-process teacher, full_vocab) must already be divided by it.
    """

    def head_fn(hidden_B_L_H: torch.Tensor, head: torch.nn.Module):
        return _head_loss(
            hidden_B_L_H, head, batch, loss_cfg, spec, normalizer, teacher_logits, vocab_size, temperature
        )

    return policy(batch.packed.input_ids_B_L, batch.packed.attention_mask_B_L, head_fn=head_fn)


def _head_loss(
    hidden_B_L_H: torch.Tensor,
    head: torch.nn.Module,
    batch: OPDBatch,
    loss_cfg: LossConfig,
    spec: LossSpec | None,
    normalizer: float,
    teacher_logits: Callable[[int, int], torch.Tensor] | None,
    vocab_size: int | None,
    temperature: float,
) -> tuple[torch.Tensor | None, MetricTotals]:
    """:func:`forward` after the backbone: (B, L, H) final hidden states -> (loss, metric totals)."""
    hidden_N_H = batch.packed.hidden_at_completion(hidden_B_L_H)
    ids = [batch.packed.targets_N[:, None], batch.student_topk_ids_N_K]
    if spec is not None and spec.gathers_teacher_topk:
        ids.append(batch.teacher_topk_ids_N_k)
    ids_N_M = torch.cat(ids, 1)
    # a tokenizer longer than the output layer: the ids past its rows cannot be sampled anyway
    vocab = None if vocab_size is None else min(vocab_size, head.weight.shape[0])
    opts = dict(want_entropy=True, temperature=temperature, vocab_size=vocab, chunk_rows=loss_cfg.chunk_rows)
    opts["top_k"] = batch.student_topk_ids_N_K.shape[1]  # the trainer's own S_t: rollout/topk_mismatch
    if spec is not None and spec.differentiates_gather:
        g = gather_logprobs(hidden_N_H, head, ids_N_M, **opts)
    else:
        with torch.no_grad():
            g = gather_logprobs(hidden_N_H.detach(), head, ids_N_M, **opts)
    loss = None
    if spec is not None:
        inputs = LossInputs(
            logprobs_N_M=g.logprobs_N_M,
            batch=batch,
            normalizer=normalizer,
            topk_form=loss_cfg.topk_form,
            hidden_N_H=hidden_N_H,
            head=head,
            chunk_rows=loss_cfg.chunk_rows,
            teacher_logits=teacher_logits,
            vocab_size=vocab_size,
            temperature=temperature,
        )
        loss = spec.compute(inputs)
    return loss, metric_totals(batch, g.logprobs_N_M.detach(), g.entropy_N, g.topk_ids_N_k)


def metric_totals(
    batch: OPDBatch,
    logprobs_N_M: torch.Tensor,
    entropy_N: torch.Tensor,
    trainer_topk_ids_N_K: torch.Tensor | None = None,
) -> MetricTotals:
    """The paper's metrics (``opd.metrics``) from the gathered student log-probs and the teacher's scores,
    joined with the rollout engine's gap to the training forward (``opd.engine_gap``)."""
    k = batch.student_topk_ids_N_K.shape[1]
    totals = opd_metric_totals(
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
    if batch.engine_logprob_N is None:
        return totals
    gap = engine_gap_totals(
        batch.engine_logprob_N, logprobs_N_M[:, 0], batch.student_topk_ids_N_K, trainer_topk_ids_N_K
    )
    return totals.join(gap)
