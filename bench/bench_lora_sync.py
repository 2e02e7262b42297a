"""A LoRA student's weight sync into the vllm rollout engine: merged push vs vLLM's own LoRA, on CPU.

    python bench/bench_lora_sync.py            # ~2-3 min on 2 cores: the ~26M bench student, r 16, 3 steps
    python bench/bench_lora_sync.py --smoke    # the tiny test student

Both paths run in one process, one engine after the other (vLLM's process-wide state allows one at a
time), on the same saved student, the same adapter sequence (each "step" moves every adapter tensor, B
included, by a seeded random amount, as an optimizer step would) and the same seeded prompts:

(a) merged push (what ``rollout.engine=vllm`` does for ``model.lora``): ``engine.sync_weights(peft_model)``
    sends W + scale * B @ A of every adapted layer, and the other tensors, through vLLM's in-place reload;
(b) vLLM LoRA: the engine keeps the base weights (``enable_lora``), each step saves the adapter with
    ``save_pretrained`` and (re)loads it with ``add_lora(LoRARequest(..., load_inplace=True))``; every
    prompt is sampled with that request.

Printed side by side: per-step sync time (median; (b) includes the save to disk), sampling tok/s (median),
and the agreement: the recorded sampled-token log-probs of each path against a transformers forward of
peft's merged model, and (a) against (b) on the same seeds. If vLLM's LoRA path fails on this build, the
bench says so and why. Results: the report of issue 12.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

KV = {"kv_cache_memory_bytes": 256 * 2**20}


def save_student(work: Path, smoke: bool, tok) -> Path:
    if smoke:
        from devkit.tiny_models import build_tiny_pair

        return build_tiny_pair(work / "tiny")[1]
    from bench_rollout_engines import save_model  # the ~26M student of the engine benchmark

    return save_model(work / "student", "26m", 0, tok)


def perturb(model, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def lora_model(path: Path, r: int):
    from transformers import AutoModelForCausalLM

    from student_trainer.opd.lora import apply_lora

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)  # peft draws A at random: both paths must train the same adapter
    return apply_lora(base, dict(r=r, alpha=2 * r, dropout=0.0, target_modules="all-linear"))


def sample(engine, prompts, args, step: int, **kw):
    t0 = time.perf_counter()
    batch = engine.generate(
        prompts, n=1, temperature=1.0, max_new_tokens=args.new_tokens, top_k_record=8, seed=step, **kw
    )
    return batch, batch.num_tokens / (time.perf_counter() - t0)


def reference_gap(model, batch) -> float:
    """max |recorded - transformers forward of peft's merged model| over the sampled tokens."""
    ref = copy.deepcopy(model).merge_and_unload().eval()
    worst = 0.0
    for s in batch.samples:
        seq = torch.cat([s.prompt_ids, s.completion_ids])[None]
        p, t = len(s.prompt_ids), len(s.completion_ids)
        with torch.no_grad():
            lp = ref(input_ids=seq).logits[0].float().log_softmax(-1)[p - 1 : p - 1 + t]
        got = lp.gather(-1, s.completion_ids[:, None])[:, 0]
        worst = max(worst, float((got - s.sampled_logprobs).abs().max()))
    return worst


def no_eos(tok) -> list[int]:
    """A special token random weights almost never sample: rows run to --new-tokens."""
    return [tok.convert_tokens_to_ids("<|im_start|>")]


def run_merged(path, tok, prompts, args, engine_cls):
    from student_trainer.opd.lora import iter_merged_tensors

    model = lora_model(path, args.rank)
    engine = engine_cls(
        model, tok, model_dir=str(path), max_model_len=512, engine_kwargs=KV, eos_token_ids=no_eos(tok)
    )
    out = []
    try:
        sample(engine, prompts, args, -1)  # warm-up, not timed
        for step in range(args.steps):
            perturb(model, step, args.scale)
            t0 = time.perf_counter()
            for _ in iter_merged_tensors(model):  # the merge alone, without vLLM
                pass
            merge = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine.sync_weights(model)
            sync = time.perf_counter() - t0
            batch, tps = sample(engine, prompts, args, step)
            out.append(dict(sync=sync, merge=merge, tps=tps, batch=batch, gap=reference_gap(model, batch)))
    finally:
        engine.close()
    return out


def run_vllm_lora(path, tok, prompts, args, engine_cls, work: Path):
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    model = lora_model(path, args.rank)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # the engine keeps these
    lora_kw = {"enable_lora": True, "max_lora_rank": args.rank, "max_loras": 1}
    engine = engine_cls(
        base,
        tok,
        model_dir=str(path),
        max_model_len=512,
        engine_kwargs={**KV, **lora_kw},
        eos_token_ids=no_eos(tok),
    )
    adapter = work / "adapter"
    out = []
    try:
        sample(engine, prompts, args, -1)  # warm-up (base weights, no adapter), not timed
        for step in range(args.steps):
            perturb(model, step, args.scale)
            t0 = time.perf_counter()
            model.save_pretrained(adapter)
            request = LoRARequest("student", 1, str(adapter), load_inplace=True)
            engine.llm.llm_engine.add_lora(request)
            sync = time.perf_counter() - t0
            batch, tps = sample(engine, prompts, args, step, lora_request=request)
            out.append(dict(sync=sync, tps=tps, batch=batch, gap=reference_gap(model, batch)))
    finally:
        engine.close()
    return out


def agreement(a, b) -> tuple[float, float]:
    """(share of samples with identical tokens, max |sampled log-prob a - b| over their common prefix)."""
    same, worst, total = 0, 0.0, 0
    for ra, rb in zip(a, b, strict=True):
        for sa, sb in zip(ra["batch"].samples, rb["batch"].samples, strict=True):
            total += 1
            same += torch.equal(sa.completion_ids, sb.completion_ids)
            n = len(sa.completion_ids)
            for t in range(min(n, len(sb.completion_ids))):
                if sa.completion_ids[t] != sb.completion_ids[t]:
                    break  # a different token (a near-tie sampled apart): the contexts differ from here
                worst = max(worst, abs(float(sa.sampled_logprobs[t] - sb.sampled_logprobs[t])))
    return same / max(1, total), worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scale", type=float, default=0.02, help="adapter change per step (std)")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.new_tokens, args.rank, args.scale = 2, 4, 16, 8, 0.3
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    from bench_rollout_engines import prompts_for
    from transformers import AutoTokenizer

    from devkit.tiny_models import build_tokenizer
    from student_trainer.rollout.vllm import VLLMRolloutEngine

    path = save_student(work, args.smoke, build_tokenizer(seed=0))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = prompts_for(tok, args.batch)
    model = lora_model(path, args.rank)
    n_base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    print(
        f"student {n_base / 1e6:.1f}M params (fp32), LoRA r={args.rank} all-linear: {n_lora / 1e6:.2f}M adapter "
        f"params; {args.steps} steps, batch {args.batch} x {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    t0 = time.perf_counter()
    merged = run_merged(path, tok, prompts, args, VLLMRolloutEngine)
    print(f"(a) merged push done in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    try:
        lora = run_vllm_lora(path, tok, prompts, args, VLLMRolloutEngine, work)
        print(f"(b) vLLM LoRA done in {time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # report, do not hide: the merged column stands on its own
        lora = None
        print(f"(b) vLLM LoRA FAILED on this vLLM build: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=3)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    print(f"\n{'per step (median)':<34}{'(a) merged push':>18}{'(b) vLLM LoRA':>16}")
    cols = [merged] + ([lora] if lora else [])
    fmt = [
        ("weight sync, ms", lambda rows: f"{med(rows, 'sync') * 1e3:.1f}"),
        (
            "  of which the merge alone, ms",
            lambda rows: f"{med(rows, 'merge') * 1e3:.1f}" if "merge" in rows[0] else "-",
        ),
        ("sampling, tok/s", lambda rows: f"{med(rows, 'tps'):.0f}"),
        ("max |lp - merged forward|", lambda rows: f"{max(r['gap'] for r in rows):.1e}"),
    ]
    for label, f in fmt:
        vals = [f(c) for c in cols] + ([] if lora else ["n/a"])
        print(f"{label:<34}{vals[0]:>18}{vals[1]:>16}")
    if lora:
        same, worst = agreement(merged, lora)
        print(
            f"(a) vs (b), same seeds: {same:.0%} of samples token-identical, "
            f"max |sampled log-prob a - b| {worst:.1e}"
        )
        print(
            f"sync ratio (b)/(a): {med(lora, 'sync') / med(merged, 'sync'):.2f}x; "
            f"sampling ratio (b)/(a): {med(lora, 'tps') / med(merged, 'tps'):.2f}x"
        )


if __name__ == "__main__":
    main()
