"""The per-step metrics the OPD paper watches (docs/OPD.md, section 5 "What the trainer logs"), vectorised.

In successful OPD the overlap ratio rises steadily and a small shared set holds almost all the probability
mass on both sides; in failed OPD the overlap stagnates and the overlap-token advantages stay weak.

Keys (all means over the response tokens unless said otherwise):

- ``opd/overlap_ratio``: |S_student ∩ S_teacher| / k, the two sides' top-k sets (same k required).
- ``opd/overlap_top1``: the fraction of tokens where both sides' most likely token is the same.
- ``opd/overlap_advantage``: mean of A_t(v) over all (token, v) pairs with v in the overlap, with A the
  student-top-k advantage -w(v) (log p(v) - log q(v)) (``losses.student_topk_advantages``).
- ``opd/nonoverlap_advantage``, ``opd/reverse_kl_topk``: need the teacher's log-probs at every student
  top-k id (``teacher_candidate_logprobs_N_k``); the latter is sum_{v in S_student} p(v) (log p(v) - log q(v)),
  the part of the exact reverse KL carried by the student's top-k (it tends to the full KL as S holds the mass).
- ``opd/student_shared_mass``, ``opd/teacher_shared_mass``: sum over the overlap of p, and of q.
- ``opd/student_topk_mass``, ``opd/teacher_topk_mass``: each side's mass on its own top-k.
- ``opd/entropy_gap`` = H(p) - H(q), plus ``opd/student_entropy`` and ``opd/teacher_entropy`` (nats).
- ``opd/reverse_kl_k1``: log p(y) - log q(y) at the sampled token, the unbiased k1 estimate of KL(p || q).

API
---
``opd_metrics(...) -> dict[str, float]``: one micro-batch, one host sync.
``opd_metric_totals(...) -> MetricTotals``: sums and counts, to add over micro-batches (``a + b``) and
all-reduce across processes (``sums_M``, ``counts_M``) before ``.means()``. Keys whose count is 0 (e.g. no
overlap token at all) are left out of ``.means()`` rather than reported as NaN or a misleading 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from student_trainer.opd.losses import TEACHER_LOGPROB_FLOOR, student_topk_advantages


@dataclass
class MetricTotals:
    """Sums and counts per metric, float64 on the inputs' device. ``names[i]`` belongs to row i."""

    names: tuple[str, ...]
    sums_M: torch.Tensor  # (M,)
    counts_M: torch.Tensor  # (M,)
    peak_names: tuple[str, ...] = ()  # maxima (combined with max, all-reduced with max)
    peaks_P: torch.Tensor | None = None  # (P,)

    def __add__(self, other: MetricTotals) -> MetricTotals:
        if self.names != other.names or self.peak_names != other.peak_names:
            raise ValueError(f"cannot add metric totals with different keys: {self.names} vs {other.names}")
        peaks = None if self.peaks_P is None else torch.maximum(self.peaks_P, other.peaks_P)
        return MetricTotals(
            self.names, self.sums_M + other.sums_M, self.counts_M + other.counts_M, self.peak_names, peaks
        )

    def join(self, other: MetricTotals) -> MetricTotals:
        """Both sets of keys in one (the keys must differ)."""
        if set(self.names) & set(other.names) or set(self.peak_names) & set(other.peak_names):
            raise ValueError(f"cannot join metric totals sharing keys: {self.names} and {other.names}")
        peaks = [p for p in (self.peaks_P, other.peaks_P) if p is not None]
        return MetricTotals(
            self.names + other.names,
            torch.cat([self.sums_M, other.sums_M.to(self.sums_M.device)]),
            torch.cat([self.counts_M, other.counts_M.to(self.counts_M.device)]),
            self.peak_names + other.peak_names,
            torch.cat([p.to(self.sums_M.device) for p in peaks]) if peaks else None,
        )

    def means(self) -> dict[str, float]:
        """sum / count per key (keys with count 0 are omitted), and the peaks; one device-to-host copy."""
        sums, counts = self.sums_M.tolist(), self.counts_M.tolist()
        out = {n: s / c for n, s, c in zip(self.names, sums, counts, strict=True) if c > 0}
        if self.peaks_P is not None:
            out.update(zip(self.peak_names, self.peaks_P.tolist(), strict=True))
        return out


def _select(x: torch.Tensor | None, keep_N: torch.Tensor | None, name: str, n: int) -> torch.Tensor | None:
    if x is None:
        return None
    if x.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows (the number of tokens), got shape {tuple(x.shape)}")
    return x if keep_N is None else x[keep_N]


def _argmax_id(ids_N_k: torch.Tensor, logprobs_N_k: torch.Tensor) -> torch.Tensor:
    """(N,) the id of each row's most likely slot (no assumption that the top-k lists are sorted)."""
    return ids_N_k.gather(1, logprobs_N_k.argmax(-1, keepdim=True)).squeeze(1)


def opd_metric_totals(
    *,
    student_topk_ids_N_k: torch.Tensor,
    student_topk_logprobs_N_k: torch.Tensor,
    teacher_topk_ids_N_k: torch.Tensor,
    teacher_topk_logprobs_N_k: torch.Tensor,
    mask_N: torch.Tensor | None = None,
    student_logprob_N: torch.Tensor | None = None,
    teacher_logprob_N: torch.Tensor | None = None,
    teacher_candidate_logprobs_N_k: torch.Tensor | None = None,
    student_entropy_N: torch.Tensor | None = None,
    teacher_entropy_N: torch.Tensor | None = None,
    teacher_logprob_floor: float = TEACHER_LOGPROB_FLOOR,
) -> MetricTotals:
    """Sums and counts of the OPD metrics over the unmasked tokens (nothing here carries a gradient).

    Args:
        student_topk_ids_N_k / student_topk_logprobs_N_k: (N, k) the student's top-k ids and full-vocab
            log-probs (from the rollout pass, or ``chunked.gather_logprobs(top_k=k)``).
        teacher_topk_ids_N_k / teacher_topk_logprobs_N_k: (N, k) the teacher's own top-k (same k).
        mask_N: (N,) response-token mask; None = all tokens.
        student_logprob_N / teacher_logprob_N: (N,) both sides' log-prob of the sampled token -> k1 KL.
        teacher_candidate_logprobs_N_k: (N, k) teacher log-probs at the student's top-k ids -> the
            non-overlap advantage and the top-k KL estimate.
        student_entropy_N / teacher_entropy_N: (N,) H(p) and H(q) in nats -> the entropy gap.
        teacher_logprob_floor: teacher log-probs are floored as in the losses, so -inf stays finite.
    Returns:
        :class:`MetricTotals`.
    """
    n, k = student_topk_ids_N_k.shape
    if teacher_topk_ids_N_k.shape != (n, k):
        raise ValueError(
            f"teacher_topk_ids_N_k shape {tuple(teacher_topk_ids_N_k.shape)} must equal the student's "
            f"{(n, k)}: the overlap ratio |S_s ∩ S_t| / k needs the same k on both sides"
        )
    keep = None if mask_N is None else _select(mask_N, None, "mask_N", n).bool()
    s_ids = _select(student_topk_ids_N_k, keep, "student_topk_ids_N_k", n)
    t_ids = _select(teacher_topk_ids_N_k, keep, "teacher_topk_ids_N_k", n)
    s_lp = _select(student_topk_logprobs_N_k, keep, "student_topk_logprobs_N_k", n).detach().double()
    t_lp = _select(teacher_topk_logprobs_N_k, keep, "teacher_topk_logprobs_N_k", n).detach().double()
    t_lp = t_lp.clamp_min(teacher_logprob_floor)
    tokens = torch.tensor(float(s_ids.shape[0]), dtype=torch.float64, device=s_lp.device)

    # match_N_k_k[t, i, j]: student slot i holds the id of teacher slot j
    match_N_k_k = s_ids[:, :, None] == t_ids[:, None, :]
    s_in_overlap = match_N_k_k.any(-1)  # (N, k) student slots whose id is in the teacher's top-k
    t_in_overlap = match_N_k_k.any(-2)  # (N, k) teacher slots whose id is in the student's top-k
    p, q = s_lp.exp(), t_lp.exp()
    zero = torch.zeros((), dtype=torch.float64, device=s_lp.device)

    cand = _select(teacher_candidate_logprobs_N_k, keep, "teacher_candidate_logprobs_N_k", n)
    if cand is not None:
        logq_at_s = cand.detach().double().clamp_min(teacher_logprob_floor)
    else:  # the overlap ids are in the teacher's top-k, so its list gives log q there; other slots unused
        logq_at_s = torch.where(match_N_k_k, t_lp[:, None, :], zero).sum(-1)
    adv = student_topk_advantages(s_lp, logq_at_s, teacher_logprob_floor)

    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "opd/overlap_ratio": (s_in_overlap.sum().double() / k, tokens),
        # top-1 agreement (the overlap ratio at k = 1): still informative when k covers the whole
        # vocabulary, where the top-k overlap is identically 1 (the mini-lab's 16-token world)
        "opd/overlap_top1": ((_argmax_id(s_ids, s_lp) == _argmax_id(t_ids, t_lp)).sum().double(), tokens),
        "opd/overlap_advantage": (torch.where(s_in_overlap, adv, zero).sum(), s_in_overlap.sum()),
        "opd/student_shared_mass": (torch.where(s_in_overlap, p, zero).sum(), tokens),
        "opd/teacher_shared_mass": (torch.where(t_in_overlap, q, zero).sum(), tokens),
        "opd/student_topk_mass": (p.sum(), tokens),
        "opd/teacher_topk_mass": (q.sum(), tokens),
    }
    if cand is not None:
        rows["opd/nonoverlap_advantage"] = (torch.where(s_in_overlap, zero, adv).sum(), (~s_in_overlap).sum())
        rows["opd/reverse_kl_topk"] = ((p * (s_lp - logq_at_s)).sum(), tokens)
    if (student_logprob_N is None) != (teacher_logprob_N is None):
        raise ValueError("give both student_logprob_N and teacher_logprob_N (for the k1 KL), or neither")
    if student_logprob_N is not None:
        lp_s = _select(student_logprob_N, keep, "student_logprob_N", n).detach().double()
        lp_t = _select(teacher_logprob_N, keep, "teacher_logprob_N", n).detach().double()
        rows["opd/reverse_kl_k1"] = ((lp_s - lp_t.clamp_min(teacher_logprob_floor)).sum(), tokens)
    h_s = _select(student_entropy_N, keep, "student_entropy_N", n)
    h_t = _select(teacher_entropy_N, keep, "teacher_entropy_N", n)
    if h_s is not None:
        rows["opd/student_entropy"] = (h_s.detach().double().sum(), tokens)
    if h_t is not None:
        rows["opd/teacher_entropy"] = (h_t.detach().double().sum(), tokens)
    if h_s is not None and h_t is not None:
        rows["opd/entropy_gap"] = ((h_s.detach().double() - h_t.detach().double()).sum(), tokens)

    names = tuple(rows)
    sums = torch.stack([rows[m][0].double() for m in names])
    counts = torch.stack([rows[m][1].double() for m in names])
    return MetricTotals(names, sums, counts)


def opd_metrics(**kwargs) -> dict[str, float]:
    """Means of :func:`opd_metric_totals` (same keyword arguments): ``{"opd/overlap_ratio": 0.81, ...}``."""
    return opd_metric_totals(**kwargs).means()
