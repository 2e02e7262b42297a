"""On-policy distillation losses: pure functions, tensor in, scalar loss out.

Semantics follow docs/OPD.md (arXiv 2604.13016 and its official code, thunlp/OPD). All
losses are token means over the micro-batch's response tokens: sum over unmasked tokens divided by their
number, clamped at 1 (all masked -> 0, not NaN); pass ``normalizer`` (e.g. the token count of the whole
accumulated batch) to divide by something else, so that micro-batch losses add up to the batch's token mean.

Inputs are per-token tensors with the response tokens along the leading axis ``N`` (a flattened ``B*T`` or
``B, T``, as long as ``mask_N`` has the same leading shape). Student log-probs come from
``student_trainer.opd.chunked`` (full-vocabulary normalised, with gradient); teacher log-probs from the teacher
service (full-vocabulary normalised; ``candidate_logprobs`` at the student's ids).

API
---
``sampled_token_loss(student_logprob_N, teacher_logprob_N, mask_N)``           variant 1, the k = 0 default
``student_topk_loss(student_logprobs_N_K, teacher_logprobs_N_K, mask_N)``     variant 2, the paper's (k = 16)
``student_topk_advantages(student_logprobs_N_K, teacher_logprobs_N_K)``       its A_t(v), also for metrics
``teacher_topk_tail_loss(student_logprobs_N_k, teacher_topk_logprobs_N_k, mask_N)``   verl / TRL style
``full_vocab_loss(kl_N, mask_N)``   variant 3, kl_N from ``chunked.full_vocab_reverse_kl``
``policy_gradient_loss(logprobs_N_K, advantages_N_K, mask_N)``                the shared surrogate
``token_mean(values_N, mask_N)`` and ``assert_on_policy(rollout_version, current_version)``

Teacher log-probs of -inf (the teacher gives an id zero probability) are raised to
``TEACHER_LOGPROB_FLOOR`` so that one such token yields a large finite advantage instead of inf/NaN
gradients for the whole step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from student_trainer.errors import OffPolicyError

# e^-100 ~ 4e-44: below anything a real fp32 softmax over ~150k ids assigns to a token it can sample.
TEACHER_LOGPROB_FLOOR = -100.0
# The tail bucket's mass is 1 - sum(top-k probs); below ~1e-12 (fp64 math on fp32 inputs) it is rounding noise.
TAIL_MASS_FLOOR = 1e-12


def assert_on_policy(rollout_policy_version: int, current_policy_version: int) -> None:
    """Raise :class:`OffPolicyError` unless the rollout's policy version is the current one.

    The student-top-k loss re-gathers log-probs at ids S_t stored in the rollout pass and weights them
    with the CURRENT probabilities; that is only the paper's objective while S_t is still the student's
    top-k, i.e. one optimizer update per rollout batch (docs/OPD.md, section 4 "Strictly on-policy": no
    importance ratio). Call this before computing the loss of every micro-batch.
    """
    if rollout_policy_version != current_policy_version:
        raise OffPolicyError(
            f"student top-k ids were stored by policy version {rollout_policy_version} but the policy is now "
            f"version {current_policy_version}; the student-top-k loss is strictly on-policy: take exactly "
            "one optimizer step per rollout batch (or regenerate the rollouts)"
        )


def _mask_like(values: torch.Tensor, mask_N: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask with the leading shape of ``mask_N`` (all True if None)."""
    if mask_N is None:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if mask_N.shape != values.shape[: mask_N.dim()]:
        raise ValueError(
            f"mask_N shape {tuple(mask_N.shape)} must match the leading dims of {tuple(values.shape)}"
        )
    return mask_N.bool()


def token_mean(
    values_N: torch.Tensor, mask_N: torch.Tensor | None = None, normalizer: float | None = None
) -> torch.Tensor:
    """sum over unmasked tokens / max(number of unmasked tokens, 1) (or / ``normalizer``).

    Args:
        values_N: (N,) per-token values (any leading shape matching mask_N).
        mask_N: (N,) bool or 0/1; masked tokens add exactly 0 even if their value is inf or NaN.
        normalizer: divide by this instead of the local token count (> 0).
    Returns:
        () scalar.
    """
    mask = _mask_like(values_N, mask_N)
    total = torch.where(mask, values_N, torch.zeros((), dtype=values_N.dtype, device=values_N.device)).sum()
    if normalizer is not None:
        if not normalizer > 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        return total / normalizer
    return total / mask.sum().clamp_min(1).to(values_N.dtype)


def _sanitize_teacher(
    student_lp: torch.Tensor, teacher_lp: torch.Tensor, mask_N: torch.Tensor | None, floor: float
) -> torch.Tensor:
    """Teacher log-probs floored, and equal to the student's (detached) at masked tokens.

    Masked positions may hold padding (-inf, NaN); replacing them makes their advantage exactly 0, so no
    0 * inf = NaN can leak into the gradient through ``torch.where``.
    """
    if teacher_lp.shape != student_lp.shape:
        raise ValueError(
            f"teacher log-probs shape {tuple(teacher_lp.shape)} must equal the student's {tuple(student_lp.shape)}"
        )
    teacher = teacher_lp.to(student_lp.dtype).clamp_min(floor)
    if mask_N is None:
        return teacher
    mask = _mask_like(student_lp, mask_N)
    mask = mask.reshape(mask.shape + (1,) * (student_lp.dim() - mask.dim()))
    return torch.where(mask, teacher, student_lp.detach())


def policy_gradient_loss(
    logprobs_N_K: torch.Tensor,
    advantages_N_K: torch.Tensor,
    mask_N: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """-token_mean_t sum_k A_t(k) * log pi(k): the on-policy surrogate (no ratio, no clip: one update per batch).

    Args:
        logprobs_N_K: (N, K) student log-probs with gradient (K = 1 for the sampled token).
        advantages_N_K: (N, K) advantages; treated as constants (detached here).
    Returns:
        () scalar; its gradient is -sum_k A * grad log pi / n_tokens.
    """
    per_token_N = (advantages_N_K.detach() * logprobs_N_K).sum(-1)
    return -token_mean(per_token_N, mask_N, normalizer)


def sampled_token_loss(
    student_logprob_N: torch.Tensor,
    teacher_logprob_N: torch.Tensor,
    mask_N: torch.Tensor | None = None,
    normalizer: float | None = None,
    teacher_logprob_floor: float = TEACHER_LOGPROB_FLOOR,
) -> torch.Tensor:
    """Sampled-token OPD: r = log p(y) - log q(y), A = -r (no grad), loss = -token_mean(A * log p(y)).

    Args:
        student_logprob_N: (N,) student log-prob of the sampled token, with gradient.
        teacher_logprob_N: (N,) teacher's full-vocab log-prob of the same token.
    Returns:
        () scalar. Its value is a surrogate; the per-token reverse-KL estimate is ``r`` (see opd_metrics).
    """
    teacher = _sanitize_teacher(student_logprob_N, teacher_logprob_N, mask_N, teacher_logprob_floor)
    advantage_N = -(student_logprob_N.detach() - teacher)
    return policy_gradient_loss(student_logprob_N[..., None], advantage_N[..., None], mask_N, normalizer)


def student_topk_advantages(
    student_logprobs_N_K: torch.Tensor,
    teacher_logprobs_N_K: torch.Tensor,
    teacher_logprob_floor: float = TEACHER_LOGPROB_FLOOR,
) -> torch.Tensor:
    """A_t(v) = -w_t(v) * (log p_t(v) - log q_t(v)) for v in the student's top-k S_t, no gradient.

    w_t(v) = p_t(v) / sum_{u in S_t} p_t(u) (renormalised over S_t), while the log-ratio keeps the
    FULL-vocabulary log-probs on both sides. This is the official code's choice (thunlp/OPD issues #15, #19),
    not the paper's Eq. 5: renormalising the log-ratio too makes the k = 1 loss identically zero, and
    dropping the weights' renormalisation lets the student shrink its whole top-k mass (verl PR #5041).

    Args:
        student_logprobs_N_K: (N, K) student full-vocab log-probs at S_t.
        teacher_logprobs_N_K: (N, K) teacher full-vocab log-probs at the same ids.
    Returns:
        (N, K) advantages (detached), fp32 or wider.
    """
    dtype = torch.promote_types(student_logprobs_N_K.dtype, torch.float32)  # fp32, or fp64 when given fp64
    lp = student_logprobs_N_K.detach().to(dtype)
    teacher = teacher_logprobs_N_K.detach().to(dtype).clamp_min(teacher_logprob_floor)
    weights_N_K = torch.softmax(lp, dim=-1)  # = p / sum_S p, computed stably from log-probs
    return -weights_N_K * (lp - teacher)


def student_topk_loss(
    student_logprobs_N_K: torch.Tensor,
    teacher_logprobs_N_K: torch.Tensor,
    mask_N: torch.Tensor | None = None,
    *,
    mode: Literal["paper", "direct"] = "paper",
    normalizer: float | None = None,
    teacher_logprob_floor: float = TEACHER_LOGPROB_FLOOR,
) -> torch.Tensor:
    """Top-k reverse KL on the student's support S_t (the ids stored in the rollout pass).

    mode="paper" (default, ``loss.topk_form=paper``; the paper's released code, not its Eq. 5):
        loss = -token_mean_t sum_{v in S_t} A_t(v) * log p_t(v) with A from :func:`student_topk_advantages`;
        the K dimension is kept (collapsing it into one scalar per position gives zero gradient on-policy,
        miles #2362). The value is a surrogate; its gradient is sum_v w(v) (log p(v) - log q(v)) grad log p(v).
        k = 1 still trains: A = -(log p - log q).
    mode="direct" (``loss.topk_form=direct``): loss = token_mean_t sum_{v in S_t} pbar(v) (log pbar(v) -
        log qbar(v)), the KL between the distributions renormalised over S_t (the paper's Eq. 5),
        differentiated directly. Caveat: at k = 1 pbar = qbar = 1, so the loss and its gradient are
        identically zero.

    Args:
        student_logprobs_N_K: (N, K) CURRENT student full-vocab log-probs re-gathered at the stored ids, with
            gradient (``chunked.gather_logprobs``). On-policy they equal the rollout's; see assert_on_policy.
        teacher_logprobs_N_K: (N, K) teacher full-vocab log-probs at the same ids (the service's
            ``candidate_logprobs``).
        mask_N: (N,) response-token mask.
    Returns:
        () scalar.
    """
    teacher = _sanitize_teacher(student_logprobs_N_K, teacher_logprobs_N_K, mask_N, teacher_logprob_floor)
    if mode == "paper":
        advantages = student_topk_advantages(student_logprobs_N_K, teacher, teacher_logprob_floor)
        return policy_gradient_loss(student_logprobs_N_K, advantages, mask_N, normalizer)
    if mode == "direct":
        pbar_log = torch.log_softmax(student_logprobs_N_K, dim=-1)
        qbar_log = torch.log_softmax(teacher.detach(), dim=-1)
        kl_N = (pbar_log.exp() * (pbar_log - qbar_log)).sum(-1)
        return token_mean(kl_N, mask_N, normalizer)
    raise ValueError(f"mode must be 'paper' or 'direct', got {mode!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_tail_bucket(logprobs_N_k: torch.Tensor) -> torch.Tensor:
    """(N, k) full-vocab log-probs -> (N, k + 1) bucket log-probs in fp64, the last = log(remaining mass)."""
    lp = logprobs_N_k.double()
    covered = torch.logsumexp(lp, dim=-1, keepdim=True)
    # clamp: rounding can push the covered mass to >= 1; the tail is then "tiny", not negative
    tail = _log1mexp(covered.clamp(max=math.log1p(-TAIL_MASS_FLOOR)))
    return torch.cat([lp, tail], dim=-1)


def teacher_topk_tail_loss(
    student_logprobs_N_k: torch.Tensor,
    teacher_topk_logprobs_N_k: torch.Tensor,
    mask_N: torch.Tensor | None = None,
    *,
    direction: Literal["reverse", "forward"] = "reverse",
    normalizer: float | None = None,
    teacher_logprob_floor: float = TEACHER_LOGPROB_FLOOR,
) -> torch.Tensor:
    """KL over k + 1 buckets: the teacher's top-k ids plus one bucket holding each side's remaining mass.

    Works with a stock vLLM teacher (``prompt_logprobs=k``), as in verl and TRL. Buckets b: P(b) = p(v_b) for
    the k ids and P(tail) = 1 - sum_k p(v_b); same for Q. reverse: sum_b P (log P - log Q) (default, the OPD
    objective); forward: sum_b Q (log Q - log P). Differentiated directly (not a policy-gradient surrogate).
    Bucket math runs in fp64; a tail mass below ``TAIL_MASS_FLOOR`` is treated as that floor.

    Args:
        student_logprobs_N_k: (N, k) student full-vocab log-probs at the TEACHER's top-k ids, with gradient.
        teacher_topk_logprobs_N_k: (N, k) the teacher's top-k log-probs (full-vocab normalised).
        mask_N: (N,) response-token mask.
    Returns:
        () scalar, in the dtype of the student log-probs.
    """
    teacher = _sanitize_teacher(
        student_logprobs_N_k, teacher_topk_logprobs_N_k, mask_N, teacher_logprob_floor
    )
    log_p = _with_tail_bucket(student_logprobs_N_k)
    log_q = _with_tail_bucket(teacher.detach())
    if direction == "reverse":
        kl_N = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif direction == "forward":
        kl_N = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    return token_mean(kl_N, mask_N, normalizer).to(student_logprobs_N_k.dtype)


def full_vocab_loss(
    kl_N: torch.Tensor, mask_N: torch.Tensor | None = None, normalizer: float | None = None
) -> torch.Tensor:
    """Exact full-vocabulary reverse KL, token-mean: kl_N from ``chunked.full_vocab_reverse_kl`` (with grad).

    Args:
        kl_N: (N,) per-token KL(p_t || q_t) over the vocabulary.
    Returns:
        () scalar.
    """
    return token_mean(kl_N, mask_N, normalizer)
