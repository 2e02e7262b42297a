"""Shared fixtures: tiny local models (built once per session) and a real teacher-server subprocess."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per process: the tests run a teacher-server and a trainer side by side on 2 cores, and tiny models
# gain nothing from intra-op threads (oversubscribed they were ~10x slower). Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402 - after the thread settings

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(teacher_dir, student_dir): tiny Qwen3 models sharing one BPE tokenizer, saved with save_pretrained."""
    from devkit.tiny_models import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """A JSONL file of 48 small addition questions (the end-to-end training runs' data)."""
    import json

    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(48):
            f.write(json.dumps({"question": f"What is {i * 7 % 50} + {i * 3 % 20}?", "answer": "0"}) + "\n")
    return path


@pytest.fixture(scope="session")
def hf_teacher(tiny_pair):
    """A real `teacher-server` subprocess (transformers backend) serving the tiny teacher over HTTP."""
    from devkit.teacher_process import TeacherProcess

    with TeacherProcess(tiny_pair[0], "--max-top-k", "64", "--max-model-len", "256") as proc:
        yield proc
