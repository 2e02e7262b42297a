"""The OPD trainer end to end on CPU: tiny teacher served by a real `teacher-server`, tiny student sharing its
tokenizer, real HTTP, real optimisation.

- every loss variant lowers the reverse KL and raises the top-k overlap over a short run;
- two processes (torchrun + accelerate, gloo) run the same loop;
- killing the teacher mid-run and restarting it loses and repeats no step (the per-step losses equal an
  uninterrupted run's);
- killing the trainer and `--resume` gives the same per-step losses as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from devkit.teacher_process import TeacherProcess
from student_trainer.config import load_config
from student_trainer.opd.trainer import OPDTrainer
from student_trainer.tracking import read_jsonl


def overrides(student, url, data, out, steps, **extra) -> list[str]:
    base = {
        "model.student": student,
        "teacher.urls": f"[{url}]",
        "data.path": data,
        "train.steps": steps,
        "train.prompts_per_step": 8,
        "train.micro_batch_prompts": 4,
        "rollout.max_new_tokens": 16,
        "optim.lr": 3e-3,
        "train.output_dir": out,
        "logging.progress_bar": "false",
        "logging.plot": "false",
        "train.sample_every": 0,
        "teacher.max_retry_wait_s": 120,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def trend(rows: list[dict], key: str, n: int = 4) -> tuple[float, float]:
    vals = [r[key] for r in rows]
    return float(np.mean(vals[:n])), float(np.mean(vals[-n:]))


@pytest.mark.parametrize("loss", ["student_topk", "sampled_token", "teacher_topk", "full_vocab"])
def test_each_loss_lowers_kl_and_raises_overlap(loss, tiny_pair, hf_teacher, prompts, tmp_path):
    teacher, student = tiny_pair
    extra = {"loss.type": loss}
    if loss == "full_vocab":
        extra["teacher.local"] = teacher  # the whole teacher distribution: in-process teacher
    cfg = load_config(None, overrides(student, hf_teacher.url, prompts, tmp_path, 12, **extra))
    OPDTrainer(cfg).train()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    kl0, kl1 = trend(rows, "opd/reverse_kl")
    ov0, ov1 = trend(rows, "opd/overlap_ratio")
    assert kl1 < kl0, (loss, kl0, kl1)
    assert ov1 > ov0, (loss, ov0, ov1)
    for key in (
        "opd/overlap_advantage",
        "opd/entropy_gap",
        "opd/student_shared_mass",
        "opd/teacher_shared_mass",
        "rollout/response_length",
        "rollout/eos_rate",
        "time/teacher_wait_share",
        "time/tokens_per_s",
    ):
        assert key in rows[-1] and np.isfinite(rows[-1][key]), key
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "model.safetensors").exists()


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "student_trainer", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(r["step"] >= step for r in read_jsonl(metrics)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference_run(tiny_pair, prompts, tmp_path_factory):
    """An uninterrupted 6-step run against its own teacher (same port reused by the kill tests)."""
    teacher = TeacherProcess(tiny_pair[0], "--max-top-k", "64")
    with teacher:
        out = tmp_path_factory.mktemp("reference")
        proc = _cli(
            ["train", *overrides(tiny_pair[1], teacher.url, prompts, out, 6, **{"train.save_every": 2})]
        )
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
    return teacher, [r["opd/loss"] for r in read_jsonl(out / "metrics.jsonl")]


def test_teacher_killed_and_restarted_loses_no_step(tiny_pair, prompts, reference_run, tmp_path):
    teacher, ref = reference_run
    teacher.start()
    try:
        proc = _cli(["train", *overrides(tiny_pair[1], teacher.url, prompts, tmp_path, 6)])
        _wait_for_step(tmp_path / "metrics.jsonl", 2, proc)
        teacher.stop(kill=True)
        time.sleep(4)  # the trainer is now retrying with backoff
        teacher.start()
        log, _ = proc.communicate(timeout=600)
    finally:
        teacher.stop()
    assert proc.returncode == 0, log
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # none lost, none repeated
    assert sum(r.get("teacher/failures", 0) for r in rows) > 0, "the outage was not noticed"
    np.testing.assert_allclose([r["opd/loss"] for r in rows], ref, rtol=1e-4)


def test_trainer_killed_and_resumed_matches_uninterrupted_run(tiny_pair, prompts, reference_run, tmp_path):
    teacher, ref = reference_run
    teacher.start()
    try:
        args = [
            "train",
            *overrides(tiny_pair[1], teacher.url, prompts, tmp_path, 6, **{"train.save_every": 2}),
        ]
        proc = _cli(args)
        _wait_for_step(tmp_path / "metrics.jsonl", 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (tmp_path / "checkpoints").exists()
        resumed = _cli([*args, "--resume"])
        log, _ = resumed.communicate(timeout=600)
    finally:
        teacher.stop()
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["opd/loss"] for r in rows], ref, rtol=1e-4)


def launch_two_processes(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``student-trainer train`` in 2 CPU processes (gloo). Not ``accelerate launch --cpu
    --num_processes 2``: on one machine that starts ONE process (accelerate's simple launcher); torchrun
    with ``ACCELERATE_USE_CPU`` is what gives accelerate a 2-process MULTI_CPU world."""
    from devkit.teacher_process import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port())]  # 0 is not "any port" for torchrun: the workers hang
    cmd += ["-m", "student_trainer", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed: world size 2, DistributedType.MULTI_CPU" in proc.stdout, proc.stdout[-3000:]
    return proc


def test_two_processes_with_torchrun(tiny_pair, hf_teacher, prompts, tmp_path):
    launch_two_processes(overrides(tiny_pair[1], hf_teacher.url, prompts, tmp_path, 3))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 writes once per step
    assert all(r["rollout/tokens"] > 0 and np.isfinite(r["opd/loss"]) for r in rows)
    # both processes' rollouts are counted: 8 prompts per step over 2 processes, 16 tokens at most each
    assert all(r["rollout/tokens"] <= 8 * 16 for r in rows)
    assert (tmp_path / "model.safetensors").exists()


def test_config_errors_are_clear(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "student_trainer", "train", "loss.type=kl", "train.steps=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "loss.type='kl' is unknown" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "student_trainer", "train", "train.steps=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "model.student is empty" in proc.stdout
