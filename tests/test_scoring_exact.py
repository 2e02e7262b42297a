"""The transformers backend's numbers equal a plain transformers forward + log_softmax (fp32, 1e-5).

Runs the backend in-process (its `score_batch`, the same code the server's micro-batcher calls) against an
independent reference: one unpadded forward per sequence through `AutoModelForCausalLM`, full fp32
log_softmax over the vocabulary, explicit indexing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.protocol import ScoreOptions
from teacher_server.backends.hf import HFBackend
from teacher_server.backends.hf_scoring import chunked_head_scores
from teacher_server.config import ServerConfig
from teacher_server.jobs import ScoreJob

ATOL = 1e-5


@pytest.fixture(scope="module")
def backend(tiny_pair):
    b = HFBackend(ServerConfig(model=str(tiny_pair[0]), max_top_k=1024, logits_chunk_mib=1))
    b._load_sync()
    return b


@pytest.fixture(scope="module")
def reference(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(prompt, completion, temperature=1.0):
        ids = torch.tensor([list(prompt) + list(completion)])
        logits = model(ids).logits[0].float() / temperature
        lp = logits.log_softmax(-1)
        return lp[len(prompt) - 1 : len(prompt) - 1 + len(completion)]  # row t predicts completion[t]

    return logprobs


def _job(prompt, completion, k=16, candidate_ids=None, want_entropy=False, temperature=1.0):
    options = ScoreOptions(top_k=k, return_entropy=want_entropy, temperature=temperature)
    return ScoreJob(np.asarray(prompt, np.int64), np.asarray(completion, np.int64), options, candidate_ids)


def _check(res, ref_T_V, completion, k):
    t = len(completion)
    np.testing.assert_allclose(res.logprobs, ref_T_V[torch.arange(t), torch.tensor(completion)], atol=ATOL)
    ref_top = ref_T_V.topk(k, dim=-1) if k else None
    assert res.topk_ids.shape == (t, k) and res.topk_logprobs.shape == (t, k)
    if k:
        np.testing.assert_allclose(res.topk_logprobs, ref_top.values, atol=ATOL)
        # ids may differ only where log-probs tie; compare the log-probs at the returned ids instead
        np.testing.assert_allclose(
            ref_T_V.gather(1, torch.from_numpy(res.topk_ids).long()), ref_top.values, atol=ATOL
        )


def test_mixed_length_batch_with_padding(backend, reference):
    rng = np.random.default_rng(0)
    seqs = [
        (rng.integers(0, 1024, p), rng.integers(0, 1024, t)) for p, t in [(1, 9), (30, 4), (7, 40), (2, 1)]
    ]
    results = backend.score_batch([_job(p, c) for p, c in seqs])
    for (p, c), res in zip(seqs, results, strict=True):
        _check(res, reference(p, c), c, 16)


def test_sampled_token_outside_topk(backend, reference):
    prompt = [5, 6, 7]
    ref = reference(prompt, [0] * 6)
    worst = ref.argmin(-1).tolist()  # the least likely token at each position: never in the top-16
    res = backend.score_batch([_job(prompt, worst)])[0]
    _check(res, reference(prompt, worst), worst, 16)
    assert not any(w in row for w, row in zip(worst, res.topk_ids.tolist(), strict=True))


@pytest.mark.parametrize("k", [0, 1, 1024])
def test_k_zero_one_and_max(backend, reference, k):
    prompt, comp = [11], [12, 13, 14, 15]
    res = backend.score_batch([_job(prompt, comp, k=k)])[0]
    _check(res, reference(prompt, comp), comp, k)
    if k == 1024:  # k = whole vocabulary: top-k log-probs sum to one
        np.testing.assert_allclose(np.exp(res.topk_logprobs).sum(-1), 1.0, atol=1e-4)


def test_candidates_entropy_and_temperature(backend, reference):
    prompt, comp = [3, 4, 5, 6], [7, 8, 9]
    cands = np.array([[0, 1, 2], [1023, 5, 5], [8, 9, 10]])
    res = backend.score_batch([_job(prompt, comp, candidate_ids=cands, want_entropy=True, temperature=0.7)])[
        0
    ]
    ref = reference(prompt, comp, temperature=0.7)
    np.testing.assert_allclose(res.candidate_logprobs, ref.gather(1, torch.from_numpy(cands)), atol=ATOL)
    entropy = -(ref.exp() * ref).sum(-1)
    np.testing.assert_allclose(res.entropy, entropy, atol=ATOL)
    _check(res, ref, comp, 16)


def test_chunking_does_not_change_results():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden, targets = torch.randn(37, 8), torch.randint(0, 50, (37,))
    cands = torch.randint(0, 50, (37, 4))
    whole = chunked_head_scores(hidden, head, targets, 5, cands, 1.3, True, chunk_rows=1000)
    parts = chunked_head_scores(hidden, head, targets, 5, cands, 1.3, True, chunk_rows=4)
    for name in ("logprobs", "topk_logprobs", "candidate_logprobs", "entropy"):
        torch.testing.assert_close(getattr(whole, name), getattr(parts, name))
    assert torch.equal(whole.topk_ids, parts.topk_ids)
