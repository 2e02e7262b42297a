"""Tiny local models for tests, demos and benchmarks: no downloads, real Hugging Face loading paths.

A Qwen3-architecture causal LM with random weights and a real byte-level BPE tokenizer trained with
``tokenizers`` on a small built-in corpus, a ChatML chat template (Qwen's), saved with ``save_pretrained``
so everything downstream goes through ``from_pretrained`` (and vLLM). Deterministic for a given seed.
head_dim is at least 32 because vLLM's CPU attention refuses 16.

    python -m devkit.tiny_models OUT_DIR          # teacher/ and student/ sharing one tokenizer
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the a teacher student model token answer question problem number sum product step think first then "
    "therefore so we add subtract multiply divide equals result carry digit column left right total half "
    "double square root prime even odd value each all some many few more less is are was be of to in on "
    "for with by from and or not if when because let find compute check write final box show reason"
).split()


@dataclass(frozen=True)
class TinySpec:
    """Shape of one tiny Qwen3 model. Params ~ vocab * hidden * 2 + layers * 12 * hidden^2."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    initializer_range: float = 0.2  # larger than HF's 0.02 so random models have peaked, distinct outputs


TEACHER_SPEC = TinySpec(hidden_size=96, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=192)
STUDENT_SPEC = TinySpec()


def builtin_corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """A deterministic mix of arithmetic word problems, short reasoning and prose for BPE training."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        kind = i % 4
        if kind == 0:
            out.append(f"What is {a} + {b}? Let us add the digits. The answer is \\boxed{{{a + b}}}.")
        elif kind == 1:
            out.append(f"Compute {a} * {b}. First multiply, then check: {a} * {b} = {a * b}.")
        elif kind == 2:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))).capitalize() + ".")
        else:
            out.append(f"Question: if x = {a} and y = {b}, find x - y. Answer: {a - b}\n")
    return out


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """Train a byte-level BPE tokenizer on the built-in corpus; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(builtin_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(tokenizer, spec: TinySpec, seed: int, vocab_size: int | None = None):
    """A random-weight ``Qwen3ForCausalLM`` sized by ``spec``; ``vocab_size`` defaults to len(tokenizer)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float().eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(out_dir: str | Path, spec: TinySpec = STUDENT_SPEC, seed: int = 0, tokenizer=None) -> Path:
    """Build and ``save_pretrained`` one tiny model with its tokenizer; returns the directory."""
    out = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(seed=0)
    model = build_model(tokenizer, spec, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_pair(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """One call: ``out_dir/teacher`` and ``out_dir/student`` sharing one tokenizer. Skips if already built."""
    out = Path(out_dir)
    teacher, student = out / "teacher", out / "student"
    if (teacher / "config.json").exists() and (student / "config.json").exists():
        return teacher, student
    tokenizer = build_tokenizer(seed=0)
    save_tiny(teacher, TEACHER_SPEC, seed=seed + 1, tokenizer=tokenizer)
    save_tiny(student, STUDENT_SPEC, seed=seed + 2, tokenizer=tokenizer)
    return teacher, student


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="directory to create (teacher/ and student/ inside)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    teacher, student = build_tiny_pair(args.out_dir, seed=args.seed)
    print(f"teacher: {teacher}\nstudent: {student}")


if __name__ == "__main__":
    main()


# Real model shapes for benchmarks with random weights (config only, nothing downloaded). Values from the
# published Qwen3 configs.
QWEN3_SHAPES: dict[str, dict] = {
    "qwen3-1.7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
QWEN3_VOCAB = 151936


def save_shape_config(out_dir: str | Path, shape: str, tokenizer=None) -> Path:
    """Write ``config.json`` of a real Qwen3 shape plus the tiny tokenizer (no weights): serve it with
    ``teacher-server --load-format dummy`` or build it with ``AutoModelForCausalLM.from_config``."""
    from transformers import Qwen3Config

    if shape not in QWEN3_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(QWEN3_SHAPES)}")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB,
        max_position_embeddings=40960,
        rope_theta=1_000_000,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **QWEN3_SHAPES[shape],
    )
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
