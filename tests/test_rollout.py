"""Rollouts from the tiny student (real from_pretrained, real generate): every recorded number is checked
against a separate teacher-forced forward of the same model on each unpadded prompt + completion."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from devkit.tiny_models import build_tiny_pair
from student_trainer.rollout.hf import HFRolloutEngine, RolloutSample, left_pad

TOL = dict(atol=1e-4, rtol=0.0)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    _, path = build_tiny_pair(tmp_path_factory.mktemp("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(student):
    _, tok = student
    texts = ["What is 12 + 30?", "Compute 7 * 8. First multiply, then check the", "Let", "the answer is"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in ids}) > 2, "prompts of different lengths exercise left padding"
    return ids


def reference_logprobs(
    model, prompt: list[int], completion: list[int], vocab_limit: int | None = None, temperature: float = 1.0
):
    """(T, V) full-vocab log_softmax(logits / temperature) of a teacher-forced forward on one unpadded
    sequence: the distribution the engine samples from (before top-p) and records."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    if vocab_limit is not None:
        rows = rows[:, :vocab_limit]
    return (rows / temperature).log_softmax(-1)


def check_against_reference(
    model, s: RolloutSample, vocab_limit: int | None = None, temperature: float = 1.0
) -> None:
    comp = s.completion_ids.tolist()
    ref_T_V = reference_logprobs(model, s.prompt_ids.tolist(), comp, vocab_limit, temperature)
    k = s.topk_ids.shape[1]
    assert s.topk_ids.shape == (len(comp), k) and s.topk_logprobs.shape == (len(comp), k)
    torch.testing.assert_close(s.topk_logprobs, ref_T_V.topk(k, dim=-1).values, **TOL)
    # the stored ids are a top-k of the reference (robust to exact ties in the ordering)
    torch.testing.assert_close(ref_T_V.gather(-1, s.topk_ids), s.topk_logprobs, **TOL)
    torch.testing.assert_close(ref_T_V.gather(-1, s.completion_ids[:, None])[:, 0], s.sampled_logprobs, **TOL)


def test_recorded_topk_matches_teacher_forced_forward_with_padding_eos_and_groups(student, prompts):
    model, tok = student
    eos = [tok.eos_token_id, *range(100, 160)]  # ~6% stop chance per step: a mix of finished and cut rows
    engine = HFRolloutEngine(model, tok, eos_token_ids=eos)
    batch = engine.generate(
        prompts, n=3, temperature=0.8, top_p=0.9, max_new_tokens=12, top_k_record=8, seed=3
    )
    assert [(s.prompt_index, s.sample_index) for s in batch.samples] == [
        (i, j) for i in range(4) for j in range(3)
    ]
    assert batch.n == 3 and batch.top_k == 8 and batch.policy_version == 0
    finished = [s.finished for s in batch.samples]
    assert any(finished) and not all(finished), finished
    for s in batch.samples:
        assert s.prompt_ids.tolist() == prompts[s.prompt_index]
        comp = s.completion_ids.tolist()
        if s.finished:  # stops at the first EOS, which is included
            assert comp[-1] in eos and not set(comp[:-1]) & set(eos)
        else:
            assert len(comp) == 12 and not set(comp) & set(eos)
        check_against_reference(model, s, temperature=0.8)  # the tempered distribution, before top-p
        with pytest.raises(AssertionError):  # not the raw one
            check_against_reference(model, s)
    assert batch.num_tokens == sum(len(s.completion_ids) for s in batch.samples)
    assert batch.eos_rate == pytest.approx(sum(finished) / 12)


def test_left_padded_batch_equals_single_prompts(student, prompts):
    model, tok = student
    engine = HFRolloutEngine(model, tok, prompt_pad_multiple=8)
    together = engine.generate(prompts, temperature=0, max_new_tokens=10, top_k_record=4).samples
    for i, p in enumerate(prompts):
        (alone,) = engine.generate([p], temperature=0, max_new_tokens=10, top_k_record=4).samples
        assert together[i].completion_ids.tolist() == alone.completion_ids.tolist()
        torch.testing.assert_close(together[i].topk_logprobs, alone.topk_logprobs, **TOL)
        torch.testing.assert_close(together[i].sampled_logprobs, alone.sampled_logprobs, **TOL)


def test_greedy_follows_argmax_and_ignores_model_generation_config(student, prompts):
    model, tok = student
    saved = model.generation_config
    # a Hub-style preset that would change sampling if generate applied it: the rollout must ignore it
    model.generation_config = saved.__class__(**saved.to_dict())
    model.generation_config.update(repetition_penalty=5.0, top_k=1, temperature=0.3, no_repeat_ngram_size=2)
    engine = HFRolloutEngine(model, tok)
    try:
        greedy = engine.generate(prompts, temperature=0, max_new_tokens=10, top_k_record=3)
        sampled = engine.generate(prompts[:1], n=6, temperature=1.0, max_new_tokens=4, seed=0)
    finally:
        restored = model.generation_config
        model.generation_config = saved
    assert restored.repetition_penalty == 5.0  # the model's own config is put back after the call
    for s in greedy.samples:
        ref = reference_logprobs(model, s.prompt_ids.tolist(), s.completion_ids.tolist())
        assert s.completion_ids.tolist() == ref.argmax(-1).tolist()
        assert s.topk_ids[:, 0].tolist() == s.completion_ids.tolist()
        check_against_reference(model, s)
    # top_k=1 from the model's config would make all six samples identical
    assert len({tuple(s.completion_ids.tolist()) for s in sampled.samples}) > 1


def _warped_probs(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Brute-force sampling distribution: softmax(logits / T), then keep the smallest top set with mass >= top_p."""
    probs = (logits_V / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    keep = order[: int((cum < top_p).sum()) + 1]
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 0.8)])
def test_first_token_is_sampled_from_the_configured_distribution(student, prompts, temperature, top_p):
    """E[log p(x)] over many first tokens equals its exact value under the warped distribution (4 SE)."""
    model, tok = student
    engine = HFRolloutEngine(model, tok)
    n = 3000
    batch = engine.generate(prompts[:1], n=n, temperature=temperature, top_p=top_p, max_new_tokens=1, seed=11)
    with torch.no_grad():
        logits_V = model(torch.tensor([prompts[0]])).logits[0, -1].float()
    logp_V = (logits_V / temperature).log_softmax(-1)  # what the engine records: tempered, before top-p
    q_V = _warped_probs(logits_V, temperature, top_p)
    support = q_V > 0
    mean = float((q_V[support] * logp_V[support]).sum())
    sd = math.sqrt(float((q_V[support] * (logp_V[support] - mean) ** 2).sum()))
    got_V = torch.stack([s.sampled_logprobs[0] for s in batch.samples])
    first = torch.stack([s.completion_ids[0] for s in batch.samples])
    assert bool(support[first].all()), "a token outside the top-p nucleus was sampled"
    assert abs(float(got_V.mean()) - mean) < 4 * sd / math.sqrt(n), (float(got_V.mean()), mean, sd)


def test_seeded_rollouts_are_reproducible_and_leave_global_rng_alone(student, prompts):
    model, tok = student
    engine = HFRolloutEngine(model, tok)

    def run(seed):
        b = engine.generate(prompts, n=2, max_new_tokens=8, top_k_record=2, seed=seed)
        return [s.completion_ids.tolist() for s in b.samples]

    torch.manual_seed(123)
    a = run(5)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after), "a seeded rollout must not advance the caller's RNG"
    assert run(5) == a
    assert run(6) != a


def test_batch_size_chunks_and_static_cache_give_the_same_rollouts(student, prompts):
    model, tok = student
    kwargs = dict(n=2, temperature=0, max_new_tokens=8, top_k_record=4)
    base = HFRolloutEngine(model, tok).generate(prompts, **kwargs).samples
    for engine in (
        HFRolloutEngine(model, tok, batch_size=3, cache_implementation="dynamic"),
        HFRolloutEngine(model, tok, cache_implementation="static", prompt_pad_multiple=16),
    ):
        other = engine.generate(prompts, **kwargs).samples
        assert [s.completion_ids.tolist() for s in other] == [s.completion_ids.tolist() for s in base]
        for x, y in zip(other, base, strict=True):
            torch.testing.assert_close(x.topk_logprobs, y.topk_logprobs, **TOL)


def test_vocab_limit_masks_padded_rows(student, prompts):
    model, tok = student
    limit = 600
    batch = HFRolloutEngine(model, tok, vocab_limit=limit).generate(
        prompts, n=2, max_new_tokens=6, top_k_record=5, seed=1
    )
    for s in batch.samples:
        assert int(s.completion_ids.max()) < limit and int(s.topk_ids.max()) < limit
        check_against_reference(model, s, vocab_limit=limit)


def test_k_zero_records_only_sampled_logprobs(student, prompts):
    model, tok = student
    (s,) = HFRolloutEngine(model, tok).generate(prompts[:1], max_new_tokens=5, top_k_record=0, seed=0).samples
    assert s.topk_ids.shape == (5, 0) and s.topk_logprobs.shape == (5, 0)
    check_against_reference(model, s)


def test_mode_policy_version_and_bad_arguments(student, prompts):
    model, tok = student
    engine = HFRolloutEngine(model, tok)
    model.train()
    try:
        engine.generate(prompts[:1], max_new_tokens=2, seed=0)
        assert model.training, "the caller's train mode is restored"
    finally:
        model.eval()
    engine.sync_weights(model)
    engine.sync_weights(model)
    assert engine.generate(prompts[:1], max_new_tokens=1, seed=0).policy_version == 2
    for bad, match in (
        (dict(n=0), "n=0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(top_k_record=-1), "top_k_record=-1"),
    ):
        with pytest.raises(ValueError, match=match):
            engine.generate(prompts[:1], **bad)
    with pytest.raises(ValueError, match="non-empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="max_position_embeddings is 2048"):
        engine.generate([[5] * 2048])
    with pytest.raises(ValueError, match="top_k_record=2000 exceeds the vocabulary"):
        engine.generate(prompts[:1], top_k_record=2000)
    with pytest.raises(ValueError, match="cache_implementation"):
        HFRolloutEngine(model, tok, cache_implementation="paged")
    with pytest.raises(ValueError, match=r"vocab_limit=5000 must be in \[1, 1024\]"):
        HFRolloutEngine(model, tok, vocab_limit=5000)


def test_left_pad_layout():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0, multiple=4)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
