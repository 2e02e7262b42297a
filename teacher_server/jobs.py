"""Backend-neutral units of work: one scoring job per sequence, one generation job per prompt."""

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
class ScoreResult:
    """Teacher scores of one sequence (NumPy, wire dtypes). T = completion length."""

    logprobs: np.ndarray  # (T,) float32
    topk_ids: np.ndarray  # (T, k) int32
    topk_logprobs: np.ndarray  # (T, k) float32
    candidate_logprobs: np.ndarray | None = None  # (T, K) float32
    entropy: np.ndarray | None = None  # (T,) float32


@dataclass
class GenerateParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None


@dataclass
class GeneratedSample:
    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    cumulative_logprob: float | None
