"""``student-trainer``: on-policy distillation of a student from a teacher served over HTTP.

Commands (``student-trainer COMMAND --help`` for each):
  train      OPD training against one or more teacher endpoints (also under accelerate launch)
  demo       the README demo: a short OPD run on tiny local models, CPU, no downloads
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
    "demo": "student_trainer.commands.demo",
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


def _available() -> dict[str, object]:
    mods = {}
    for name, path in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name != path:  # a real missing dependency inside the command: surface it
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="student-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _available().items():
        p = sub.add_parser(
            name,
            help=mod.HELP.splitlines()[0],
            description=mod.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        sys.exit(2)
    sys.exit(args._run(args) or 0)


if __name__ == "__main__":
    main()
