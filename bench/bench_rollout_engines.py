"""Rollout engines side by side on CPU: ``hf`` (transformers ``generate``) vs ``vllm`` (colocated vLLM).

    python bench/bench_rollout_engines.py                 # ~26M-parameter student, batch 64, 128 new tokens
    python bench/bench_rollout_engines.py --smoke         # seconds: a tiny shape, to check the script runs

Measured in one run, same prompts, same lengths, same weights (random, fp32), same threads:
1. rollout tokens/s of each engine (top-k recording on, k = 16), best of ``--repeats``;
2. the vllm engine's weight sync (all tensors, one call), median of 5;
3. one whole OPD step per engine (student top-16 loss, an in-process teacher of the same shape), split by
   phase from the trainer's own ``time/*`` metrics (median over steps 2..N; step 1 warms up).
Prints a table and the vllm/hf ratios. Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

SHAPES = {  # ~26M parameters (vocab 1,024 tiny tokenizer), and a smoke shape
    "26m": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
    ),
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
    ),
}


def save_model(out: Path, shape: str, seed: int, tok) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=len(tok),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        initializer_range=0.05,
        **SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prompts_for(tok, batch: int) -> list[list[int]]:
    from devkit.tiny_models import builtin_corpus

    lines = builtin_corpus(seed=1, lines=batch)
    return [tok(line, add_special_tokens=False)["input_ids"][:32] for line in lines]


def rollout_speed(engine, prompts, new_tokens: int, repeats: int) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    for r in range(repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        with torch.no_grad():
            batch = engine.generate(
                prompts, n=1, temperature=1.0, max_new_tokens=new_tokens, top_k_record=16, seed=r
            )
        dt = time.perf_counter() - t0
        if r:
            best, tokens = min(best, dt), batch.num_tokens
    return tokens / best, tokens


def opd_steps(
    student: Path, teacher: Path, data: Path, out: Path, engine: str, steps: int, new: int, batch: int
):
    from student_trainer.config import load_config
    from student_trainer.opd.trainer import OPDTrainer

    overrides = {
        "model.student": student,
        "teacher.local": teacher,
        "data.path": data,
        "data.student_template": "{question}",
        "train.steps": steps,
        "train.prompts_per_step": batch,
        "train.micro_batch_prompts": batch,
        "rollout.max_new_tokens": new,
        "rollout.engine": engine,
        "optim.lr": 1e-4,
        "train.output_dir": out,
        "train.save_every": 0,
        "logging.progress_bar": "false",
        "logging.plot": "false",
        "train.sample_every": 0,
        "logging.trackers": "[jsonl]",
    }
    if engine == "vllm":
        overrides.update({"rollout.vllm_kv_cache_gib": 1.0, "rollout.vllm_max_model_len": 512})
    OPDTrainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()])).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    keys = ("generate", "teacher_wait", "forward_backward", "optimizer", "weight_sync", "step")
    return {k: statistics.median(r[f"time/{k}_s"] for r in rows) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    shape = "smoke" if a.smoke else "26m"
    if a.smoke:
        a.batch, a.new_tokens, a.repeats, a.steps = 4, 8, 1, 2
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from transformers import AutoModelForCausalLM

    from devkit.tiny_models import build_tokenizer
    from student_trainer.rollout.hf import HFRolloutEngine
    from student_trainer.rollout.vllm import VLLMRolloutEngine

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    tok = build_tokenizer(seed=0)
    student = save_model(work / "student", shape, 0, tok)
    teacher = save_model(work / "teacher", shape, 1, tok)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = prompts_for(tok, a.batch)
    # a special token random weights almost never sample: rows run to --new-tokens (tok/s counts real tokens)
    no_eos = [tok.convert_tokens_to_ids("<|im_start|>")]
    print(
        f"student {n_params / 1e6:.1f}M params, fp32, {torch.get_num_threads()} threads; batch {a.batch}, "
        f"{a.new_tokens} new tokens, top-16 recorded"
    )

    hf = HFRolloutEngine(model, tok, eos_token_ids=no_eos)
    hf_tps, hf_tokens = rollout_speed(hf, prompts, a.new_tokens, a.repeats)
    vl = VLLMRolloutEngine(
        model,
        tok,
        model_dir=str(student),
        eos_token_ids=no_eos,
        max_model_len=512,
        engine_kwargs={"kv_cache_memory_bytes": 2**30},
    )
    vl_tps, vl_tokens = rollout_speed(vl, prompts, a.new_tokens, a.repeats)
    syncs = []
    for _ in range(5):
        vl.sync_weights(model)
        syncs.append(vl.last_sync_s)
    vl.close()
    print(f"\n{'rollouts':<28}{'tokens':>8}{'tok/s':>10}")
    print(f"{'hf (transformers generate)':<28}{hf_tokens:>8}{hf_tps:>10.0f}")
    print(f"{'vllm (colocated, in-process)':<28}{vl_tokens:>8}{vl_tps:>10.0f}")
    print(f"ratio vllm/hf tok/s: {vl_tps / hf_tps:.2f}x")
    print(
        f"vllm weight sync ({n_params / 1e6:.1f}M params, one call): median {statistics.median(syncs) * 1e3:.1f} "
        f"ms (min {min(syncs) * 1e3:.1f}, max {max(syncs) * 1e3:.1f})"
    )

    data = work / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"question": tok.decode(pp)}) + "\n" for pp in prompts * (a.steps + 1))
    )
    phases = {
        e: opd_steps(student, teacher, data, work / f"opd_{e}", e, a.steps, a.new_tokens, a.batch)
        for e in ("hf", "vllm")
    }
    print(f"\none OPD step (median of steps 2..{a.steps}), seconds by phase")
    print(f"{'phase':<18}{'hf':>10}{'vllm':>10}")
    for k in phases["hf"]:
        print(f"{k:<18}{phases['hf'][k]:>10.3f}{phases['vllm'][k]:>10.3f}")
    for e in ("hf", "vllm"):
        print(f"{e}: generation {phases[e]['generate'] / phases[e]['step']:.0%} of the step")
    print(f"ratio step time hf/vllm: {phases['hf']['step'] / phases['vllm']['step']:.2f}x")


if __name__ == "__main__":
    main()
