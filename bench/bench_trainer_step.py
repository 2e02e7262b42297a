"""OPD step time by phase, teacher wait share with and without overlap, and training-step memory.

Part 1 (both presets): real OPD steps (`OPDTrainer`) against a real `teacher-server` on loopback; the step is
broken down into generation, teacher wait, forward/backward and optimizer, run twice in one process: with
scoring overlapped with generation (default) and without (wait for each micro-batch's scores at once).
Part 2 (GPU preset): one training step (fwd + bwd + AdamW) on B x L tokens with the student-top-16 loss,
our chunked implementation vs a naive one (full fp32 log_softmax over [B, L, V]), peak memory and tok/s.

  python bench/bench_trainer_step.py --preset cpu
  python bench/bench_trainer_step.py --preset gpu          # Qwen3-1.7B-shaped student, random weights, bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.teacher_process import TeacherProcess  # noqa: E402
from devkit.tiny_models import TEACHER_SPEC, TinySpec, build_tokenizer, save_shape_config, save_tiny  # noqa: E402
from student_trainer.config import load_config  # noqa: E402

PRESETS = {
    "cpu": dict(
        steps=4,
        prompts=16,
        micro=4,
        max_new=48,
        static=False,
        teacher_shape=None,
        student_shape=None,
        overlap_off=True,
        micro_bench=False,
    ),
    "gpu": dict(
        steps=3,
        prompts=64,
        micro=32,
        max_new=256,
        static=False,
        teacher_shape="qwen3-8b",
        student_shape="qwen3-1.7b",
        overlap_off=False,
        micro_bench=True,
    ),
}
CPU_STUDENT = TinySpec(
    hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768
)


def build_student(root: Path, shape: str | None) -> Path:
    if shape is None:
        return save_tiny(root / "student", CPU_STUDENT, seed=1, tokenizer=build_tokenizer())
    from transformers import AutoConfig, AutoModelForCausalLM

    path = save_shape_config(root / "student", shape)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps({"question": f"What is {i * 37 % 1000} + {i * 91 % 1000}? Think step by step."})
                + "\n"
            )
    return path


def opd_run(args, student: Path, url: str, data: Path, out: Path, overlap: bool) -> dict:
    from student_trainer.opd.trainer import OPDTrainer

    ov = [
        f"model.student={student}",
        f"teacher.urls=[{url}]",
        f"data.path={data}",
        f"train.steps={args.steps}",
        f"train.prompts_per_step={args.prompts}",
        f"train.micro_batch_prompts={args.micro}",
        f"rollout.max_new_tokens={args.max_new}",
        f"rollout.static_cache={str(args.static).lower()}",
        f"train.output_dir={out}",
        f"train.overlap_scoring={str(overlap).lower()}",
        "logging.plot=false",
        "logging.progress_bar=false",
        "train.sample_every=0",
        "train.save_every=0",
    ]
    trainer = OPDTrainer(load_config(None, ov))
    trainer.train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    timed = rows[1:] if len(rows) > 1 else rows  # the first step includes warm-up / compilation
    tot = {
        k: sum(r[f"time/{k}_s"] for r in timed)
        for k in ("generate", "teacher_wait", "forward_backward", "optimizer", "step")
    }
    gen_tokens = sum(r["rollout/tokens"] for r in timed)
    result = {
        "overlap": overlap,
        "steps_timed": len(timed),
        "rollout_tokens_per_step": gen_tokens / len(timed),
        "generate_tok_s": gen_tokens / tot["generate"],
        "teacher_wait_share": tot["teacher_wait"] / tot["step"],
        "forward_backward_s": tot["forward_backward"] / len(timed),
        "optimizer_s": tot["optimizer"] / len(timed),
        "step_s": tot["step"] / len(timed),
        "reverse_kl_first_last": [rows[0]["opd/reverse_kl"], rows[-1]["opd/reverse_kl"]],
        "peak_gib": max(r.get("memory/peak_gib", r.get("memory/peak_rss_gib", 0)) for r in rows),
    }
    result["share"] = {
        k: tot[k] / tot["step"] for k in ("generate", "teacher_wait", "forward_backward", "optimizer")
    }
    return result


def train_step_bench(student: Path, batch: int, length: int, k: int = 16) -> dict:
    """fwd + bwd + AdamW on (batch x length) tokens: chunked student-top-k loss vs naive full-vocab fp32."""
    from transformers import AutoModelForCausalLM

    from student_trainer.opd.chunked import gather_logprobs
    from student_trainer.opd.losses import student_topk_loss
    from student_trainer.opd.optim import build_optimizer
    from student_trainer.opd.policy import HiddenStatesLM

    out = {}
    for variant in ("naive", "chunked", "chunked+checkpointing"):
        gc.collect()
        torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).cuda().train()
        if variant.endswith("checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy = HiddenStatesLM(model)
        opt = build_optimizer(model, 1e-6, (0.9, 0.999), 0.01)  # the trainer's (fused on CUDA)
        vocab = model.config.vocab_size
        g = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, 1000, (batch, length), device="cuda", generator=g)
        cand = torch.randint(0, vocab, (batch * length, k), device="cuda", generator=g)
        teacher = -torch.rand(batch * length, k, device="cuda", generator=g) * 5
        times = []
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if variant == "naive":
                    logits = model(input_ids=ids).logits.float()
                    lp = logits.log_softmax(-1).reshape(batch * length, -1).gather(1, cand)
                else:
                    hidden = policy(ids, torch.ones_like(ids)).reshape(batch * length, -1)
                    lp = gather_logprobs(hidden, policy.head, cand).logprobs_N_M
                loss = student_topk_loss(lp, teacher)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[variant] = {
            "tok_s": batch * length / min(times[1:]),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        del model, policy, opt, lp, loss
    out["memory_ratio_naive_over_chunked"] = out["naive"]["peak_gib"] / out["chunked"]["peak_gib"]
    out["memory_ratio_naive_over_chunked_gc"] = (
        out["naive"]["peak_gib"] / out["chunked+checkpointing"]["peak_gib"]
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--json-out", default=None)
    p.add_argument("--train-step-only", action="store_true", help="GPU: only part 2 (no teacher, no OPD run)")
    args = p.parse_args()
    for k, v in PRESETS[args.preset].items():
        setattr(args, k, v)
    root = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    if args.train_step_only:
        result = train_step_bench(build_student(root, args.student_shape), 16, 1024)
        print(json.dumps(result))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        return
    if args.teacher_shape:
        teacher_dir = save_shape_config(root / "teacher", args.teacher_shape)
        teacher_args = [
            "--load-format",
            "dummy",
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "4096",
            "--max-batch-tokens",
            "65536",
        ]
    else:
        teacher_dir = save_tiny(root / "teacher", TEACHER_SPEC, seed=2, tokenizer=build_tokenizer())
        teacher_args = []
    results: dict = {"preset": args.preset}
    teacher = TeacherProcess(teacher_dir, *teacher_args, ready_timeout=900, log_path=root / "teacher.log")
    teacher.start(wait=False)
    try:
        student = build_student(root, args.student_shape)
        teacher.wait_ready()
        data = write_prompts(root / "prompts.jsonl", 4 * args.prompts)
        try:
            results["overlap_on"] = opd_run(args, student, teacher.url, data, root / "run-overlap", True)
        except Exception as exc:  # keep going: the training-step part still gives its figures
            results["overlap_on"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(teacher.log_tail(), flush=True)
        print(json.dumps(results["overlap_on"]), flush=True)
        if args.overlap_off:
            results["overlap_off"] = opd_run(args, student, teacher.url, data, root / "run-sequential", False)
            print(json.dumps(results["overlap_off"]), flush=True)
    finally:
        teacher.stop()
    if args.micro_bench:
        results["train_step_16x1024"] = train_step_bench(student, 16, 1024)
        print(json.dumps(results["train_step_16x1024"]), flush=True)
    on = results["overlap_on"]
    if "error" in on:
        print(json.dumps(results))
        return
    print(
        f"\nstep {on['step_s']:.2f}s: generate {on['share']['generate']:.0%}, teacher wait "
        f"{on['share']['teacher_wait']:.0%}, fwd/bwd {on['share']['forward_backward']:.0%}, optimizer "
        f"{on['share']['optimizer']:.0%}; generation {on['generate_tok_s']:,.0f} tok/s; peak {on['peak_gib']:.1f} GiB"
    )
    if "overlap_off" in results:
        off = results["overlap_off"]
        print(
            f"teacher wait share: {on['teacher_wait_share']:.1%} with overlap vs {off['teacher_wait_share']:.1%} "
            "without"
        )
    print(json.dumps(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
