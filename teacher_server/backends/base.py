"""The interface every teacher backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from shared.protocol import Capabilities, GenerateOptions
from shared.wire import GeneratedSample, ScoredSequence
from teacher_server.jobs import ScoreJob


class Backend(ABC):
    """A loaded teacher. ``load`` runs once in the app's lifespan; the rest is called per request."""

    name: str = "base"
    tokenizer: Any = None
    max_model_len: int = 0
    model_vocab_size: int = 0
    # ids [0, n) the log-probs are normalised over (``ModelInfo.normalized_vocab_size``); None = all
    # model_vocab_size rows of the output layer
    normalized_vocab_size: int | None = None

    @abstractmethod
    async def load(self) -> None:
        """Load weights and tokenizer; afterwards the attributes above are set."""

    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    async def score(self, jobs: list[ScoreJob]) -> list[ScoredSequence]:
        """Score sequences; results in the order of ``jobs``, each with the job's ``completion_ids`` and
        ``prompt_tokens = len(job.prompt_ids)`` (``tokens`` is left for the service to fill).

        A request this backend cannot serve raises :class:`teacher_server.errors.UnsupportedRequest`."""

    @abstractmethod
    async def generate(
        self, prompts: list[list[int]], params: GenerateOptions
    ) -> list[list[GeneratedSample]]:
        """Sample ``params.n`` completions per prompt; results in prompt order."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (engines, threads)."""

    def stats(self) -> dict[str, float]:
        """Backend-specific gauges for /metrics (queue depth etc.)."""
        return {}
