"""The shadow rollout engine (``rollout.shadow_dtype``): the hf engine generating from a separate
low-precision copy of the fp32 master weights, refreshed in place after every optimizer step.

Tiny Qwen3 students through the real from_pretrained path. The bf16 tolerance: bf16 keeps 8 significant bits
(relative rounding 2^-9 per weight), and the tiny students have peaked logits (initializer range 0.2), so a
bf16 copy's top-16 log-probs differ from the fp32 master's by up to 0.12 on the sequences below (measured:
0.114 for the fresh copy, 0.08-0.12 after three different AdamW updates; 0.19 over the whole vocabulary).
BF16_TOL = 0.25 leaves 2x margin and is still 20x below what a stale copy shows after one update (4.4-5.9).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from devkit.tiny_models import build_tiny_pair
from student_trainer.config import load_config
from student_trainer.errors import ConfigError
from student_trainer.rollout import ENGINES, build_rollout_engine
from student_trainer.rollout.hf import HFRolloutEngine
from student_trainer.rollout.shadow import ShadowRolloutEngine

FP32_TOL = dict(atol=1e-5, rtol=0.0)
BF16_TOL = 0.25  # measured and justified in the module docstring
SAMPLING = dict(n=3, temperature=0.8, top_p=0.9, max_new_tokens=12, top_k_record=8, seed=3)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(pair):
    return AutoTokenizer.from_pretrained(pair[1])


def load_student(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tied_path(pair, tmp_path_factory):
    """The tiny student with its output layer tied to the embeddings (as Qwen3-1.7B), saved and reloaded."""
    model = load_student(pair[1])
    model.config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = Qwen3ForCausalLM(model.config)
    out = tmp_path_factory.mktemp("tied")
    tied.save_pretrained(out)
    AutoTokenizer.from_pretrained(pair[1]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["What is 12 + 30?", "Compute 7 * 8. First multiply, then check the", "Let", "the answer is"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def sequences(tokenizer):
    """Fixed sequences whose log-probs compare the shadow with the master."""
    texts = [
        "What is 12 + 30? Let us add the digits. The answer is 42",
        "Compute 7 * 8. First multiply, then check",
        "the a teacher student model token answer question problem number sum",
    ]
    return [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts]


def logprobs(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float().log_softmax(-1)


def topk_gap(master, shadow, sequences, k: int = 16) -> float:
    """max |log p_shadow - log p_master| over the master's top-k ids at every position of ``sequences``."""
    worst = 0.0
    for ids in sequences:
        ref, other = logprobs(master, ids), logprobs(shadow, ids)
        top = ref.topk(k, dim=-1)
        worst = max(worst, float((other.gather(-1, top.indices) - top.values).abs().max()))
    return worst


def adamw_update(model, lr: float = 2e-2, seed: int = 0) -> None:
    """One large optimizer step on a random batch: every weight moves by ~lr."""
    model.train()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (2, 24), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def pointers(module) -> list[int]:
    return [p.data_ptr() for p in module.parameters()]


def test_float32_shadow_samples_what_the_hf_engine_samples(pair, tokenizer, prompts):
    master = load_student(pair[1])
    eos = [tokenizer.eos_token_id, *range(100, 160)]  # finished and cut rows mixed
    ref = HFRolloutEngine(master, tokenizer, eos_token_ids=eos).generate(prompts, **SAMPLING)
    engine = ShadowRolloutEngine(master, tokenizer, "float32", eos_token_ids=eos)
    got = engine.generate(prompts, **SAMPLING)
    assert any(s.finished for s in got.samples) and not all(s.finished for s in got.samples)
    assert got.policy_version == 0 and got.n == 3 and got.top_k == 8
    for a, b in zip(got.samples, ref.samples, strict=True):
        assert (a.prompt_index, a.sample_index, a.finished) == (b.prompt_index, b.sample_index, b.finished)
        assert a.completion_ids.tolist() == b.completion_ids.tolist()
        assert a.topk_ids.tolist() == b.topk_ids.tolist()
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, **FP32_TOL)
        torch.testing.assert_close(a.sampled_logprobs, b.sampled_logprobs, **FP32_TOL)
    # a separate copy: no tensor shared, no gradients, eval mode; the master is left as it was
    shadow = engine.shadow
    assert shadow is not master and not set(pointers(shadow)) & set(pointers(master))
    assert not shadow.training and not any(p.requires_grad for p in shadow.parameters())
    assert all(p.requires_grad for p in master.parameters())
    assert all(p.dtype == torch.float32 for p in shadow.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shadow_is_refreshed_in_place_after_each_step(pair, tied_path, tokenizer, sequences, dtype):
    torch_dtype = getattr(torch, dtype)
    master = load_student(tied_path)
    assert master.get_output_embeddings().weight is master.get_input_embeddings().weight
    engine = ShadowRolloutEngine(master, tokenizer, dtype)
    shadow = engine.shadow
    assert shadow.get_output_embeddings().weight is shadow.get_input_embeddings().weight, "ties are kept"
    assert all(p.dtype == torch_dtype for p in shadow.parameters())
    # buffers keep their dtype (the rotary frequencies stay fp32, as under autocast)
    assert all(b.dtype == torch.float32 for b in shadow.buffers() if b.is_floating_point())
    ptrs = pointers(shadow)
    tol = 1e-5 if dtype == "float32" else BF16_TOL
    assert topk_gap(master, shadow, sequences) <= tol
    for step in range(2):
        adamw_update(master, seed=step)
        stale = topk_gap(master, shadow, sequences)
        assert stale > 1.0, f"the update should move the log-probs far beyond {tol}: {stale}"
        t0 = time.perf_counter()
        engine.sync_weights(master)
        assert time.perf_counter() - t0 < 1.0
        assert engine.policy_version == step + 1
        assert pointers(shadow) == ptrs, "sync copies into the same tensors, nothing is reallocated"
        assert shadow.get_output_embeddings().weight is shadow.get_input_embeddings().weight
        for (name, p), (_, q) in zip(master.named_parameters(), shadow.named_parameters(), strict=True):
            assert torch.equal(q, p.detach().to(torch_dtype)), name  # exactly the cast master
        synced = topk_gap(master, shadow, sequences)
        assert synced <= tol, (step, synced, stale)
    with pytest.raises(ConfigError, match="differ from the one the shadow was built from"):
        engine.sync_weights(torch.nn.Linear(2, 2))


def test_bf16_shadow_with_static_cache_under_autocast_through_build(pair, tokenizer, prompts):
    """CPU transformers runs the static cache (uncompiled). Under bf16 autocast with fp32 weights the plain
    engine fails inside the cache, which is why build() refuses that; the bf16 shadow turns autocast off."""
    master = load_student(pair[1])
    greedy = dict(n=2, temperature=0, max_new_tokens=8, top_k_record=4)
    overrides = ["rollout.static_cache=true", "rollout.shadow_dtype=bfloat16"]
    mixed = SimpleNamespace(mixed_precision="bf16")  # what the trainer's Accelerator says on a GPU
    with pytest.raises(ConfigError, match="rollout.shadow_dtype=bfloat16"):
        build_rollout_engine(load_config(None, overrides[:1]), master, tokenizer, mixed)
    plain = HFRolloutEngine(master, tokenizer, cache_implementation="static", prompt_pad_multiple=16)
    with (
        pytest.raises(RuntimeError, match="same dtype"),
        torch.no_grad(),
        torch.autocast("cpu", torch.bfloat16),
    ):
        plain.generate(prompts, **greedy)

    engine = build_rollout_engine(load_config(None, overrides), master, tokenizer, mixed)
    assert isinstance(engine, ShadowRolloutEngine) and engine.cache_implementation == "static"
    assert engine.shadow.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # as opd.step.sample calls it
        static = engine.generate(prompts, **greedy).samples
    dynamic = ShadowRolloutEngine(master, tokenizer, "bfloat16", prompt_pad_multiple=64)
    dynamic = dynamic.generate(prompts, **greedy).samples
    assert len(static) == 8 and all(len(s.completion_ids) == 8 or s.finished for s in static)
    for a, b in zip(static, dynamic, strict=True):
        assert a.completion_ids.tolist() == b.completion_ids.tolist()
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=0.05, rtol=0.0)
        # what was recorded is the bf16 shadow's distribution, close to the fp32 master's
        ids = torch.cat([a.prompt_ids, a.completion_ids])[None]
        p, t = len(a.prompt_ids), len(a.completion_ids)
        ref_T_V = logprobs(master, ids)[p - 1 : p - 1 + t]
        assert float((ref_T_V.gather(-1, a.topk_ids) - a.topk_logprobs).abs().max()) <= BF16_TOL
        assert a.topk_logprobs.dtype == torch.float32


def test_config_validation(monkeypatch):
    assert load_config(None, []).rollout.shadow_dtype is None
    for dtype in ("bfloat16", "float16", "float32"):
        assert load_config(None, [f"rollout.shadow_dtype={dtype}"]).rollout.shadow_dtype == dtype
    with pytest.raises(ConfigError, match=r"rollout.shadow_dtype='int8': use bfloat16"):
        load_config(None, ["rollout.shadow_dtype=int8"])
    monkeypatch.setitem(ENGINES, "other", "student_trainer.rollout.hf")
    with pytest.raises(ConfigError, match="option of the hf engine, not of rollout.engine=other"):
        load_config(None, ["rollout.engine=other", "rollout.shadow_dtype=bfloat16"])
    assert load_config(None, ["rollout.engine=other"]).rollout.engine == "other"
    with pytest.raises(ConfigError, match="shadow_dtype='int8'"):
        ShadowRolloutEngine(torch.nn.Linear(2, 2), None, "int8")


def test_opd_training_with_a_float32_shadow_matches_training_without(pair, tmp_path):
    """A few real OPD steps (in-process teacher): with an exact fp32 shadow every step's rollouts, loss and
    metrics equal the plain engine's, which holds only if the shadow is refreshed after every update; and
    after ``--resume`` (the checkpoint is loaded into the master after the shadow was built)."""
    from student_trainer.opd.trainer import OPDTrainer
    from student_trainer.tracking import read_jsonl

    teacher, student = pair
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {2 * i}?"}) + "\n" for i in range(16)))

    def run(out, *extra, steps=3, resume=False):
        base = {
            "model.student": student,
            "teacher.local": teacher,
            "data.path": data,
            "train.steps": steps,
            "train.prompts_per_step": 4,
            "train.micro_batch_prompts": 2,
            "rollout.max_new_tokens": 12,
            "optim.lr": 3e-2,  # large: a stale shadow would sample visibly different tokens at step 2
            "train.output_dir": tmp_path / out,
            "logging.progress_bar": "false",
            "logging.plot": "false",
            "train.sample_every": 0,
        }
        cfg = load_config(None, [f"{k}={v}" for k, v in base.items()] + list(extra))
        trainer = OPDTrainer(cfg, resume=resume)
        trainer.train()
        return trainer, read_jsonl(tmp_path / out / "metrics.jsonl")

    plain, rows = run("plain")
    shadowed, shadow_rows = run("shadow", "rollout.shadow_dtype=float32")
    assert isinstance(shadowed.engine, ShadowRolloutEngine) and type(plain.engine) is HFRolloutEngine
    assert shadowed.engine.policy_version == 3
    assert [r["step"] for r in shadow_rows] == [1, 2, 3]
    for a, b in zip(shadow_rows, rows, strict=True):
        for key in ("opd/loss", "opd/reverse_kl", "opd/overlap_ratio", "rollout/response_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert rows[0]["opd/loss"] != rows[2]["opd/loss"], "the weights did change between steps"

    # stopped after step 2 with a checkpoint at step 1, then resumed: steps 2 and 3 replay the same
    extra = ("rollout.shadow_dtype=float32", "train.save_every=1")
    run("resumed", *extra, steps=2)
    resumed, resumed_rows = run("resumed", *extra, resume=True)
    assert resumed.start_step == 1 and [r["step"] for r in resumed_rows] == [1, 2, 3]
    for a, b in zip(resumed_rows, rows, strict=True):
        assert a["opd/loss"] == pytest.approx(b["opd/loss"], abs=1e-5), a["step"]
