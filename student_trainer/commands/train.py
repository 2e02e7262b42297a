"""On-policy distillation: the student samples, the teacher scores every token, the student learns.

  student-trainer train --config opd.yaml
  student-trainer train --config opd.yaml train.steps=200 teacher.urls=[http://gpu-host:8000]
  accelerate launch --num_processes 8 -m student_trainer train --config opd.yaml
  student-trainer train --config opd.yaml --resume        # continue from the newest checkpoint

Overrides are section.key=value (YAML values). Defaults are the paper's (lr 1e-6, 64 prompts/step, student
top-16 loss). See docs/TRAINING.md for every key and what the logged metrics mean.
"""

from __future__ import annotations

import argparse

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="YAML config file (sections: model, teacher, data, rollout, loss, optim, train, eval, logging)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=10")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir"
    )
    p.add_argument(
        "--teacher-url",
        action="append",
        default=None,
        metavar="URL",
        help="teacher endpoint (repeat for several); same as teacher.urls=[...]",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="model.lora: save the merged model at the end instead of the adapter (train.merge_lora=true)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    import json

    from student_trainer.config import load_config
    from student_trainer.errors import ConfigError

    try:
        overrides = list(args.overrides)
        if args.teacher_url:
            overrides.append("teacher.urls=[" + ",".join(args.teacher_url) + "]")
        if args.merge:
            overrides.append("train.merge_lora=true")
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1, default=str))
            return 0
        cfg.check_runnable()
    except ConfigError as exc:
        print(f"student-trainer train: config error: {exc}")
        return 2
    from student_trainer.errors import TrainerError
    from student_trainer.opd.trainer import OPDTrainer
    from student_trainer.teacher.errors import TeacherError

    try:
        OPDTrainer(cfg, resume=args.resume).train()
    except TeacherError as exc:
        print(f"student-trainer train: teacher error: {exc}")
        return 3
    except TrainerError as exc:
        print(f"student-trainer train: {exc}")
        return 2
    return 0
