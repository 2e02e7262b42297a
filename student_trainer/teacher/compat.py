"""Can these teacher endpoints serve this student and this loss? Checked once, before training starts.

The tokenizer fingerprints must match (the teacher's log-probs are read at the student's token ids), each
endpoint must report the capabilities the loss needs (``LossSpec.needs`` in ``opd.loss_table``) and, at a
rollout temperature other than 1, the ``temperature`` capability (the loss compares the tempered
distributions). A teacher that normalises over more ids than the student's tokenizer has (padded output rows)
is accepted with a warning.
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
    temperature: float = 1.0,
    student_vocab_size: int | None = None,
) -> list[str]:
    """Refuse a teacher that cannot serve this student and loss; returns warnings (an overridden mismatch,
    a teacher normalising over padded rows).

    ``needs`` names capabilities (``shared.protocol.Capabilities`` fields); ``needs_candidate_ids`` and
    ``needs_entropy`` are shorthands for two of them. Fingerprints must match unless ``allow_mismatch``;
    capabilities cannot be overridden. ``temperature`` is ``rollout.temperature``: other than 1 it needs the
    ``temperature`` capability. ``student_vocab_size`` is ``len(student tokenizer)`` (default: the teacher's
    tokenizer length, the same one when the fingerprints match).
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
        if temperature != 1.0 and not inf.capabilities.temperature:
            raise TeacherIncompatible(
                f"teacher {url} ({inf.backend} backend) scores at temperature 1 only "
                f"(capabilities.temperature = false), but rollout.temperature={temperature}: the loss must "
                "compare the tempered distributions the tokens were sampled from, so the teacher's log-probs "
                "must be at the same temperature; set rollout.temperature=1.0 or serve the teacher with the hf "
                "backend"
            )
        normalised = inf.normalized_vocab_size
        student_ids = student_vocab_size if student_vocab_size is not None else inf.vocab_size
        if normalised is not None and normalised > student_ids:
            msg = (
                f"teacher {url} ({inf.backend} backend) normalises its log-probs over {normalised} ids, the "
                f"student's tokenizer has {student_ids}: the {normalised - student_ids} padded output rows "
                "take some of the teacher's mass, so its log-probs at real ids are biased low (by "
                "-log(1 - padded mass)); usually negligible for trained models"
            )
            log.warning("%s", msg)
            warnings.append(msg)
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
