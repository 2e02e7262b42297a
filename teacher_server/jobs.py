"""Backend-neutral units of work (server-internal): one scoring job per sequence, one set of sampling
parameters per generate request. What backends return is the shared contract: :class:`shared.wire.ScoredSequence`
and :class:`shared.wire.GeneratedSample`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ScoreJob:
    """One sequence to score, already tokenized and validated."""

    prompt_ids: np.ndarray  # (P,) int64, P >= 1
    completion_ids: np.ndarray  # (T,) int64, T >= 1
    top_k: int
    temperature: float = 1.0
    want_entropy: bool = False
    candidate_ids: np.ndarray | None = None  # (T, K) int64

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_ids.shape[0] + self.completion_ids.shape[0])


@dataclass
class GenerateParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
