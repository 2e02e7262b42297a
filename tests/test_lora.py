"""LoRA students (``model.lora``, ``student_trainer/opd/lora.py``): real peft on the tiny students through
from_pretrained, no mocks. Every adapter is perturbed first (peft starts B at 0, which would make the
adapted model equal to the base one and every check below pass vacuously), and each check compares against
peft's own ``merge_and_unload`` on a deep copy or against a fresh load from disk.

- ``merged_state_dict`` is peft's merge (to 1e-6), under the base model's names, and leaves the training
  model as it was;
- only the adapter trains, the output layer is not adapted, ties survive, unmergeable targets are refused;
- every engine (hf, shadow, vllm) samples with the log-probs of the merged model, before and after a sync;
- ``save_final``: the adapter reloads with peft and the merged directory without it, both reproducing the
  trained model's log-probs.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from student_trainer.errors import ConfigError
from student_trainer.opd.lora import (
    apply_lora,
    base_causal_lm,
    is_lora,
    load_saved,
    merged_state_dict,
    save_final,
)
from student_trainer.rollout.hf import HFRolloutEngine
from student_trainer.rollout.shadow import ShadowRolloutEngine

TOL = dict(atol=1e-4, rtol=0.0)
SETTINGS = dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
SAMPLING = dict(n=2, temperature=0.8, max_new_tokens=10, top_k_record=6, seed=3)
SEQ = torch.tensor([list(range(5, 45))])


def load(path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()  # as load_causal_lm leaves it
    return model


@pytest.fixture(scope="module")
def tied_path(tiny_pair, tmp_path_factory):
    """The tiny student with its output layer tied to the embeddings (as Qwen3-1.7B), saved and reloaded."""
    config = load(tiny_pair[1]).config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tied")
    Qwen3ForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_pair[1]).save_pretrained(out)
    return out


@pytest.fixture(params=["untied", "tied"])
def student_path(request, tiny_pair, tied_path):
    return tiny_pair[1] if request.param == "untied" else tied_path


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    return AutoTokenizer.from_pretrained(tiny_pair[1])


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["What is 12 + 30?", "Compute 7 * 8. First multiply, then check the", "Let"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def perturb(model, seed: int, scale: float = 0.3) -> None:
    """Move every adapter tensor (B too, which peft starts at 0), as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def lora_student(path, seed: int = 0, **settings) -> torch.nn.Module:
    model = apply_lora(load(path), {**SETTINGS, **settings})
    perturb(model, seed)
    return model


def peft_merged(model) -> torch.nn.Module:
    """peft's own merge, on a deep copy: the reference every merged weight is checked against."""
    return copy.deepcopy(model).merge_and_unload().eval()


def logprobs(model, ids=SEQ) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits[0].float().log_softmax(-1)
    model.train(was)
    return out


def check_samples(reference, batch, temperature: float) -> None:
    """Recorded top-k and sampled log-probs equal a plain forward of ``reference`` on each sequence."""
    assert batch.samples
    for s in batch.samples:
        seq = torch.cat([s.prompt_ids, s.completion_ids])[None]
        p, t = len(s.prompt_ids), len(s.completion_ids)
        with torch.no_grad():
            logits = reference(input_ids=seq).logits[0].float()
        ref_T_V = (logits / temperature).log_softmax(-1)[p - 1 : p - 1 + t]
        k = s.topk_ids.shape[1]
        torch.testing.assert_close(s.topk_logprobs, ref_T_V.topk(k, dim=-1).values, **TOL)
        torch.testing.assert_close(ref_T_V.gather(-1, s.topk_ids), s.topk_logprobs, **TOL)
        sampled = ref_T_V.gather(-1, s.completion_ids[:, None])[:, 0]
        torch.testing.assert_close(s.sampled_logprobs, sampled, **TOL)


def max_gap(a, b) -> float:
    return float((logprobs(a) - logprobs(b)).abs().max())


# ----------------------------------------------------------------------------------------- the wrapper
def test_only_the_adapter_trains_and_ties_survive(student_path, tiny_pair):
    plain = load(student_path)
    tied = plain.config.tie_word_embeddings
    base_logprobs = logprobs(plain)
    model = apply_lora(plain, SETTINGS)
    assert is_lora(model) and not is_lora(base_causal_lm(model)) and model.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert frozen and not any("lora_" in n for n in frozen)
    # every linear layer of the two decoder layers (q k v o gate up down), not the output layer
    assert len(trainable) == 2 * 2 * 7
    assert not any("lm_head" in n for n in trainable)
    base = base_causal_lm(model)
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == tied
    # B starts at 0: the wrapped model is the base model until the adapter moves
    torch.testing.assert_close(logprobs(model), base_logprobs, atol=1e-6, rtol=0)
    perturb(model, 0)
    assert max_gap(model, load(student_path)) > 0.1


def test_unmergeable_targets_are_refused(tiny_pair, tied_path):
    with pytest.raises(ConfigError, match="only linear layers"):
        apply_lora(load(tiny_pair[1]), {**SETTINGS, "target_modules": ["q_proj", "embed_tokens"]})
    with pytest.raises(ConfigError, match="tied to the input embeddings"):
        apply_lora(load(tied_path), {**SETTINGS, "target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ValueError, match="not found|matched no layer"):
        apply_lora(load(tiny_pair[1]), {**SETTINGS, "target_modules": ["no_such_layer"]})


# ------------------------------------------------------------------------------------- merged weights
def test_merged_state_dict_is_peft_merge_under_the_base_names(student_path):
    model = lora_student(student_path)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    merged = merged_state_dict(model)
    # the names from_pretrained gives (a tied output layer once, as in the checkpoint)
    assert list(merged) == [n for n, _ in load(student_path).named_parameters()]
    ref = peft_merged(model).state_dict()
    for n in merged:  # peft's merge up to fp32 rounding (one fused addmm vs matmul, scale, add: 0 measured)
        torch.testing.assert_close(merged[n], ref[n], atol=1e-6, rtol=0)
    # the adapted weights really differ from the base ones, the others are the model's own tensors
    base = base_causal_lm(model)
    q = "model.layers.0.self_attn.q_proj.weight"
    q_base = base.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight
    assert (merged[q] - q_base).abs().max() > 1e-2 and merged[q].data_ptr() != q_base.data_ptr()
    assert merged["model.embed_tokens.weight"].data_ptr() == base.get_input_embeddings().weight.data_ptr()
    # the training model is untouched: same values, same storage, still adapted and training
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[n], after[n]) for n in before)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert model.training and not any(m.merged for m in base.modules() if hasattr(m, "merged_adapters"))
    # a plain model: its own tensors as they are
    plain = load(student_path)
    own = merged_state_dict(plain)
    assert list(own) == [n for n, _ in plain.named_parameters()]
    assert all(own[n].data_ptr() == p.data_ptr() for n, p in plain.named_parameters())


# ------------------------------------------------------------------------------------------- engines
def test_hf_engine_samples_the_current_adapter(tiny_pair, tokenizer, prompts):
    # dropout > 0: sampling must run the adapter in eval mode, or the log-probs would not match
    model = lora_student(tiny_pair[1], dropout=0.1)
    engine = HFRolloutEngine(model, tokenizer)
    check_samples(peft_merged(model), engine.generate(prompts, **SAMPLING), SAMPLING["temperature"])
    assert model.training, "the training mode is restored"
    stale = peft_merged(model)
    perturb(model, 1)
    engine.sync_weights(model)
    assert engine.policy_version == 1 and max_gap(stale, model) > 0.1
    check_samples(peft_merged(model), engine.generate(prompts, **SAMPLING), SAMPLING["temperature"])


def test_shadow_engine_is_a_plain_model_holding_the_merged_weights(student_path, tokenizer, prompts):
    from peft.tuners.lora import LoraLayer

    model = lora_student(student_path)
    engine = ShadowRolloutEngine(model, tokenizer, "float32")
    shadow = engine.shadow
    assert not is_lora(shadow) and not any(isinstance(m, LoraLayer) for m in shadow.modules())
    assert [n for n, _ in shadow.named_parameters()] == [n for n, _ in load(student_path).named_parameters()]
    tied = shadow.config.tie_word_embeddings
    assert (shadow.get_output_embeddings().weight is shadow.get_input_embeddings().weight) == tied
    assert not any(p.requires_grad for p in shadow.parameters())
    check_samples(peft_merged(model), engine.generate(prompts, **SAMPLING), SAMPLING["temperature"])
    pointers = [p.data_ptr() for p in shadow.parameters()]
    perturb(model, 1)
    assert max_gap(shadow, model) > 0.1, "the shadow is a copy: stale until synced"
    engine.sync_weights(model)
    assert [p.data_ptr() for p in shadow.parameters()] == pointers, "refreshed in place"
    ref = peft_merged(model)
    for name, p in shadow.named_parameters():
        torch.testing.assert_close(p, ref.state_dict()[name], atol=1e-6, rtol=0, msg=name)
    check_samples(ref, engine.generate(prompts, **SAMPLING), SAMPLING["temperature"])
    with pytest.raises(ConfigError, match="differ from the one the shadow was built from"):
        engine.sync_weights(load(student_path).model)  # the decoder body alone: other names


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not importable")
def test_vllm_engine_samples_the_merged_weights(tiny_pair, tokenizer, prompts):
    from student_trainer.rollout.vllm import VLLMRolloutEngine

    model = lora_student(tiny_pair[1])  # adapted before the engine starts: the first push is merged too
    engine = VLLMRolloutEngine(
        model,
        tokenizer,
        model_dir=str(tiny_pair[1]),
        max_model_len=256,
        engine_kwargs={"kv_cache_memory_bytes": 64 * 2**20},
    )
    try:
        for step in range(2):
            ref = peft_merged(model)
            check_samples(ref, engine.generate(prompts, **SAMPLING), SAMPLING["temperature"])
            seq = SEQ[0].tolist()
            expected = logprobs(ref)[:-1].gather(1, SEQ[0, 1:, None])[:, 0]
            torch.testing.assert_close(engine.sequence_logprobs(seq), expected, **TOL)
            perturb(model, step + 1)
            stale = engine.sequence_logprobs(seq)
            assert (
                stale - logprobs(peft_merged(model))[:-1].gather(1, SEQ[0, 1:, None])[:, 0]
            ).abs().max() > 0.1
            engine.sync_weights(model)
            assert engine.policy_version == step + 1 and engine.last_sync_s > 0
        check_samples(peft_merged(model), engine.generate(prompts, **SAMPLING), SAMPLING["temperature"])
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------ saving
def test_save_final_adapter_reloads_with_peft(tiny_pair, tokenizer, tmp_path):
    from peft import PeftModel

    model = lora_student(tiny_pair[1])
    out = save_final(model, tokenizer, tmp_path / "adapter", merge=False)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files, "adapter only"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pair[1]), out)
    torch.testing.assert_close(logprobs(reloaded), logprobs(model), atol=1e-5, rtol=0)
    assert max_gap(reloaded, load(tiny_pair[1])) > 0.1, "the adapter was saved, not B = 0"
    torch.testing.assert_close(logprobs(load_saved(out)), logprobs(model), atol=1e-5, rtol=0)
    assert (
        AutoTokenizer.from_pretrained(out)("the answer")["input_ids"] == tokenizer("the answer")["input_ids"]
    )


def test_save_final_merged_loads_without_peft(student_path, tokenizer, tmp_path):
    model = lora_student(student_path)
    out = save_final(model, tokenizer, tmp_path / "merged", merge=True)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "adapter_config.json" not in files
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not is_lora(reloaded)
    tied = reloaded.config.tie_word_embeddings
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    # merged vs adapter-on-the-side forward: the same function, rounded differently (measured 2e-5)
    torch.testing.assert_close(logprobs(reloaded), logprobs(model), **TOL)
    assert max_gap(reloaded, load(student_path)) > 0.1
    # a plain (fully trained) model: the whole model, merge or not
    plain = save_final(load(student_path), tokenizer, tmp_path / "plain", merge=True)
    assert (plain / "model.safetensors").exists() and not (plain / "adapter_config.json").exists()
