"""A pool of ``teacher-server`` endpoints as a :class:`~student_trainer.teacher.base.Teacher`."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from shared.protocol import ModelInfo
from student_trainer.teacher.base import PendingScores, Teacher, TeacherScores, score_inputs
from student_trainer.teacher.client import SyncTeacherClient
from student_trainer.teacher.compat import common_capabilities

if TYPE_CHECKING:
    from student_trainer.data.prompts import Prompt
    from student_trainer.rollout.base import RolloutBatch


class _Pending(PendingScores):
    def __init__(self, future: concurrent.futures.Future) -> None:
        self.future = future

    def wait(self) -> None:
        self.future.result()

    def result(self) -> TeacherScores:
        return TeacherScores(self.future.result())


class RemoteTeacher(Teacher):
    """Scores over HTTP (msgpack), retried with backoff by the client; ``infos`` maps URL -> ModelInfo."""

    def __init__(self, client: SyncTeacherClient, infos: Mapping[str, ModelInfo]) -> None:
        self.client, self.infos = client, dict(infos)
        self.capabilities = common_capabilities(self.infos)
        self.description = ", ".join(f"{u} ({i.model}, {i.backend})" for u, i in self.infos.items())

    def submit(
        self, prompts: Sequence[Prompt], rollouts: RolloutBatch, top_k: int, *, temperature: float = 1.0
    ) -> PendingScores:
        seqs, cands = score_inputs(prompts, rollouts, self.capabilities["candidate_ids"])
        future = self.client.score_future(
            seqs,
            top_k=top_k,
            return_entropy=self.capabilities["entropy"],
            candidate_ids=cands,
            temperature=temperature,
        )
        return _Pending(future)

    @property
    def has_chat_template(self) -> bool:
        return all(i.chat_template for i in self.infos.values())

    def stats(self) -> dict[str, Any]:
        return self.client.take_stats().summary()

    def close(self) -> None:
        self.client.close()
