"""HFRolloutEngine on a GPU: recorded top-k correctness on CUDA, and tokens/s against bare ``generate``.

    python bench/rollout_engine.py                      # CUDA; ~3 minutes on an H200
    python bench/rollout_engine.py --batch 8 --new-tokens 32 --layers 2   # a quick CPU smoke run

Part 1 (tiny fp32 student, CUDA): every recorded top-k log-prob and sampled log-prob against a separate
teacher-forced forward, with the dynamic and the static cache (on CUDA transformers compiles the static decode
step and defers stop checks, a code path the CPU tests cannot reach).
Part 2 (random-weight Qwen3-1.7B shape, bf16): tokens/s of the engine (top-k recording on) next to bare
``model.generate`` with the same settings, for both caches, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from devkit.tiny_models import build_tiny_pair
from student_trainer.rollout.hf import HFRolloutEngine, left_pad


def check_tiny(device: torch.device) -> None:
    _, path = build_tiny_pair(tempfile.mkdtemp())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    texts = ["What is 12 + 30?", "Compute 7 * 8. First multiply, then check the", "Let", "the answer is"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = [tok.eos_token_id, *range(100, 160)]  # frequent stops: finished and cut rows mixed
    for cache in (None, "static"):
        engine = HFRolloutEngine(
            model, tok, eos_token_ids=eos, cache_implementation=cache, prompt_pad_multiple=16
        )
        batch = engine.generate(
            prompts, n=4, temperature=0.8, top_p=0.9, max_new_tokens=24, top_k_record=8, seed=3
        )
        err, bad_eos = 0.0, 0
        for s in batch.samples:
            ids = torch.cat([s.prompt_ids, s.completion_ids])[None].to(device)
            with torch.no_grad():
                logits = model(ids).logits[0].float().cpu()
            p, t = len(s.prompt_ids), len(s.completion_ids)
            ref_T_V = logits[p - 1 : p - 1 + t].log_softmax(-1)
            err = max(
                err,
                float((ref_T_V.topk(8, dim=-1).values - s.topk_logprobs).abs().max()),
                float((ref_T_V.gather(-1, s.topk_ids) - s.topk_logprobs).abs().max()),
                float((ref_T_V.gather(-1, s.completion_ids[:, None])[:, 0] - s.sampled_logprobs).abs().max()),
            )
            comp = s.completion_ids.tolist()
            ok = (comp[-1] in eos and not set(comp[:-1]) & set(eos)) if s.finished else len(comp) == 24
            bad_eos += not ok
        print(
            f"tiny fp32 cache={cache or 'dynamic'}: samples={len(batch.samples)} eos_rate={batch.eos_rate:.2f} "
            f"max|recorded - teacher-forced|={err:.2e} eos-structure errors={bad_eos}"
        )


def qwen3_1p7b_shape(layers: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        eos_token_id=151645,
        pad_token_id=151643,
    )


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def speed(device: torch.device, batch: int, new_tokens: int, layers: int) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = Qwen3ForCausalLM(qwen3_1p7b_shape(layers)).to(dtype).eval()
    tok = SimpleNamespace(eos_token_id=151645, pad_token_id=151643)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, 151_669, (int(n),), generator=gen).tolist()
        for n in torch.randint(48, 65, (batch,), generator=gen)
    ]
    ids, mask = left_pad(prompts, tok.pad_token_id, 64)
    ids, mask = ids.to(device), mask.to(device)
    rows = []
    for cache in (None, "static"):
        engine = HFRolloutEngine(model, tok, cache_implementation=cache, prompt_pad_multiple=64)

        def bare(n=new_tokens, cache=cache):  # the same sampling settings, nothing recorded
            return model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                max_new_tokens=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                cache_implementation=cache,
            )  # fmt: skip

        def ours(n=new_tokens, engine=engine):
            return engine.generate(prompts, max_new_tokens=n, top_k_record=16, seed=0)

        # warm-up at the timed shapes (the static cache compiles per shape; the allocator caches the
        # dynamic cache's blocks), then alternate the two and keep the best of two runs each
        t_compile, _ = timed(bare, device)
        timed(ours, device)
        t_bare = t_ours = float("inf")
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t, out = timed(bare, device)
            t_bare, mem_bare = min(t_bare, t), _peak_gib(device)
            t, rb = timed(ours, device)
            t_ours, mem_ours = min(t_ours, t), _peak_gib(device)
        n_bare = int((out[:, ids.shape[1] :] != tok.pad_token_id).sum())
        rows.append(
            (cache or "dynamic", n_bare / t_bare, rb.num_tokens / t_ours, mem_bare, mem_ours, t_compile)
        )
    print(
        f"\nQwen3-1.7B shape ({layers} layers), {dtype}, batch {batch}, {new_tokens} new tokens, prompts 48-64"
    )
    print(
        f"{'cache':8} {'bare tok/s':>11} {'engine tok/s':>13} {'engine/bare':>12} {'peak GiB bare / engine':>23}"
    )
    for cache, bare_tps, ours_tps, mb, mo, _ in rows:
        print(
            f"{cache:8} {bare_tps:11.0f} {ours_tps:13.0f} {ours_tps / bare_tps:12.2f} {mb:12.1f} / {mo:.1f}"
        )
    print(
        f"static/dynamic (engine): {rows[1][2] / rows[0][2]:.2f}x; first static call (compiles) {rows[1][5]:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}")
    check_tiny(device)
    speed(device, args.batch, args.new_tokens, args.layers)


if __name__ == "__main__":
    main()
