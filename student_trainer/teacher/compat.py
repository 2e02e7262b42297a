"""Can these teacher endpoints serve this student and this loss? Checked once, before training starts.

The tokenizer fingerprints must match (the teacher's log-probs are read at the student's token ids) and each
endpoint must report the capabilities the loss needs (``LossSpec.needs`` in ``opd.loss_table``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from shared.protocol import ModelInfo
from student_trainer.teacher.errors import TeacherIncompatible

log = logging.getLogger("student_trainer.teacher.client")

# capability -> (what it is, who needs it, what to do without it)
_CAPABILITY_HELP = {
    "candidate_ids": (
        "return log-probs at the student's candidate ids",
        "the student-top-k loss needs",
        "serve the teacher with the hf backend or choose a loss that needs only the teacher's top-k",
    ),
    "entropy": (
        "return its entropy",
        "the entropy-gap metric needs",
        "disable the entropy-gap metric or serve the teacher with the hf backend",
    ),
}


def check_compatibility(
    info: ModelInfo | Mapping[str, ModelInfo],
    student_tokenizer_fingerprint: str,
    *,
    needs: Iterable[str] = (),
    needs_candidate_ids: bool = False,
    needs_entropy: bool = False,
    top_k: int | None = None,
    allow_mismatch: bool = False,
) -> list[str]:
    """Refuse a teacher that cannot serve this student and loss; returns warnings (an overridden mismatch).

    ``needs`` names capabilities (``shared.protocol.Capabilities`` fields); ``needs_candidate_ids`` and
    ``needs_entropy`` are shorthands for two of them. Fingerprints must match unless ``allow_mismatch``;
    capabilities cannot be overridden.
    """
    wanted = list(dict.fromkeys([*needs, *(["candidate_ids"] if needs_candidate_ids else [])]))
    wanted += ["entropy"] if needs_entropy and "entropy" not in wanted else []
    infos = info if isinstance(info, Mapping) else {"(URL not given)": info}
    warnings: list[str] = []
    for url, inf in infos.items():
        if inf.tokenizer_fingerprint != student_tokenizer_fingerprint:
            msg = (
                f"teacher {url} ({inf.model}) uses tokenizer {inf.tokenizer_fingerprint}, the student "
                f"{student_tokenizer_fingerprint}: on-policy distillation compares log-probs token id by "
                "token id, so both must share one tokenizer (e.g. the same model family)"
            )
            if not allow_mismatch:
                raise TeacherIncompatible(msg + "; override only if you know the ids agree (allow_mismatch)")
            log.warning("%s; continuing because the mismatch was explicitly allowed", msg)
            warnings.append(msg)
        for cap in wanted:
            if not getattr(inf.capabilities, cap):
                what, who, fix = _CAPABILITY_HELP.get(
                    cap, (f"provide {cap}", "this loss needs", "use another")
                )
                raise TeacherIncompatible(
                    f"teacher {url} ({inf.backend} backend) cannot {what} (capabilities.{cap} = false), which "
                    f"{who}; {fix}"
                )
        if top_k is not None and top_k > inf.max_top_k:
            raise TeacherIncompatible(
                f"teacher {url} allows top_k up to {inf.max_top_k}, the loss asks {top_k}; lower the loss's "
                f"top_k or start the teacher with --max-top-k {top_k}"
            )
    return warnings


def common_capabilities(infos: Mapping[str, ModelInfo]) -> dict[str, bool]:
    """What every endpoint can do (the weakest one decides): the options the trainer asks for."""
    caps = [i.capabilities for i in infos.values()]
    return {"candidate_ids": all(c.candidate_ids for c in caps), "entropy": all(c.entropy for c in caps)}
