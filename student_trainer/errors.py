"""The trainer's errors: one base, :class:`TrainerError`, and a subclass per boundary.

Every error the trainer raises on purpose derives from :class:`TrainerError` and from the stdlib type that
fits (as tinker-cookbook's ``ConfigurationError(..., ValueError)``), so ``except ValueError`` keeps working
and a command can print any of them as one line and exit non-zero (``cli.py``: 2 for settings and data,
3 for the teacher). The message always names the value and the fix.

    TrainerError
    ├── ConfigError (ValueError)         a setting that cannot work: config keys, CLI flags, engine options
    ├── DataError (ValueError)           input data that cannot be used: prompt files, records, SFT examples
    │   └── DataFileNotFound (FileNotFoundError)
    ├── MissingDependencyError (ImportError)   an optional extra is not installed
    ├── OffPolicyError (RuntimeError)    a student-top-k update on rollouts of an older policy
    └── TeacherError                     the teacher boundary (student_trainer.teacher.errors)
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every error the trainer raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """A setting that cannot work; the message names the value and the fix."""


class DataError(TrainerError, ValueError):
    """Input data that cannot be used; the message names the file/line or field and the fix."""


class DataFileNotFound(DataError, FileNotFoundError):
    """An input file that does not exist."""


class MissingDependencyError(TrainerError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


class OffPolicyError(TrainerError, RuntimeError):
    """The stored student top-k ids were taken by a different policy version than the one being updated."""
