"""What a training step asks of a teacher, whoever serves it (an HTTP endpoint pool or an in-process model).

    pending = teacher.submit(prompts, rollouts, top_k, temperature=t)   # sent at once: scored meanwhile
    pending.wait()                                       # optional: block until the answer is in
    scores = pending.result()                            # TeacherScores, one ScoredSequence per sample

The request is the same for every caller (``train``, ``probe``, ``preflight``): the prompt in the teacher's
form (``Prompt.teacher_fields``: token ids, or chat messages the teacher renders with its own template), the
student's completion ids, the student's top-k ids as candidates when the teacher can score them, and the
teacher's entropy when it can compute it. ``temperature`` is the rollout's: the teacher's logits are divided
by it, so both sides of the KL are the tempered distributions (a teacher that cannot is refused at connect).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.wire import ScoredSequence

if TYPE_CHECKING:
    import torch

    from student_trainer.data.prompts import Prompt
    from student_trainer.rollout.base import RolloutBatch


@dataclass
class TeacherScores:
    """The teacher's answer for one micro-batch: ``scores[i]`` belongs to ``rollouts.samples[i]``.
    ``logits(a, b)`` gives the teacher's full-vocabulary logits of completion rows [a, b) (in-process only)."""

    scores: list[ScoredSequence]
    logits: Callable[[int, int], torch.Tensor] | None = None


class PendingScores(ABC):
    @abstractmethod
    def wait(self) -> None:
        """Block until the answer is available (a no-op where it is computed on demand)."""

    @abstractmethod
    def result(self) -> TeacherScores: ...


class Teacher(ABC):
    """A teacher as the training step sees it. ``capabilities``: what it can return, e.g.
    ``{"candidate_ids": True, "entropy": True}`` (the weakest endpoint decides)."""

    capabilities: dict[str, bool]
    description: str = "teacher"

    @abstractmethod
    def submit(
        self, prompts: Sequence[Prompt], rollouts: RolloutBatch, top_k: int, *, temperature: float = 1.0
    ) -> PendingScores:
        """Ask for the scores of every sample of ``rollouts`` (``prompts[s.prompt_index]`` is its prompt),
        from the teacher's log_softmax(logits / temperature); ``TeacherScores.logits`` is divided by it too."""

    def stats(self) -> dict[str, Any]:
        """Transport metrics since the last call (``teacher/*`` keys); none for an in-process teacher."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections / memory."""


def score_inputs(
    prompts: Sequence[Prompt], rollouts: RolloutBatch, with_candidates: bool
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """The sequences of one micro-batch in the protocol's terms, and the student's top-k ids as candidates."""
    seqs = [
        {**prompts[s.prompt_index].teacher_fields(), "completion_ids": s.completion_ids.numpy()}
        for s in rollouts.samples
    ]
    cands = [s.topk_ids.numpy() for s in rollouts.samples] if with_candidates else None
    return seqs, cands
