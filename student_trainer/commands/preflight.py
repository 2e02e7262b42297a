r"""Compatibility pre-flight: probe + a few OPD steps -> "compatible" / "needs cold start" / "teacher brings
nothing new", with the numbers and thresholds behind it.

  student-trainer preflight --student runs/student --teacher-url http://gpu:8000 --data prompts.jsonl
  student-trainer preflight --config opd.yaml --steps 20 --lr 1e-5 --sample 64 --report preflight.json

1. Probe the candidate templates at step 0 (options as `student-trainer probe`; a single --template and
   --teacher-prompt measures just that pair) and keep the best by the alignment metric (--choose-by).
2. Run --steps real OPD steps (default 8) with the config's trainer settings on the probe sample (each step
   = the whole sample, so step 1 is the probe's measurement); --lr overrides optim.lr for this run only.
   The run goes to WORKDIR/opd (metrics.jsonl, config.yaml; the weights are deleted unless --keep-model).
3. Verdict, first rule that applies:
   teacher brings nothing new  step-0 overlap ratio >= --nothing-new-overlap (0.9) and step-0 reverse KL
                               <= --nothing-new-kl (0.05 nats/token)
   needs cold start            step-0 alignment < --low-alignment (0.5) and its least-squares slope over
                               the OPD steps < --min-slope (0.01 per step)
   compatible                  otherwise
   Alignment (--metric) is the student's shared-token mass by default: the student's probability on the
   tokens in both top-k sets. The top-k overlap ratio (opd/overlap_ratio, the paper's headline number)
   counts a tail token of probability 1e-6 like the top-1; the mass weighs them by what the student samples.
   A slope from a few steps at a tiny lr (1e-6) is ~0 for any pair; the verdict then rests on the step-0
   level. Exit status 0 whatever the verdict (2: bad settings, 3: teacher unreachable).
Prints the probe table, the per-step overlap / KL, the measures against the thresholds and the verdict;
writes --report (JSON; default WORKDIR/preflight.json) and --out (the template fragment, as probe).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from student_trainer.commands.probe import (
    add_common_arguments,
    candidates_from_args,
    config_from_args,
    load_sample,
    train_command,
)

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    from student_trainer.recipe.preflight import ALIGNMENT_METRICS, Thresholds

    d = Thresholds()
    add_common_arguments(p)
    p.add_argument(
        "--steps", type=int, default=8, help="OPD steps after the probe (default 8; 0 = probe only)"
    )
    p.add_argument("--lr", type=float, help="learning rate of the pre-flight steps (default: optim.lr)")
    p.add_argument("--workdir", default="runs/preflight", help="where the OPD run and reports go")
    p.add_argument("--report", help="JSON report (default: WORKDIR/preflight.json)")
    p.add_argument("--out", help="template fragment for train (default: WORKDIR/template.yaml)")
    p.add_argument("--keep-model", action="store_true", help="keep the pre-flight student's weights")
    p.add_argument(
        "--metric",
        default=d.metric,
        choices=ALIGNMENT_METRICS,
        help=f"alignment metric of the level and slope rules (default {d.metric})",
    )
    p.add_argument("--nothing-new-overlap", type=float, default=d.nothing_new_overlap, help="(default 0.9)")
    p.add_argument("--nothing-new-kl", type=float, default=d.nothing_new_kl, help="nats/token (default 0.05)")
    p.add_argument("--low-alignment", type=float, default=d.low_alignment, help="(default 0.5)")
    p.add_argument("--min-slope", type=float, default=d.min_slope, help="per OPD step (default 0.01)")


def run(args: argparse.Namespace) -> int:
    from student_trainer.errors import TrainerError
    from student_trainer.recipe.preflight import Thresholds, format_report, run_preflight
    from student_trainer.recipe.probe import write_fragment
    from student_trainer.teacher.errors import TeacherError

    workdir = Path(args.workdir)
    try:
        cfg = config_from_args(args, [] if args.lr is None else [f"optim.lr={args.lr}"])
        thresholds = Thresholds(
            nothing_new_overlap=args.nothing_new_overlap,
            nothing_new_kl=args.nothing_new_kl,
            low_alignment=args.low_alignment,
            min_slope=args.min_slope,
            metric=args.metric,
        )
        candidates = candidates_from_args(args)
        sample = load_sample(cfg, args.sample)
        print(f"preflight: {len(candidates)} candidate(s), {len(sample)} prompts, {args.steps} OPD steps")
        report = run_preflight(
            cfg,
            candidates,
            sample,
            steps=args.steps,
            workdir=workdir,
            thresholds=thresholds,
            tie_tolerance=args.tie_tolerance,
            choose_by=args.choose_by,
            keep_model=args.keep_model,
        )
    except TeacherError as exc:
        print(f"student-trainer preflight: teacher error: {exc}")
        return 3
    except TrainerError as exc:
        print(f"student-trainer preflight: {exc}")
        return 2
    print(format_report(report))
    report_path = Path(args.report) if args.report else workdir / "preflight.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report.to_dict(), indent=1))
    fragment = write_fragment(args.out or workdir / "template.yaml", report.probe)
    print(f"report -> {report_path}\ntemplate fragment -> {fragment}")
    print("train with: " + train_command(args, fragment))
    return 0
