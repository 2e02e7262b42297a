"""Rollouts with fp32 master weights on a GPU without vLLM: the hf engine (dynamic cache, bf16 autocast) vs
the bf16 shadow engine with the static cache (``rollout.shadow_dtype=bfloat16``, ``rollout.static_cache``).

    PYTHONPATH=. python3 bench/gpu_rollout_shadow.py            # H200: ~3 minutes (limit it to 5)
    PYTHONPATH=. python3 bench/gpu_rollout_shadow.py --smoke    # a tiny model on CPU: proves the script runs

A random-weight Qwen3-1.7B-shaped student (tied embeddings, as the real one), fp32 master weights as the
trainer holds them with ``model.dtype: auto``; batch 64 prompts of 112-128 tokens (padded to 128), 256 new
tokens, top-16 recorded. Both engines are called the way the trainer calls them (``opd.step.sample``: under
``torch.no_grad()`` and bf16 autocast). Each engine gets one full-size warm-up call first (the static cache
compiles its decode step there; the dynamic one grows the allocator), timed and reported separately, then
``--repeats`` timed calls (best kept). Then one shadow sync (a master -> bf16 copy of every parameter, as
after each optimizer step) is timed, and one more static call checks that a sync does not recompile.
Imports only torch, transformers, ``student_trainer.rollout`` and devkit's shape table (no vLLM, fastapi or pydantic).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.tiny_models import QWEN3_SHAPES, QWEN3_VOCAB  # noqa: E402 - config dicts only, no imports
from student_trainer.rollout.hf import HFRolloutEngine  # noqa: E402
from student_trainer.rollout.shadow import ShadowRolloutEngine  # noqa: E402

FULL = dict(
    shape=dict(
        **QWEN3_SHAPES["qwen3-1.7b"],
        vocab_size=QWEN3_VOCAB,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
    ),
    tokens=151669,  # Qwen's tokenizer: the output layer's padded rows are masked (as rollout.hf.build does)
    eos=151645,
    pad=151643,
    batch=64,
    prompt=(112, 128),
    new_tokens=256,
)
SMOKE = dict(
    shape=dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    tokens=1000,
    eos=1001,
    pad=1002,
    batch=4,
    prompt=(12, 16),
    new_tokens=8,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def allocated(device: torch.device) -> float:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0.0


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def measure(name: str, engine, prompts, args, device: torch.device) -> dict:
    """Warm-up call (timed on its own), then the best of ``repeats`` timed calls, as the trainer calls it."""

    def call():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return engine.generate(prompts, max_new_tokens=args.new_tokens, top_k_record=16, seed=0)

    t_warm, _ = timed(call, device)
    best, tokens = float("inf"), 0
    reset_peak(device)
    for _ in range(args.repeats):
        t, batch = timed(call, device)
        if t < best:
            best, tokens = t, batch.num_tokens
    row = dict(
        name=name,
        warm_s=t_warm,
        s=best,
        tokens=tokens,
        tok_s=tokens / best,
        peak=gib(peak(device)),
        call=call,
    )
    print(
        f"  {name}: warm-up {t_warm:.1f} s, best of {args.repeats} {best:.2f} s, {tokens} tokens", flush=True
    )
    return row


def recorded_error(engine, master, batch, device: torch.device) -> tuple[float, float]:
    """max |recorded top-16 log-prob - teacher-forced| over 4 samples of ``batch``: vs the shadow's own
    forward, and vs the fp32 master's under bf16 autocast (how the trainer's loss forward computes)."""
    worst = [0.0, 0.0]
    for s in batch.samples[:4]:
        ids = torch.cat([s.prompt_ids, s.completion_ids])[None].to(device)
        p, t = len(s.prompt_ids), len(s.completion_ids)
        for i, (model, autocast) in enumerate(((engine.shadow, False), (master, True))):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(ids).logits[0, p - 1 : p - 1 + t].float()
            if engine.vocab_limit is not None:
                logits = logits[:, : engine.vocab_limit]
            ref = logits.log_softmax(-1).cpu().gather(-1, s.topk_ids)
            worst[i] = max(worst[i], float((ref - s.topk_logprobs).abs().max()))
    return worst[0], worst[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few tokens (CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per engine after the warm-up")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args()
    spec = SMOKE if args.smoke else FULL
    args.batch = args.batch or spec["batch"]
    args.new_tokens = args.new_tokens or spec["new_tokens"]
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    t_start = time.perf_counter()
    print(f"device {device}, torch {torch.__version__}", flush=True)

    config = Qwen3Config(**spec["shape"], eos_token_id=spec["eos"], pad_token_id=spec["pad"])
    torch.manual_seed(0)
    with device:
        master = Qwen3ForCausalLM(config).float()  # fp32 master weights, as the trainer holds them
    master.train()  # the trainer's module is in train mode between steps; the engines switch to eval
    weights = sum(p.numel() for p in master.parameters())
    tok = SimpleNamespace(eos_token_id=spec["eos"], pad_token_id=spec["pad"])
    gen = torch.Generator().manual_seed(1)
    lo, hi = spec["prompt"]
    lengths = torch.randint(lo, hi + 1, (args.batch,), generator=gen)
    prompts = [torch.randint(0, spec["tokens"], (int(n),), generator=gen).tolist() for n in lengths]
    limit = spec["tokens"] if spec["tokens"] < spec["shape"]["vocab_size"] else None
    print(
        f"student: {config.num_hidden_layers} layers, {weights / 1e6:.0f}M parameters, fp32 master "
        f"({gib(allocated(device)):.1f} GiB); batch {args.batch}, prompts {lo}-{hi} tokens, "
        f"{args.new_tokens} new tokens",
        flush=True,
    )

    print("(a) hf engine, dynamic cache, bf16 autocast on the fp32 master", flush=True)
    dynamic = HFRolloutEngine(master, tok, vocab_limit=limit)  # as rollout.hf.build without static_cache
    a = measure("dynamic", dynamic, prompts, args, device)

    print("(b) bf16 shadow, static cache", flush=True)
    before = allocated(device)
    t_build, shadow = timed(
        lambda: ShadowRolloutEngine(
            master, tok, "bfloat16", cache_implementation="static", prompt_pad_multiple=64, vocab_limit=limit
        ),
        device,
    )
    shadow_bytes = allocated(device) - before
    b = measure("shadow+static", shadow, prompts, args, device)

    with torch.no_grad():  # stands for an optimizer step: the master changes in place
        for p in master.parameters():
            p.mul_(1.0001)
    ptrs = [p.data_ptr() for p in shadow.shadow.parameters()]
    t_syncs = [timed(lambda: shadow.sync_weights(master), device)[0] for _ in range(3)]
    same_ptrs = ptrs == [p.data_ptr() for p in shadow.shadow.parameters()]
    t_after, after = timed(b["call"], device)  # the same shape: no new compile
    err_shadow, err_master = recorded_error(shadow, master, after, device)

    name = "smoke" if args.smoke else "Qwen3-1.7B"
    layers = config.num_hidden_layers
    print(f"\n{name} shape ({layers} layers), batch {args.batch}, {args.new_tokens} new tokens")
    print(f"{'engine':28} {'tok/s':>9} {'best s':>8} {'warm-up s':>10} {'peak GiB':>9}")
    for r, label in ((a, "(a) dynamic, bf16 autocast"), (b, "(b) bf16 shadow + static")):
        print(f"{label:28} {r['tok_s']:9.0f} {r['s']:8.2f} {r['warm_s']:10.1f} {r['peak']:9.1f}")
    ratio_mem = b["peak"] / a["peak"] if a["peak"] else float("nan")
    print(f"ratios (b)/(a): tok/s {b['tok_s'] / a['tok_s']:.2f}x, peak memory {ratio_mem:.2f}x")
    print(
        f"shadow: built in {t_build:.2f} s, holds {gib(shadow_bytes):.2f} GiB; "
        f"sync {t_syncs[0] * 1e3:.1f} ms (best of 3 {min(t_syncs) * 1e3:.1f} ms), "
        f"storage unchanged: {same_ptrs}; static call after the sync {t_after:.2f} s "
        f"(vs {b['s']:.2f} s: no recompile if close); first static call (compiles) {b['warm_s']:.1f} s"
    )
    print(
        f"recorded top-16 log-probs vs teacher-forced: shadow's own forward {err_shadow:.2e}, "
        f"fp32 master under bf16 autocast {err_master:.2e}"
    )
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
