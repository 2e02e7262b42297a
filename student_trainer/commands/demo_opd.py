"""The README demo: a student learns 3-digit addition from a teacher over HTTP (CPU, no downloads, < 5 min).

  student-trainer demo                          # 300 OPD steps (~2 min), writes runs/demo_opd/
  student-trainer demo --steps 300 --workdir /tmp/demo
  student-trainer demo --engine vllm             # the same run with the colocated vLLM rollout engine

The shipped student (a 2-layer Qwen3, student_trainer/lab/models/student) adds 1- and 2-digit numbers
right to left with explicit carries ("45+78=" -> "5+8+0=13;4+7+1=12;123") and has never seen a 3-digit
problem: 0% on them. Teacher A (4 layers, same way of working) solves them. This demo starts teacher A with
`teacher-server`, runs on-policy distillation on the student through the real trainer (student top-16
reverse KL over HTTP, 64 prompts per step, 1/3 two-digit and 2/3 three-digit), and every few steps prints
loss, reverse KL, the top-1 overlap (how often student and teacher agree on the next token; the top-16
"overlap" is 1 by construction in this 16-token world) and the accuracy on held-out 3-digit problems. It
shows the student's answers before and after, and saves the curves to WORKDIR/demo_opd.png.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

HELP = __doc__
SHOWN = 4  # the first held-out 3-digit problems (the same ones every time, never trained on)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/demo_opd", help="where logs, metrics and the plot go")
    p.add_argument("--steps", type=int, default=300, help="OPD steps (default 300)")
    p.add_argument(
        "--eval-every", type=int, default=10, help="held-out 3-digit eval (and a line) every N steps"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="rollout engine: hf (transformers generate, default) or vllm (colocated vLLM; needs vllm)",
    )
    p.add_argument("--models", help="folder with teacher_a/ and student/ (default: the shipped lab models)")


def show_samples(model_dir: str | Path, title: str) -> None:
    """Greedy completions of a few 3-digit problems, marked right or wrong."""
    from student_trainer.evaluate import EvalConfig, Problem, evaluate, load_model
    from student_trainer.lab import world

    model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
    from student_trainer.lab.build import eval_problems

    problems = [Problem(p.question, p.answer) for p in eval_problems()[3][:SHOWN]]
    cfg = EvalConfig(greedy=True, max_new_tokens=40, template=world.STUDENT_TEMPLATE, extractor="last:;")
    print(title)
    for item in evaluate(model, tokenizer, problems, cfg).items:
        s = item.samples[0]
        print(f"  {item.question}{s.text:<34} {'right' if s.correct else 'WRONG'} (answer {item.reference})")


def write_data(work: Path, steps: int, seed: int) -> tuple[Path, Path]:
    """OPD prompts (1/3 two-digit, 2/3 three-digit; held-out problems excluded) and the held-out eval set."""
    from student_trainer.lab import world
    from student_trainer.lab.build import eval_problems

    evals = eval_problems()
    held = {(p.a, p.b) for ps in evals.values() for p in ps}
    problems = world.mixed_problems(random.Random(f"demo:{seed}"), {2: 1.0, 3: 2.0}, steps * 64)
    prompts = world.write_jsonl(
        work / "prompts.jsonl", world.problem_records(p for p in problems if (p.a, p.b) not in held)
    )
    eval_path = world.write_jsonl(work / "eval.jsonl", world.problem_records(evals[3][:100] + evals[2][:50]))
    return prompts, eval_path


def run(args: argparse.Namespace) -> int:
    from devkit.teacher_process import TeacherProcess
    from student_trainer.lab.build import MODELS_DIR
    from student_trainer.lab.opd import LabTrainer, lab_config
    from student_trainer.lab.runner import LabError, check_models
    from student_trainer.tracking import plot_metrics

    t0 = time.perf_counter()
    models = Path(args.models) if args.models else MODELS_DIR
    work = Path(args.workdir)
    try:
        check_models(models)
        if args.steps < 1 or args.eval_every < 1:
            raise LabError(f"--steps {args.steps} and --eval-every {args.eval_every} must be >= 1")
    except LabError as exc:
        print(f"student-trainer demo: {exc}")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    prompts, eval_path = write_data(work, args.steps, args.seed)
    show_samples(models / "student", "student before OPD (3-digit problems it has never seen):")
    print("starting teacher A with teacher-server ...")
    with TeacherProcess(
        models / "teacher_a", "--max-top-k", "16", "--max-model-len", "128", log_path=work / "teacher.log"
    ) as teacher:
        print(f"teacher-server ready at {teacher.url}; OPD for {args.steps} steps (metrics: {work}/opd)")
        cfg = lab_config(
            models / "student",
            teacher.url,
            prompts,
            eval_path,
            work / "opd",
            steps=args.steps,
            seed=args.seed,
            lr=args.lr,
            eval_every=args.eval_every,
            log_every=args.eval_every,
            engine=args.engine,
        )
        if (work / "opd" / "metrics.jsonl").exists():
            (work / "opd" / "metrics.jsonl").unlink()  # a fresh run in the same workdir
        LabTrainer(cfg).train()
    show_samples(work / "opd", "student after OPD:")
    png = plot_metrics(
        work / "opd" / "metrics.jsonl",
        work / "demo_opd.png",
        keys=("eval/acc_3digit", "eval/acc_2digit", "opd/overlap_top1", "opd/reverse_kl_topk"),
        title="OPD from teacher A: the student learns 3-digit addition",
    )
    print(f"plot: {png}\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0
