"""The tiny-model builder: real save/load paths, determinism, shared tokenizer, head_dim >= 32."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from devkit.tiny_models import STUDENT_SPEC, build_tiny_pair, build_tokenizer, save_tiny
from shared.fingerprint import tokenizer_fingerprint


def test_pair_shares_tokenizer_and_loads(tiny_pair):
    teacher, student = tiny_pair
    tt, ts = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    assert tokenizer_fingerprint(tt) == tokenizer_fingerprint(ts)
    assert tt.chat_template and "<|im_start|>assistant" in tt.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    for path in tiny_pair:
        cfg = AutoConfig.from_pretrained(path)
        assert cfg.model_type == "qwen3" and cfg.head_dim >= 32
        assert cfg.vocab_size == len(tt)
    assert (
        AutoConfig.from_pretrained(teacher).num_hidden_layers
        != AutoConfig.from_pretrained(student).num_hidden_layers
    )


def test_tokenizer_is_byte_level_bpe_roundtrip():
    tok = build_tokenizer()
    text = "What is 12 + 35? The answer is \\boxed{47}. ünïcödé ✓"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_deterministic_for_a_seed(tmp_path):
    a = save_tiny(tmp_path / "a", STUDENT_SPEC, seed=3)
    b = save_tiny(tmp_path / "b", STUDENT_SPEC, seed=3)
    c = save_tiny(tmp_path / "c", STUDENT_SPEC, seed=4)
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b, c))
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(ma.parameters(), mc.parameters(), strict=True))
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(a)) == tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(c)
    )


def test_build_pair_is_idempotent(tmp_path):
    first = build_tiny_pair(tmp_path)
    mtime = (first[0] / "model.safetensors").stat().st_mtime
    assert build_tiny_pair(tmp_path) == first
    assert (first[0] / "model.safetensors").stat().st_mtime == mtime
