"""A LoRA student (``model.lora``) trained end to end: real peft, the tiny pair, a real teacher-server over HTTP.

- the run learns (the reverse KL falls, the overlap rises) while only the adapter trains;
- ``--resume`` from a LoRA checkpoint replays the remaining steps exactly;
- the saved adapter loads with ``peft.PeftModel.from_pretrained`` on the base model, and its log-probs equal
  those of the ``--merge`` save of the same run (loaded with plain ``from_pretrained``, no peft) and differ
  from the base model's (so the adapter really moved).
"""

from __future__ import annotations

import shutil

import numpy as np
import torch

from student_trainer.config import load_config
from student_trainer.opd.trainer import OPDTrainer
from student_trainer.tracking import read_jsonl

STEPS = 12


def _cfg(student, url, data, out, **extra):
    base = {
        "model.student": student,
        "model.lora": "{r: 8, alpha: 16}",
        "teacher.urls": f"[{url}]",
        "data.path": data,
        "train.steps": STEPS,
        "train.prompts_per_step": 8,
        "train.micro_batch_prompts": 4,
        "train.save_every": 8,
        "rollout.max_new_tokens": 16,
        "optim.lr": 1e-2,
        "train.output_dir": out,
        "logging.progress_bar": "false",
        "logging.plot": "false",
        "train.sample_every": 0,
    }
    base.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_lora_run_learns_resumes_and_saves_adapter_and_merged(tiny_pair, hf_teacher, prompts, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    teacher, student = tiny_pair
    run = tmp_path / "run"
    OPDTrainer(_cfg(student, hf_teacher.url, prompts, run)).train()
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    kl = [r["opd/reverse_kl"] for r in rows]
    ov = [r["opd/overlap_ratio"] for r in rows]
    assert np.mean(kl[-4:]) < np.mean(kl[:4]) and np.mean(ov[-4:]) > np.mean(ov[:4]), (kl, ov)
    assert (run / "adapter_config.json").exists() and (run / "adapter_model.safetensors").exists()
    assert not (run / "model.safetensors").exists()  # the adapter only, not a second copy of the model

    # resume from step 8 into a copy of the run, saving the merged model this time
    merged = tmp_path / "merged"
    shutil.copytree(run, merged)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (merged / f).unlink()
    OPDTrainer(
        _cfg(student, hf_teacher.url, prompts, merged, **{"train.merge_lora": "true"}), resume=True
    ).train()
    again = read_jsonl(merged / "metrics.jsonl")
    np.testing.assert_allclose([r["opd/loss"] for r in again], [r["opd/loss"] for r in rows], rtol=1e-5)
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()

    ids = list(range(3, 40))
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    base_lp = _logprobs(base, ids)
    adapted = peft.PeftModel.from_pretrained(base, run).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    lp_adapter, lp_merged = _logprobs(adapted, ids), _logprobs(plain, ids)
    torch.testing.assert_close(lp_adapter, lp_merged, rtol=1e-4, atol=1e-4)
    assert (lp_adapter - base_lp).abs().max() > 1e-2  # the adapter changed the model
