"""student-trainer: on-policy distillation of a student from a teacher served over HTTP.

Commands (``student-trainer COMMAND --help`` for each):
  train      OPD training against one or more teacher endpoints (also under accelerate launch)
  demo       the README demo: a student learns 3-digit addition from a teacher over HTTP (CPU, ~2 min)
  score-demo score one rollout with a tiny teacher over HTTP and print tokens, log-probs and top-k
  generate   teacher rollouts through POST /v1/generate (off-policy cold start data)
  filter     drop incomplete, repetitive or too-short rollouts
  sft        supervised fine-tuning of the student on (filtered) rollouts
  probe      compare prompt templates by step-0 overlap with the teacher
  preflight  probe + a few OPD steps -> verdict: compatible / needs cold start / teacher brings nothing new
  dedup      drop prompts that also appear (exactly or semantically) in a reference set
  eval       accuracy on problems with reference answers
  lab        the mini-lab: OPD success and failure reproduced on a laptop
  tiny       build tiny local teacher/student models (tests, demos)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module exposing HELP: str, add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, str] = {
    "train": "student_trainer.commands.train",
    "demo": "student_trainer.commands.demo_opd",
    "score-demo": "student_trainer.commands.score_demo",
    "generate": "student_trainer.commands.generate",
    "filter": "student_trainer.commands.filter",
    "sft": "student_trainer.commands.sft",
    "probe": "student_trainer.commands.probe",
    "preflight": "student_trainer.commands.preflight",
    "dedup": "student_trainer.commands.dedup",
    "eval": "student_trainer.commands.eval",
    "lab": "student_trainer.commands.lab",
    "tiny": "student_trainer.commands.tiny",
}


def _command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command; only that command's module is imported (fast start, isolated failures)."""
    mod = importlib.import_module(COMMANDS[name])
    p = argparse.ArgumentParser(
        prog=f"student-trainer {name}",
        description=mod.HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        print(f"student-trainer: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
        sys.exit(2)
    args = _command_parser(name).parse_intermixed_args(argv[1:])
    from student_trainer.errors import TrainerError
    from student_trainer.teacher.errors import TeacherError

    try:
        code = args._run(args) or 0
    except TeacherError as exc:  # what a command did not catch itself: one line, not a traceback
        print(f"student-trainer {name}: teacher error: {exc}")
        code = 3
    except TrainerError as exc:
        print(f"student-trainer {name}: {exc}")
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
