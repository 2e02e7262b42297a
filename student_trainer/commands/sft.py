"""Supervised fine-tuning of the student on teacher rollouts (the paper's off-policy cold start).

  student-trainer sft --model STUDENT --data kept.jsonl --output-dir runs/sft --epochs 2
  accelerate launch -m student_trainer sft ...            # several processes / GPUs

Loss on completion tokens only. The output directory is a model + tokenizer: use it as `train`'s student.
Re-run with --resume to continue from the last checkpoint (--save-every N).
"""

from __future__ import annotations

import argparse
import dataclasses

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    from student_trainer.recipe.sft import SFTConfig

    d = SFTConfig(model="", data="")
    p.add_argument("--model", required=True, help="student model directory or hub id")
    p.add_argument("--data", required=True, help="JSONL of rollouts (e.g. the kept output of `filter`)")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)"
    )
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (global)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per forward per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=d.schedule)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--max-length", type=int, default=d.max_length, help="prompt + completion tokens")
    p.add_argument(
        "--student-template",
        default=d.student_template,
        help="'chat' (the student's chat template) or a string with {question}",
    )
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--question-field", default=d.question_field)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0 = never)"
    )
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output-dir"
    )
    p.add_argument("--no-plot", dest="plot", action="store_false")


def run(args: argparse.Namespace) -> int:
    from student_trainer.errors import TrainerError
    from student_trainer.recipe.sft import SFTConfig, run_sft

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    try:
        cfg = SFTConfig(**{k: v for k, v in vars(args).items() if k in fields})
        run_sft(cfg)
    except TrainerError as exc:
        print(f"student-trainer sft: {exc}")
        return 2
    return 0
