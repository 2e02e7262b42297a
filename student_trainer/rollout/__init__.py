"""Rollout engines: who samples the student's completions. One registry, read by config validation
(``rollout.engine``) and by :func:`build_rollout_engine`, which ``train``, ``probe`` and ``preflight`` call.

A new engine is one module with ``build(cfg, model, tokenizer, accelerator) -> RolloutEngine`` (see
``rollout.base`` for the contract) plus one row here. Engines are imported only when built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from student_trainer.rollout.base import RolloutEngine

# rollout.engine name -> module exposing build()
ENGINES: dict[str, str] = {
    "hf": "student_trainer.rollout.hf",
    "vllm": "student_trainer.rollout.vllm",
}


def build_rollout_engine(cfg: Any, model: Any, tokenizer: Any, accelerator: Any = None) -> RolloutEngine:
    """The engine ``cfg.rollout.engine`` names, sampling from ``model`` (the trained module)."""
    return importlib.import_module(ENGINES[cfg.rollout.engine]).build(cfg, model, tokenizer, accelerator)
