"""The mini-lab: OPD success and failure reproduced on a laptop, through the real service and trainer.

  student-trainer lab                          # 3 seeds x 3 runs, 200 OPD steps each (see docs/LAB.md)
  student-trainer lab --quick                  # CI smoke: 1 seed, A and B only, 30 steps (~30 s)
  student-trainer lab --seeds 0 1 2 3 --steps 400 --out runs/lab4

World: a + b with equal-length operands, a 16-token character tokenizer. Two teachers (4 layers x 128)
solve 2- and 3-digit problems in two thinking patterns: A right to left with explicit carries
("5+8+0=13;4+7+1=12;3+2+1=06;623"), B left to right column sums ("3+2=05;4+7=11;5+8=13;623"). The student
(2 layers x 128, pattern A) only ever saw 1- and 2-digit problems: 0% on 3 digits. The models ship in
student_trainer/lab/models (rebuild: python -m student_trainer.lab.build).

Runs, per seed (teacher-server processes over HTTP, `train`, `generate`, `filter`, `sft`, `eval`,
`preflight`):
  opd_A    OPD from teacher A
  opd_B    OPD from teacher B, same student, same steps
  cold_B   cold start: teacher B samples 2-digit problems, filter, SFT, then OPD from B
Each run starts with a pre-flight verdict on its pair; the pre-flight's probe compares the teacher reading
the student's prompt "{question}" with its own "<bos>{question}" (the teacher-aligned prompt).
--quick also prints two direction checks (initial top-1 overlap A > B; OPD from A lowers the reverse KL)
and exits with 1 if one fails.
Output in --out: results.json, report.md (tables: accuracy before/after, top-1 overlap and reverse KL
start -> end, steps, time; template probe; verdicts vs outcomes), lab.png, and one folder per run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    from student_trainer.lab.runner import RUNS

    p.add_argument(
        "--quick",
        action="store_true",
        help="the CI version: 1 seed, opd_A and opd_B, 30 steps, no pre-flight OPD steps",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="OPD seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--steps", type=int, help="OPD steps per run (default 200; --quick: 30)")
    p.add_argument("--runs", nargs="+", choices=RUNS, help="which runs (default: all three)")
    p.add_argument("--out", default="runs/lab", help="output folder (default runs/lab)")
    p.add_argument(
        "--models", help="folder with teacher_a/, teacher_b/, student/ (default: the shipped ones)"
    )
    p.add_argument("--workers", type=int, help="runs at a time, one process each (default 2)")
    p.add_argument("--prompts-per-step", type=int, help="OPD batch in prompts (default 64)")
    p.add_argument("--eval-every", type=int, help="held-out eval every N OPD steps (default 25)")


def run(args: argparse.Namespace) -> int:
    from student_trainer.lab import report
    from student_trainer.lab.build import MODELS_DIR
    from student_trainer.lab.runner import QUICK, LabError, LabSettings, run_lab, with_overrides

    try:
        settings = with_overrides(
            QUICK if args.quick else LabSettings(),
            seeds=tuple(args.seeds) if args.seeds else None,
            steps=args.steps,
            runs=tuple(args.runs) if args.runs else None,
            workers=args.workers,
            prompts_per_step=args.prompts_per_step,
            eval_every=args.eval_every,
        )
        out = Path(args.out)
        t0 = time.perf_counter()
        results = run_lab(settings, out, Path(args.models) if args.models else MODELS_DIR)
    except LabError as exc:
        print(f"student-trainer lab: {exc}")
        return 2
    text = report.markdown(results, settings.success_accuracy)
    (out / "report.md").write_text(text + "\n")
    png = report.plot(results, out, out / "lab.png")
    print(text)
    failed = False
    if args.quick:  # 30 steps are too few for accuracy to move: the agreement columns need the full lab
        print("\nquick checks (the directions a few steps can show):")
        for what, ok in report.quick_checks(results, out):
            print(f"  {'ok  ' if ok else 'FAIL'} {what}")
            failed |= not ok
    print(
        f"\nlab finished in {time.perf_counter() - t0:.0f} s -> {out}/report.md" + (f", {png}" if png else "")
    )
    return 1 if failed else 0
