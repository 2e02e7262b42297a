"""Backend-neutral units of work (server-internal): one scoring job per sequence, tokenized and validated.

A job carries its request's :class:`shared.protocol.ScoreOptions` as is, and generation receives the
request's :class:`shared.protocol.GenerateOptions` as is, so a new request option is a field in
``shared/protocol.py`` plus the backend code that honours it. What backends return is the shared contract:
:class:`shared.wire.ScoredSequence` and :class:`shared.wire.GeneratedSample`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.protocol import ScoreOptions


@dataclass
class ScoreJob:
    """One sequence to score, already tokenized and validated."""

    prompt_ids: np.ndarray  # (P,) int64, P >= 1
    completion_ids: np.ndarray  # (T,) int64, T >= 1
    options: ScoreOptions = field(default_factory=ScoreOptions)
    candidate_ids: np.ndarray | None = None  # (T, K) int64

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_ids.shape[0] + self.completion_ids.shape[0])

    @property
    def top_k(self) -> int:
        return self.options.top_k

    @property
    def temperature(self) -> float:
        return self.options.temperature

    @property
    def want_entropy(self) -> bool:
        return self.options.return_entropy
