"""Pieces that `train`, `probe` and `preflight` build the same way from one Config."""

from __future__ import annotations

import os
from typing import Any

from student_trainer.config import Config


def build_rollout_engine(cfg: Config, model: Any, tokenizer: Any):
    """The transformers rollout engine on the trained module; sampling is restricted to tokenizer ids when
    the output layer is padded beyond the tokenizer (Qwen: 151,936 rows, 151,669 tokens)."""
    from student_trainer.rollout import HFRolloutEngine

    rows = model.get_output_embeddings().weight.shape[0]
    return HFRolloutEngine(
        model,
        tokenizer,
        cache_implementation="static" if cfg.rollout.static_cache else None,
        prompt_pad_multiple=64 if cfg.rollout.static_cache else 1,  # fewer shapes to compile
        vocab_limit=len(tokenizer) if rows > len(tokenizer) else None,
    )


def connect_teacher(cfg: Config, student_fingerprint: str):
    """Client for ``cfg.teacher.urls``, checked against the student and the loss.

    Returns ``(client, infos, warnings)``; raises ``TeacherIncompatible`` (tokenizer fingerprint differs and
    the mismatch is not allowed, or a capability the loss needs is missing) after closing the client.
    """
    from student_trainer.teacher_client import SyncTeacherClient, check_compatibility

    t, lo = cfg.teacher, cfg.loss
    client = SyncTeacherClient(
        t.urls,
        api_key=t.api_key or os.environ.get("TEACHER_API_KEY"),
        timeout_s=t.timeout_s,
        max_wait_s=t.max_retry_wait_s,
        max_sequences_per_request=t.max_sequences_per_request,
    )
    try:
        infos = client.model_info()
        warnings = check_compatibility(
            infos,
            student_fingerprint,
            needs_candidate_ids=lo.type == "student_topk",
            top_k=lo.top_k,
            allow_mismatch=t.allow_tokenizer_mismatch,
        )
    except BaseException:
        client.close()
        raise
    return client, infos, warnings


def capabilities(infos: dict[str, Any]) -> dict[str, bool]:
    """What every endpoint can do (the weakest one decides)."""
    caps = [i.capabilities for i in infos.values()]
    return {"candidate_ids": all(c.candidate_ids for c in caps), "entropy": all(c.entropy for c in caps)}
