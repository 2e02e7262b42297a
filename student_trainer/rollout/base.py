"""What every rollout engine returns and implements.

An engine samples ``n`` completions per prompt from the CURRENT student and records, for every position, the
student's top-k ids and log-probs of the distribution it samples from, log_softmax(logits / temperature)
over the tokenizer's ids, before top-p (greedy, temperature 0: temperature 1): the support S_t of the
student-top-k loss, and the same distribution the loss then differentiates (docs/OPD.md). After each
optimizer step the trainer calls ``sync_weights`` and the engine's ``policy_version`` tells which weights
sampled a batch (the loss refuses stale ones).

Alignment is the protocol's: position t is predicted from ``prompt + completion[:t]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from student_trainer.errors import ConfigError


@dataclass
class RolloutSample:
    """One completion. Shapes: P = prompt length, T = completion length, k = top_k_record."""

    prompt_index: int  # index into the prompt list given to generate
    sample_index: int  # 0..n-1 within its prompt's group
    prompt_ids: torch.Tensor  # (P,) int64
    completion_ids: torch.Tensor  # (T,) int64, includes the end-of-sequence token when finished
    topk_ids: torch.Tensor  # (T, k) int64
    topk_logprobs: torch.Tensor  # (T, k) float32
    sampled_logprobs: torch.Tensor  # (T,) float32, the same (tempered) distribution as topk_logprobs
    finished: bool  # True: ended with an end-of-sequence token; False: cut at max_new_tokens


@dataclass
class RolloutBatch:
    """``samples[i * n + j]`` is sample j of prompt i. ``policy_version`` = the engine's version at sampling."""

    samples: list[RolloutSample]
    policy_version: int
    n: int
    top_k: int

    @property
    def num_tokens(self) -> int:
        return sum(len(s.completion_ids) for s in self.samples)

    @property
    def eos_rate(self) -> float:
        return sum(s.finished for s in self.samples) / max(1, len(self.samples))


class RolloutEngine(ABC):
    """Samples from the current student. Implementations: :class:`HFRolloutEngine` (transformers
    ``generate`` on the trained module itself); an inference engine (vLLM) holds its own copy of the weights
    and refreshes it in ``sync_weights``."""

    policy_version: int = 0
    last_sync_s: float = 0.0  # wall time of the last sync_weights (the rollout/weight_sync_s metric)

    def sleep(self) -> None:  # noqa: B027 - optional hook
        """The trainer is about to train: release what the engine holds on the device (vllm on CUDA)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine (its own copy of the weights, its KV cache)."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        top_k_record: int = 16,
        seed: int | None = None,
    ) -> RolloutBatch:
        """``n`` completions per prompt (token ids), grouped by prompt. temperature 0 = greedy. With a seed the
        result is reproducible for the same prompts, settings and weights; without, the global RNG is used."""

    @abstractmethod
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights; increments ``policy_version``."""


def check_sampling_args(
    n: int, temperature: float, top_p: float, max_new_tokens: int, top_k_record: int
) -> None:
    """Raise ConfigError (a ValueError) naming the bad argument, its value and the allowed range."""
    checks = (
        ("n", n, n >= 1, ">= 1"),
        ("temperature", temperature, temperature >= 0 and temperature == temperature, ">= 0 (0 = greedy)"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
        ("top_k_record", top_k_record, top_k_record >= 0, ">= 0"),
    )
    for name, value, ok, limit in checks:
        if not ok:
            raise ConfigError(f"rollout {name}={value!r} is invalid: must be {limit}")


def check_request(
    prompts: Sequence[Sequence[int]],
    vocab_size: int,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    top_k_record: int,
) -> None:
    """Every engine's argument checks: :func:`check_sampling_args`, a top-k inside the vocabulary and a
    non-empty list of non-empty prompts. Raises ConfigError."""
    check_sampling_args(n, temperature, top_p, max_new_tokens, top_k_record)
    if top_k_record > vocab_size:
        raise ConfigError(f"top_k_record={top_k_record} exceeds the vocabulary ({vocab_size} ids)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("rollout prompts must be a non-empty list of non-empty token id lists")
