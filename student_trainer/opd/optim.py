"""AdamW and the learning-rate schedule shared by `train` and `sft`."""

from __future__ import annotations

import math

import torch

from student_trainer.errors import ConfigError


def build_optimizer(
    model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norm weights are not decayed)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # a ZeRO-3 parameter partitioned at load is an empty 1-d tensor; ds_shape is its real shape
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused on CUDA: one kernel, no foreach temporaries the size of the parameters at the step's peak
    on_cuda = bool(decay or no_decay) and (decay + no_decay)[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=on_cuda, foreach=not on_cuda)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base lr at a step: linear warm-up, then constant / linear decay / cosine to 0."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ConfigError(f"unknown schedule {schedule!r}; use constant, linear or cosine")

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
