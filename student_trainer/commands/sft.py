"""Supervised fine-tuning of the student on teacher rollouts (the paper's off-policy cold start).

  student-trainer sft --model STUDENT --data kept.jsonl --output-dir runs/sft --epochs 2
  student-trainer sft --model STUDENT --data trl-lib/Capybara --split train      # a Hub dataset (TRL format)
  accelerate launch -m student_trainer sft ...            # several processes / GPUs

Data: `generate`'s rollouts, or TRL's prompt-completion, conversational ("messages", the last assistant turn
is the target) or conversational prompt-completion records, detected from the first record; a .jsonl/.json/
.parquet file, a datasets directory or a Hub name (--split). Loss on completion tokens only. The output
directory is a model + tokenizer: use it as `train`'s student (--push-to-hub uploads it at the end).
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
    p.add_argument(
        "--data",
        required=True,
        help="rollouts (e.g. the kept output of `filter`) or a TRL-format dataset: a .jsonl/.json/.parquet "
        "file, a datasets directory or a Hub name",
    )
    p.add_argument("--split", default=d.split, help="split of a datasets source (default: train)")
    p.add_argument("--subset", default=None, help="config (subset) of a datasets source that has several")
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
    p.add_argument(
        "--chat-template-kwargs",
        type=json_object,
        default=None,
        metavar="JSON",
        help="chat template variables as a JSON object, e.g. '{\"enable_thinking\": false}'",
    )
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
    p.add_argument(
        "--push-to-hub", action="store_true", help="upload the output directory to the Hub at the end"
    )
    p.add_argument("--hub-model-id", default=None, help="the Hub repo for --push-to-hub (your-name/model)")
    p.add_argument("--hub-public", dest="hub_private", action="store_false", help="create a public repo")


def json_object(text: str) -> dict:
    """argparse type: a JSON object (``'{"enable_thinking": false}'``)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}"
        )
    return value


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
