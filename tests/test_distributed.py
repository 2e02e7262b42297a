"""The trainer sharded across processes through accelerate, launched as users launch it
(``accelerate launch --config_file configs/accelerate/{fsdp,zero3}.yaml``), on CPU: 2 processes over gloo.

- FSDP2: each process really holds about half of the parameters (the trainer prints every rank's share;
  the two shares add up to the model), the per-step losses equal a 1-process run's, the final model is one
  Hugging Face directory whose weights equal the 1-process run's, and ``--resume`` from a sharded checkpoint
  replays the remaining steps exactly.
- DeepSpeed ZeRO-3 (deepspeed's CPU accelerator; skipped where deepspeed is not installed): the same.

The 1-process reference and the 2-process runs sample the same rollouts: one prompt per micro-batch, and the
rollout seed of a micro-batch is its index in the step whatever the number of processes
(``opd.step.rollout_seed``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from devkit.teacher_process import free_port
from student_trainer.errors import ConfigError
from student_trainer.opd.distributed import compute_precision
from student_trainer.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
STEPS = 4


def _args(student, url, data, out, **extra) -> list[str]:
    base = {
        "model.student": student,
        "teacher.urls": f"[{url}]",
        "data.path": data,
        "train.steps": STEPS,
        "train.prompts_per_step": 4,
        "train.micro_batch_prompts": 1,  # one prompt per micro-batch: the same rollouts on 1 or 2 processes
        "train.save_every": 2,
        "rollout.max_new_tokens": 12,
        "optim.lr": 3e-3,
        "train.output_dir": out,
        "logging.progress_bar": "false",
        "logging.plot": "false",
        "train.sample_every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], timeout: float = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def accelerate_launch(config: str, args: list[str], resume: bool = False) -> str:
    """``accelerate launch --config_file configs/accelerate/<config> --num_processes 2`` of ``train``; the
    shipped file as it is, with the precision set to fp32 for the comparison with the 1-process run."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no"]
    cmd += ["-m", "student_trainer", "train", *args] + (["--resume"] if resume else [])
    return _run(cmd)


def _losses(out: Path) -> list[float]:
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["opd/loss"] for r in rows]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def single(tiny_pair, hf_teacher, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _run(
        [sys.executable, "-m", "student_trainer", "train", *_args(tiny_pair[1], hf_teacher.url, prompts, out)]
    )
    return out


def _check_sharded_run(log: str, out: Path, single: Path, sharding: str) -> None:
    assert f"world size 2, DistributedType.{'FSDP' if sharding == 'fsdp2' else 'DEEPSPEED'}" in log, log[
        -3000:
    ]
    assert f"sharding {sharding}" in log
    shares = {
        int(r): (int(a), int(t))
        for r, a, t in re.findall(r"rank (\d)/2 holds (\d+) of (\d+) parameters", log)
    }
    assert set(shares) == {0, 1}, log[-3000:]
    total = shares[0][1]
    assert shares[1][1] == total and shares[0][0] + shares[1][0] == total
    for local, _ in shares.values():
        assert 0.45 < local / total < 0.55, shares  # really sharded: half each, not two copies
    np.testing.assert_allclose(_losses(out), _losses(single), rtol=2e-4)
    # the final model: one Hugging Face directory, equal to the 1-process run's
    assert (out / "model.safetensors").exists() and not list(out.glob("pytorch_model_fsdp*"))
    mine, ref = _weights(out), _weights(single)
    assert mine.keys() == ref.keys()
    for name in ref:
        # atol: Adam (eps 1e-8) turns reduction-order rounding on a row with a near-zero gradient into a
        # visible step; measured worst case 7e-5 (ZeRO-3, one embedding row) against a 3.5e-3 movement
        torch.testing.assert_close(mine[name], ref[name], rtol=1e-3, atol=1e-4, msg=name)


def _check_resume(config: str, out: Path, args: list[str]) -> None:
    """Resume from the step-2 checkpoint of a finished run: steps 3 and 4 again, the same losses."""
    first = _losses(out)
    log = accelerate_launch(config, args, resume=True)
    assert "resumed from" in log and "checkpoint-0000002" in log, log[-3000:]
    np.testing.assert_allclose(_losses(out), first, rtol=1e-5)


def test_fsdp2_shards_matches_one_process_and_resumes(tiny_pair, hf_teacher, prompts, single, tmp_path):
    args = _args(tiny_pair[1], hf_teacher.url, prompts, tmp_path)
    log = accelerate_launch("fsdp.yaml", args)
    _check_sharded_run(log, tmp_path, single, "fsdp2")
    assert list((tmp_path / "checkpoints").glob("checkpoint-0000002/pytorch_model_fsdp_0"))  # sharded DCP
    _check_resume("fsdp.yaml", tmp_path, args)


def test_deepspeed_zero3_shards_matches_one_process_and_resumes(
    tiny_pair, hf_teacher, prompts, single, tmp_path
):
    pytest.importorskip("deepspeed", reason="deepspeed not installed (the dev extra installs it)")
    args = _args(tiny_pair[1], hf_teacher.url, prompts, tmp_path)
    log = accelerate_launch("zero3.yaml", args)
    _check_sharded_run(log, tmp_path, single, "zero3")
    _check_resume("zero3.yaml", tmp_path, args)


def test_ddp_config_runs_two_processes_like_one(tiny_pair, hf_teacher, prompts, single, tmp_path):
    log = accelerate_launch("ddp.yaml", _args(tiny_pair[1], hf_teacher.url, prompts, tmp_path))
    assert "world size 2, DistributedType.MULTI_CPU, sharding none" in log, log[-3000:]
    np.testing.assert_allclose(_losses(tmp_path), _losses(single), rtol=2e-4)


def test_fsdp1_is_refused_with_the_fix(tiny_pair, hf_teacher, prompts, tmp_path):
    cfg = tmp_path / "fsdp1.yaml"
    cfg.write_text((CONFIGS / "fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg)]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no"]
    cmd += ["-m", "student_trainer", "train", *_args(tiny_pair[1], hf_teacher.url, prompts, tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode != 0
    assert "fsdp_version: 2" in proc.stdout + proc.stderr


def test_precision_rule():
    assert compute_precision("auto", gpu=True, launcher=None) == "bf16"  # fp32 master, bf16 compute
    assert compute_precision("auto", gpu=False, launcher=None) == "no"
    assert compute_precision("auto", gpu=False, launcher="bf16") == "bf16"  # the launch wins for compute
    assert compute_precision("bfloat16", gpu=True, launcher=None) == "no"  # bf16 weights compute in bf16
    assert compute_precision("bfloat16", gpu=True, launcher="bf16") == "bf16"
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 .* mixed_precision=fp16"):
        compute_precision("bfloat16", gpu=True, launcher="fp16")
    with pytest.raises(ConfigError, match="mixed_precision='fp8'"):
        compute_precision("auto", gpu=True, launcher="fp8")


def test_shipped_configs_are_accelerate_configs():
    """Each file loads with accelerate's own config loader and says what its name says."""
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "zero3.yaml": "DEEPSPEED"}
    for name, kind in kinds.items():
        cfg = load_config_from_file(str(CONFIGS / name))
        assert str(cfg.distributed_type).endswith(kind), (name, cfg.distributed_type)
    assert load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    assert load_config_from_file(str(CONFIGS / "zero3.yaml")).deepspeed_config["zero_stage"] == 3
