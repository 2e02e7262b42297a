"""Build tiny local teacher/student models sharing one tokenizer (random weights, no downloads).

student-trainer tiny runs/tiny          # -> runs/tiny/teacher, runs/tiny/student
"""

from __future__ import annotations

import argparse

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="directory to create (teacher/ and student/ inside)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (the tokenizer is always the same)")


def run(args: argparse.Namespace) -> int:
    from devkit.tiny_models import build_tiny_pair

    teacher, student = build_tiny_pair(args.out_dir, seed=args.seed)
    print(f"teacher: {teacher}\nstudent: {student}")
    return 0
