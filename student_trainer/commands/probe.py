r"""Compare prompt templates by the step-0 overlap between the student's rollouts and the teacher.

  student-trainer probe --student runs/sft --teacher-url http://gpu:8000 --data prompts.jsonl
  student-trainer probe --config opd.yaml --template chat --template 'Question: {question}' \
      --teacher-prompt same --teacher-prompt chat --sample 64 --out probe.yaml
  student-trainer train --config probe.yaml model.student=... teacher.urls=[...] data.path=...

Candidates are every pair of a student side (--template: "chat" = the student's chat template, or a string
with {question}) and a teacher side (--teacher-prompt: "same" = the student's prompt ids, "chat" or
"teacher-chat" = the TEACHER's chat template rendered server-side, the paper's teacher-aligned prompt, or a
{question} string). Defaults: --template chat --template '{question}' --teacher-prompt same
--teacher-prompt chat (pairs a side cannot render are skipped). The completion tokens are the same on both
sides; only the teacher's context changes.

On --sample prompts (seeded), the student samples with the config's rollout settings (temperature, n,
max_new_tokens; micro-batches and seeds of train's step 0) and the teacher scores the rollouts as train
does. Printed per candidate: overlap ratio, shared-token mass (student / teacher), per-token reverse KL
(top-k estimate and sampled-token k1), entropy gap H(student) - H(teacher), response length, EOS rate.
The choice: the highest overlap ratio (--choose-by another metric); within --tie-tolerance (default 0.01)
the lower reverse KL. Written to --out (a YAML fragment with data.student_template / data.teacher_prompt:
`train --config` accepts it), to --write-config (the whole resolved config with the choice) and --report
(JSON with every number).
Settings come from --config (a train YAML) and section.key=value overrides, plus the shortcuts below.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import yaml

HELP = __doc__


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``probe`` and ``preflight``: where the config comes from and the candidates."""
    p.add_argument("--config", help="train YAML config (model, teacher, data, rollout, loss sections)")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value overrides, e.g. rollout.max_new_tokens=512"
    )
    p.add_argument("--student", help="student model directory (= model.student)")
    p.add_argument("--teacher-url", action="append", help="teacher endpoint, repeatable (= teacher.urls)")
    p.add_argument("--data", help="prompts .jsonl/.parquet/dataset (= data.path)")
    p.add_argument("--question-field", help="question field of the prompts (= data.question_field)")
    p.add_argument("--max-new-tokens", type=int, help="rollout budget (= rollout.max_new_tokens)")
    p.add_argument("--top-k", type=int, help="k of the overlap and the loss (= loss.top_k, default 16)")
    p.add_argument(
        "--template", action="append", help="student side: chat or a {question} string (repeatable)"
    )
    p.add_argument(
        "--teacher-prompt",
        action="append",
        help="teacher side: same, chat / teacher-chat, or a {question} string (repeatable)",
    )
    p.add_argument("--sample", type=int, default=32, help="prompts in the probe sample (default 32)")
    p.add_argument(
        "--tie-tolerance", type=float, default=0.01, help="overlaps this close tie; lower KL wins (0.01)"
    )
    p.add_argument(
        "--choose-by",
        choices=("opd/overlap_ratio", "opd/student_shared_mass", "opd/overlap_top1"),
        help="metric the choice maximises (probe: the paper's overlap ratio; preflight: its --metric)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--out", default="probe.yaml", help="config fragment with the choice (default probe.yaml)")
    p.add_argument("--write-config", help="also write the whole resolved config with the choice here")
    p.add_argument("--report", help="JSON report with every candidate's numbers")


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None):
    """The train Config the probe measures with: --config + overrides + the shortcut flags + ``extra``."""
    from student_trainer.config import load_config

    overrides = list(args.overrides)
    if args.student:
        overrides.append(f"model.student={args.student}")
    if args.teacher_url:
        overrides.append("teacher.urls=[" + ",".join(args.teacher_url) + "]")
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.question_field:
        overrides.append(f"data.question_field={args.question_field}")
    if args.max_new_tokens:
        overrides.append(f"rollout.max_new_tokens={args.max_new_tokens}")
    if args.top_k:
        overrides.append(f"loss.top_k={args.top_k}")
    cfg = load_config(args.config, overrides + list(extra or []))
    cfg.check_runnable()
    return cfg


def candidates_from_args(args: argparse.Namespace):
    from student_trainer.recipe.probe import make_candidates

    return make_candidates(args.template or ["chat", "{question}"], args.teacher_prompt or ["same", "chat"])


def load_sample(cfg, size: int):
    from student_trainer.data.prompts import load_prompts
    from student_trainer.recipe.probe import sample_table

    d = cfg.data
    table = load_prompts(d.path, question_field=d.question_field, answer_field=d.answer_field)
    return sample_table(table, size, d.seed)


def train_command(args: argparse.Namespace, fragment: str | Path, full_config: str | None = None) -> str:
    """The `train` command line that applies the choice: the full config when one was written, else the
    user's --config (or the fragment) plus the choice and the shortcut flags as overrides."""
    if full_config:
        return f"student-trainer train --config {shlex.quote(str(full_config))}"
    parts = ["student-trainer", "train", "--config", str(args.config or fragment)]
    chosen = ("data.student_template=", "data.teacher_prompt=")
    parts += [o for o in args.overrides if not o.startswith(chosen)]
    for flag, key in (
        ("student", "model.student"),
        ("data", "data.path"),
        ("question_field", "data.question_field"),
    ):
        if getattr(args, flag):
            parts.append(f"{key}={getattr(args, flag)}")
    if args.teacher_url:
        parts.append("teacher.urls=[" + ",".join(args.teacher_url) + "]")
    if args.config:  # the choice goes last so that it wins over the config file
        parts += [f"data.{k}={v}" for k, v in yaml.safe_load(Path(fragment).read_text())["data"].items()]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    from student_trainer.errors import TrainerError
    from student_trainer.recipe.probe import format_table, run_probe, with_choice, write_fragment
    from student_trainer.teacher.errors import TeacherError

    try:
        cfg = config_from_args(args)
        candidates = candidates_from_args(args)
        sample = load_sample(cfg, args.sample)
        print(f"probe: {len(candidates)} candidate(s) on {len(sample)} prompts from {cfg.data.path}")
        choose_by = args.choose_by or "opd/overlap_ratio"
        report = run_probe(cfg, candidates, sample, tie_tolerance=args.tie_tolerance, choose_by=choose_by)
    except TeacherError as exc:
        print(f"student-trainer probe: teacher error: {exc}")
        return 3
    except TrainerError as exc:
        print(f"student-trainer probe: {exc}")
        return 2
    print(format_table(report.results, report.chosen))
    print(f"chosen: {report.chosen.candidate.name} (* above)")
    path = write_fragment(args.out, report)
    print(f"config fragment -> {path}")
    if args.write_config:
        full = with_choice(cfg, report.chosen.candidate)
        full.teacher.api_key = None  # never written to disk; train reads $TEACHER_API_KEY
        full.dump(args.write_config)
        print(f"full config with the choice -> {args.write_config}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
        print(f"report -> {args.report}")
    print("train with: " + train_command(args, path, args.write_config))
    return 0
