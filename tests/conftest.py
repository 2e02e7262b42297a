"""Shared fixtures: tiny local models (built once per session) and a real teacher-server subprocess."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(teacher_dir, student_dir): tiny Qwen3 models sharing one BPE tokenizer, saved with save_pretrained."""
    from student_trainer.tiny_models import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def hf_teacher(tiny_pair):
    """A real `teacher-server` subprocess (transformers backend) serving the tiny teacher over HTTP."""
    from student_trainer.teacher_process import TeacherProcess

    with TeacherProcess(tiny_pair[0], "--max-top-k", "64", "--max-model-len", "256") as proc:
        yield proc
