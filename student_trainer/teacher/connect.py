"""The teacher a config names, connected and checked against the student and the loss.

``train``, ``probe`` and ``preflight`` all call :func:`connect_teacher`: an HTTP endpoint pool for
``teacher.urls`` (speaking ``teacher.protocol``: teacher-server's opd protocol, or a stock vLLM server's
OpenAI API, checked by ``teacher.openai_connect``) or an in-process model for ``teacher.local``; the loss's
row in ``opd.loss_table`` says which capabilities the teacher must have, and ``rollout.temperature`` other
than 1 needs a teacher that scores at that temperature. Raises :class:`TeacherIncompatible` (tokenizers differ and the mismatch is not
allowed, or a capability is missing) after releasing what was opened; warns (``warn``) when the teacher
normalises over more ids than the student's tokenizer has.
"""

from __future__ import annotations

import os
from typing import Any

from shared.fingerprint import tokenizer_fingerprint
from student_trainer.config import Config, TeacherConfig
from student_trainer.opd.loss_table import loss_spec
from student_trainer.teacher.base import Teacher
from student_trainer.teacher.errors import TeacherIncompatible


def connect_teacher(
    cfg: Config,
    student_fingerprint: str,
    device: Any = None,
    warn: Any = print,
    student_vocab_size: int | None = None,
    student_tokenizer: Any = None,
) -> Teacher:
    """The configured teacher; ``device`` is where an in-process teacher runs; ``warn`` gets the warnings
    (an explicitly allowed tokenizer mismatch, a teacher normalising over padded rows);
    ``student_vocab_size``: ``len(student tokenizer)`` (default: the teacher's tokenizer length);
    ``student_tokenizer``: the student's tokenizer, which ``teacher.protocol=openai`` compares with the
    server's ``/tokenize`` (default: loaded from ``model.student``)."""
    if cfg.teacher.local:
        return _local(cfg, student_fingerprint, device)
    if cfg.teacher.protocol == "openai":
        return _openai(cfg, student_fingerprint, warn, student_tokenizer)
    return _remote(cfg, student_fingerprint, warn, student_vocab_size)


def client_options(t: TeacherConfig) -> dict[str, Any]:
    """The HTTP client settings of ``teacher.*`` shared by both protocols (key default: $TEACHER_API_KEY)."""
    return {
        "api_key": t.api_key or os.environ.get("TEACHER_API_KEY"),
        "timeout_s": t.timeout_s,
        "max_wait_s": t.max_retry_wait_s,
        "max_sequences_per_request": t.max_sequences_per_request,
    }


def _local(cfg: Config, student_fingerprint: str, device: Any) -> Teacher:
    import torch

    from student_trainer.teacher.local import LocalTeacher

    device = torch.device(device or "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    local = LocalTeacher(cfg.teacher.local, device, dtype, cfg.loss.chunk_rows)
    fp = tokenizer_fingerprint(local.tokenizer)
    if fp != student_fingerprint and not cfg.teacher.allow_tokenizer_mismatch:
        local.close()
        raise TeacherIncompatible(
            f"local teacher tokenizer {fp} differs from the student's {student_fingerprint}; "
            "set teacher.allow_tokenizer_mismatch=true only if the ids agree"
        )
    return local


def _openai(cfg: Config, student_fingerprint: str, warn: Any, tokenizer: Any) -> Teacher:
    from student_trainer.teacher.openai_connect import connect_openai

    if tokenizer is None:
        from transformers import AutoTokenizer

        m = cfg.model
        tokenizer = AutoTokenizer.from_pretrained(m.student, trust_remote_code=m.trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != student_fingerprint:
        raise TeacherIncompatible(
            f"the student tokenizer given to connect_teacher ({tokenizer_fingerprint(tokenizer)}) is not the "
            f"one fingerprinted ({student_fingerprint})"
        )
    return connect_openai(cfg, tokenizer, warn)


def _remote(cfg: Config, student_fingerprint: str, warn: Any, student_vocab_size: int | None) -> Teacher:
    from student_trainer.teacher.client import SyncTeacherClient
    from student_trainer.teacher.compat import check_compatibility
    from student_trainer.teacher.remote import RemoteTeacher

    t, lo = cfg.teacher, cfg.loss
    client = SyncTeacherClient(t.urls, **client_options(t))
    try:
        infos = client.model_info()
        warnings = check_compatibility(
            infos,
            student_fingerprint,
            needs=loss_spec(lo.type).needs,
            top_k=lo.top_k,
            allow_mismatch=t.allow_tokenizer_mismatch,
            temperature=cfg.rollout.temperature,
            student_vocab_size=student_vocab_size,
        )
    except BaseException:
        client.close()
        raise
    for w in warnings:
        warn(f"warning: {w}")
    return RemoteTeacher(client, infos)
