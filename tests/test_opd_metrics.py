"""OPD metrics vs brute-force Python set computations per token (no vectorisation in the reference)."""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.opd.losses import TEACHER_LOGPROB_FLOOR
from student_trainer.opd.metrics import MetricTotals, opd_metric_totals, opd_metrics

N, V, K = 12, 30, 5


def _case(seed: int = 0, noise: float = 1.0):
    """Full-vocab distributions of both sides, each side's top-K, sampled ids, entropies and a mask."""
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    lp_s = torch.log_softmax(z_s, -1)
    lp_t = torch.log_softmax(z_s + noise * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    s_top, t_top = lp_s.topk(K, -1), lp_t.topk(K, -1)
    y = torch.multinomial(lp_s.exp(), 1, generator=g).squeeze(1)
    mask = torch.ones(N, dtype=torch.bool)
    mask[[2, 7]] = False
    inputs = dict(
        student_topk_ids_N_k=s_top.indices,
        student_topk_logprobs_N_k=s_top.values,
        teacher_topk_ids_N_k=t_top.indices,
        teacher_topk_logprobs_N_k=t_top.values,
        mask_N=mask,
        student_logprob_N=lp_s.gather(1, y[:, None]).squeeze(1),
        teacher_logprob_N=lp_t.gather(1, y[:, None]).squeeze(1),
        teacher_candidate_logprobs_N_k=lp_t.gather(1, s_top.indices),
        student_entropy_N=-(lp_s.exp() * lp_s).sum(-1),
        teacher_entropy_N=-(lp_t.exp() * lp_t).sum(-1),
    )
    return inputs, lp_s, lp_t, y


def brute_force(
    lp_s: torch.Tensor, lp_t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Per token: Python sets of top-K ids, dictionaries of probabilities, explicit sums."""
    acc: dict[str, list[float]] = {}
    overlap_adv, nonoverlap_adv = [], []
    for t in range(N):
        if not mask[t]:
            continue
        p = {v: math.exp(lp_s[t, v].item()) for v in range(V)}
        q = {v: math.exp(lp_t[t, v].item()) for v in range(V)}
        s_set = set(sorted(p, key=p.get, reverse=True)[:K])
        t_set = set(sorted(q, key=q.get, reverse=True)[:K])
        shared = s_set & t_set
        z = sum(p[v] for v in s_set)
        for v in s_set:
            a = -(p[v] / z) * (math.log(p[v]) - math.log(q[v]))
            (overlap_adv if v in shared else nonoverlap_adv).append(a)
        h_s = -sum(x * math.log(x) for x in p.values())
        h_t = -sum(x * math.log(x) for x in q.values())
        row = {
            "opd/overlap_ratio": len(shared) / K,
            "opd/overlap_top1": float(max(p, key=p.get) == max(q, key=q.get)),
            "opd/student_shared_mass": sum(p[v] for v in shared),
            "opd/teacher_shared_mass": sum(q[v] for v in shared),
            "opd/student_topk_mass": z,
            "opd/teacher_topk_mass": sum(q[v] for v in t_set),
            "opd/reverse_kl_topk": sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in s_set),
            "opd/reverse_kl_k1": math.log(p[int(y[t])]) - math.log(q[int(y[t])]),
            "opd/student_entropy": h_s,
            "opd/teacher_entropy": h_t,
            "opd/entropy_gap": h_s - h_t,
        }
        for key, value in row.items():
            acc.setdefault(key, []).append(value)
    out = {key: sum(vals) / len(vals) for key, vals in acc.items()}
    if overlap_adv:
        out["opd/overlap_advantage"] = sum(overlap_adv) / len(overlap_adv)
    if nonoverlap_adv:
        out["opd/nonoverlap_advantage"] = sum(nonoverlap_adv) / len(nonoverlap_adv)
    return out


def test_metrics_match_brute_force_set_computation():
    inputs, lp_s, lp_t, y = _case()
    got = opd_metrics(**inputs)
    want = brute_force(lp_s, lp_t, y, inputs["mask_N"])
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert 0 < got["opd/overlap_ratio"] < 1  # the case really has partial overlaps


def test_overlap_advantage_needs_no_candidates():
    """Overlap ids are in the teacher's top-k, so its own list gives log q there."""
    inputs, *_ = _case(seed=1)
    with_cand = opd_metrics(**inputs)
    inputs.pop("teacher_candidate_logprobs_N_k")
    without = opd_metrics(**inputs)
    assert without["opd/overlap_advantage"] == pytest.approx(with_cand["opd/overlap_advantage"], rel=1e-12)
    assert "opd/nonoverlap_advantage" not in without and "opd/reverse_kl_topk" not in without


def test_identical_sides_give_full_overlap_zero_advantage_zero_gaps():
    inputs, lp_s, _, y = _case(seed=2, noise=0.0)
    got = opd_metrics(**inputs)
    assert got["opd/overlap_ratio"] == 1.0
    assert got["opd/overlap_advantage"] == 0.0
    assert abs(got["opd/entropy_gap"]) < 1e-12 and abs(got["opd/reverse_kl_k1"]) < 1e-12
    assert got["opd/student_shared_mass"] == pytest.approx(got["opd/teacher_shared_mass"], rel=1e-12)
    assert "opd/nonoverlap_advantage" not in got  # no non-overlap slot at all: left out, not NaN


def test_masked_rows_are_ignored_even_with_garbage():
    inputs, lp_s, lp_t, y = _case(seed=3)
    clean = opd_metrics(**inputs)
    for key in ("student_topk_logprobs_N_k", "teacher_topk_logprobs_N_k", "teacher_candidate_logprobs_N_k"):
        inputs[key] = inputs[key].clone()
        inputs[key][2] = float("nan")
    inputs["teacher_logprob_N"] = inputs["teacher_logprob_N"].clone()
    inputs["teacher_logprob_N"][7] = float("-inf")
    assert opd_metrics(**inputs) == pytest.approx(clean, rel=1e-12)


def test_totals_add_over_micro_batches_like_one_batch():
    inputs, *_ = _case(seed=4)
    whole = opd_metric_totals(**inputs)
    halves = [opd_metric_totals(**{k: v[sl] for k, v in inputs.items()}) for sl in (slice(0, 5), slice(5, N))]
    summed = halves[0] + halves[1]
    assert isinstance(summed, MetricTotals) and summed.names == whole.names
    torch.testing.assert_close(summed.sums_M, whole.sums_M)
    torch.testing.assert_close(summed.counts_M, whole.counts_M)
    assert summed.means() == pytest.approx(whole.means(), rel=1e-12)


def test_minus_inf_teacher_logprobs_stay_finite():
    inputs, *_ = _case(seed=5)
    inputs["teacher_candidate_logprobs_N_k"] = inputs["teacher_candidate_logprobs_N_k"].clone()
    inputs["teacher_candidate_logprobs_N_k"][0, -1] = float("-inf")
    inputs["teacher_logprob_N"] = torch.full((N,), float("-inf"), dtype=torch.float64)
    got = opd_metrics(**inputs)
    assert all(math.isfinite(v) for v in got.values())
    assert got["opd/reverse_kl_k1"] == pytest.approx(
        (inputs["student_logprob_N"][inputs["mask_N"]] - TEACHER_LOGPROB_FLOOR).mean().item(), rel=1e-12
    )


def test_all_masked_leaves_out_every_key():
    inputs, *_ = _case(seed=6)
    inputs["mask_N"] = torch.zeros(N, dtype=torch.bool)
    assert opd_metrics(**inputs) == {}


def test_bad_inputs_name_the_field():
    inputs, *_ = _case()
    bad = dict(inputs, teacher_topk_ids_N_k=inputs["teacher_topk_ids_N_k"][:, :3])
    with pytest.raises(
        ValueError, match=r"teacher_topk_ids_N_k shape \(12, 3\) must equal the student's \(12, 5\)"
    ):
        opd_metrics(**bad)
    with pytest.raises(ValueError, match="give both student_logprob_N and teacher_logprob_N"):
        opd_metrics(**dict(inputs, teacher_logprob_N=None))
    with pytest.raises(ValueError, match=r"student_entropy_N must have 12 rows .* got shape \(11,\)"):
        opd_metrics(**dict(inputs, student_entropy_N=inputs["student_entropy_N"][:11]))
