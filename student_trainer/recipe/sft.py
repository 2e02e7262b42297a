"""Supervised fine-tuning of the student on (filtered) teacher rollouts: the off-policy cold start.

Full-parameter SFT with accelerate, cross-entropy on completion tokens only (token mean over the global
batch), right padding, AdamW + schedule + clipping, checkpoint / ``resume``, the same JSONL metrics, step
line and plot as ``train``. The output directory is a ``save_pretrained`` model + tokenizer: pass it as the
student of ``train``.

Records (JSONL): the prompt as ``prompt_ids``, or ``question`` / ``messages`` rendered with the student's
template (``student_template``: "chat" or a ``{question}`` string); the completion as ``completion_ids``
(as written by ``student-trainer generate``, EOS included when the teacher stopped) or ``completion`` text
(tokenized, EOS appended when ``finish_reason`` is "stop" or absent).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from student_trainer.errors import ConfigError, DataError
from student_trainer.opd import checkpoint
from student_trainer.opd.chunked import gather_logprobs
from student_trainer.opd.optim import build_optimizer, build_scheduler
from student_trainer.opd.policy import HiddenStatesLM, load_causal_lm, pack, resolve_dtype
from student_trainer.tracking import JsonlLog, plot_metrics, summary_line


class SFTDataError(DataError):
    """A record that cannot become a training example; the message names the line and the field."""


@dataclass
class SFTConfig:
    model: str
    data: str
    output_dir: str = "runs/sft"
    steps: int | None = None  # default: epochs over the data
    epochs: float = 1.0
    batch_size: int = 64  # sequences per optimizer step, global
    micro_batch: int = 8  # sequences per forward, per process
    lr: float = 1e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_length: int = 8192
    student_template: str = "chat"
    system_prompt: str | None = None
    question_field: str = "question"
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 1
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    resume: bool = False
    log_every: int = 1
    plot: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch < 1:
            raise ConfigError(f"batch_size={self.batch_size} and micro_batch={self.micro_batch} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be >= 1 (or leave it unset to use epochs)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")


def load_examples(cfg: SFTConfig, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) per record; records longer than max_length are truncated at the end."""
    from student_trainer.data.prompts import PromptRenderer, PromptTemplates

    path = Path(cfg.data)
    if not path.exists():
        raise SFTDataError(f"data file {str(path)!r} does not exist")
    renderer = None
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "prompt_ids" in rec:
            prompt = list(rec["prompt_ids"])
        else:
            question = rec.get("messages") or rec.get(cfg.question_field)
            if question is None:
                raise SFTDataError(
                    f"{path}:{lineno}: no prompt: need prompt_ids, messages or "
                    f"{cfg.question_field!r} (fields: {sorted(rec)})"
                )
            renderer = renderer or PromptRenderer(
                tokenizer, PromptTemplates(cfg.student_template, "same", system_prompt=cfg.system_prompt)
            )
            prompt = renderer.render(question).student_ids
        if "completion_ids" in rec:
            completion = list(rec["completion_ids"])
        elif "completion" in rec:
            completion = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
            if rec.get("finish_reason", "stop") == "stop" and tokenizer.eos_token_id is not None:
                completion.append(tokenizer.eos_token_id)
        else:
            raise SFTDataError(f"{path}:{lineno}: no completion: need completion_ids or completion")
        if not completion:
            continue
        completion = completion[: max(1, cfg.max_length - len(prompt))]
        out.append((prompt[: cfg.max_length - len(completion)], completion))
    if not out:
        raise SFTDataError(f"{path}: no usable records")
    return out


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def run_sft(cfg: SFTConfig) -> Path:
    """Train; returns the output directory (a loadable model)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() and cfg.dtype == "auto" else "no"
    )
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if cfg.dtype == "auto" else resolve_dtype(cfg.dtype, accelerator.device)
    model, tokenizer = load_causal_lm(cfg.model, dtype, cfg.gradient_checkpointing)
    examples = load_examples(cfg, tokenizer)
    steps = cfg.steps or max(1, int(cfg.epochs * len(examples) / cfg.batch_size))
    policy = HiddenStatesLM(model)
    optimizer = build_optimizer(policy, cfg.lr, (0.9, 0.999), cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.warmup_steps, steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    start, position = 0, (0, 0)
    last = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if last is not None:
        state = checkpoint.load(accelerator, last)
        start, position = state["step"], tuple(state["data_position"])
        accelerator.print(f"resumed from {last} at step {start}")
    log = JsonlLog(out / "metrics.jsonl", resume_step=start) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        (out / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        accelerator.print(f"sft: {len(examples)} examples, {steps} steps x {cfg.batch_size} sequences")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in range(start, steps):
        t0 = time.perf_counter()
        batch, position = _take(examples, position, cfg.batch_size, cfg.seed)
        mine = batch[rank::world]
        tokens_local = torch.tensor(float(sum(len(c) for _, c in mine)), device=accelerator.device)
        tokens_global = accelerator.reduce(tokens_local.clone(), reduction="sum")
        loss_sum = 0.0
        micro = [mine[i : i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)]
        for i, mb in enumerate(micro):
            packed = pack([p for p, _ in mb], [c for _, c in mb], pad).to(accelerator.device)
            ctx = accelerator.no_sync(policy) if i < len(micro) - 1 else nullcontext()
            with ctx, accelerator.autocast():
                hidden = packed.hidden_at_completion(policy(packed.input_ids_B_L, packed.attention_mask_B_L))
                head = accelerator.unwrap_model(policy).head
                lp = gather_logprobs(hidden, head, packed.targets_N[:, None]).logprobs_N_M[:, 0]
                # token mean over the GLOBAL batch; DDP averages gradients over processes, hence * world
                loss = -lp.sum() / tokens_global.clamp_min(1) * world
                accelerator.backward(loss)
            loss_sum += float(-lp.detach().sum())
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_global = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), reduction="sum")
        metrics = {
            "step": step + 1,
            "sft/loss": float(loss_global / tokens_global.clamp_min(1)),
            "sft/tokens": int(tokens_global),
            "optim/lr": scheduler.get_last_lr()[0],
            "optim/grad_norm": None if grad_norm is None else float(grad_norm),
            "time/tokens_per_s": float(tokens_global) / (time.perf_counter() - t0),
        }
        if log is not None:
            log.write(metrics)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            accelerator.print(summary_line(step + 1, steps, {"opd/loss": metrics["sft/loss"], **metrics}))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            checkpoint.save(
                accelerator, out, step + 1, {"data_position": list(position)}, cfg.keep_checkpoints
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(policy).causal_lm.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if cfg.plot:
            plot_metrics(
                out / "metrics.jsonl",
                out / "sft_curves.png",
                keys=("sft/loss", "optim/lr", "optim/grad_norm"),
                title="SFT",
            )
        accelerator.print(f"saved the fine-tuned student to {out}")
    accelerator.end_training()
    return out


def _take(examples: list, position: tuple[int, int], n: int, seed: int) -> tuple[list, tuple[int, int]]:
    """The next ``n`` examples of the seeded per-epoch order, and the new (epoch, index) position."""
    epoch, index = position
    order = _order(len(examples), seed, epoch)
    batch = []
    while len(batch) < n:
        if index == len(examples):
            epoch, index = epoch + 1, 0
            order = _order(len(examples), seed, epoch)
        batch.append(examples[int(order[index])])
        index += 1
    return batch, (epoch, index)
