"""Accuracy on problems with reference answers: ``run`` generates and scores, ``answers`` extracts and
compares answers (pluggable extractors). ``student-trainer eval`` and the trainer's periodic eval use it."""

from student_trainer.evaluate.run import (
    EvalConfig,
    EvalReport,
    EvalSummary,
    ItemResult,
    Problem,
    Sample,
    evaluate,
    load_model,
    load_problems,
    write_results,
)

__all__ = [
    "EvalConfig",
    "EvalReport",
    "EvalSummary",
    "ItemResult",
    "Problem",
    "Sample",
    "evaluate",
    "load_model",
    "load_problems",
    "write_results",
]
