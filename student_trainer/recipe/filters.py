"""Rollout filters for the off-policy cold start (``student-trainer filter``): the paper drops incomplete
responses (no end-of-sequence) and degenerate repetitive ones before SFT (docs/OPD.md, section 6 "The recipe").

Input records (one per completion, as ``student-trainer generate`` writes them): ``completion`` (text),
``completion_ids`` (token ids; the EOS token included when the sample stopped, as vLLM and our teacher
server return them) and ``finish_reason`` ("stop" or "length"). Four filters, each with its own reason:

- ``empty``       the completion text is blank.
- ``too_short``   fewer than ``min_tokens`` content tokens (EOS excluded) or ``min_chars`` characters.
- ``incomplete``  ``finish_reason`` is not "stop" (e.g. "length": cut at the token budget). Without a
                  ``finish_reason``, a completion is complete when its last id is one of ``eos_token_ids``.
- ``repetition``  degenerate repetition, two detectors on the content tokens:
    * tail loop: the completion ENDS with the same p-gram repeated >= ``tail_min_repeats`` times
      (default 4) in a row, covering >= ``tail_min_span`` tokens (default 32), for some period
      p <= ``tail_max_period`` (default 64). A model stuck in a loop that still emitted EOS; short
      legitimate runs ("0000" in a number) stay below the span.
    * repeated n-grams: the fraction of the completion's ``ngram_size``-token windows (default 16) that
      already occurred earlier in it is > ``max_repeated_ngram_fraction`` (default 0.3). Natural reasoning
      rarely repeats 16-token windows; a completion that loops in the middle and recovers does. Set 1.0
      to disable; ``tail_min_repeats`` 0 disables the tail detector.

Without ``completion_ids`` the token-based checks use whitespace-separated words instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from student_trainer.errors import ConfigError, DataError

FILTERS = ("empty", "too_short", "incomplete", "repetition")
_HASH_BASE = np.uint64(1_000_003)


# ---------------------------------------------------------------- pure detectors


def repeated_ngram_fraction(ids_T: np.ndarray, n: int) -> float:
    """Fraction of the T-n+1 windows of ``n`` tokens that equal an earlier window; 0 when T < n.

    ids_T: int64 token ids. Windows are compared through a 64-bit polynomial hash (collisions have
    probability ~T^2 / 2^64, negligible at any realistic length).
    """
    if n < 1:
        raise ConfigError(f"ngram_size must be >= 1 (got {n})")
    T = len(ids_T)
    if T < n:
        return 0.0
    ids_T = np.asarray(ids_T).astype(np.uint64)
    windows = T - n + 1
    hash_W = np.zeros(windows, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2^64 by design
        for j in range(n):
            hash_W = hash_W * _HASH_BASE + ids_T[j : j + windows] + np.uint64(1)
    return 1.0 - len(np.unique(hash_W)) / windows


def tail_repeats(ids_T: np.ndarray, max_period: int) -> np.ndarray:
    """For each period p = 1..max_period: how many identical p-grams the sequence ends with, in a row.

    ids_T: token ids (T,). Returns repeats_P (P = max_period) int64; entry p-1 is the largest k such that
    the last k*p tokens are k copies of the last p tokens (1 when the tail does not repeat; 0 when T < p).
    """
    ids_T = np.asarray(ids_T)
    T = len(ids_T)
    repeats_P = np.zeros(max_period, dtype=np.int64)
    for p in range(1, min(max_period, T) + 1):
        # positions i with ids[i] == ids[i+p]; the tail is p-periodic over the trailing run of matches
        same_M = ids_T[:-p] == ids_T[p:] if p < T else np.zeros(0, dtype=bool)
        mismatches = np.flatnonzero(~same_M)
        run = len(same_M) - 1 - mismatches[-1] if len(mismatches) else len(same_M)
        repeats_P[p - 1] = (run + p) // p
    return repeats_P


def find_tail_loop(
    ids_T: np.ndarray, min_repeats: int, min_span: int, max_period: int
) -> tuple[int, int] | None:
    """(period, repeats) of the shortest-period tail loop with repeats >= min_repeats and
    period * repeats >= min_span tokens, or None."""
    if min_repeats <= 0:
        return None
    for p, k in enumerate(tail_repeats(ids_T, max_period).tolist(), start=1):
        if k >= min_repeats and k * p >= min_span:
            return p, k
    return None


# ---------------------------------------------------------------- record checks


@dataclass(frozen=True)
class FilterConfig:
    min_tokens: int = 1
    min_chars: int = 1
    drop_incomplete: bool = True
    ngram_size: int = 16
    max_repeated_ngram_fraction: float = 0.3
    tail_min_repeats: int = 4
    tail_min_span: int = 32
    tail_max_period: int = 64
    eos_token_ids: tuple[int, ...] = ()
    text_field: str = "completion"
    ids_field: str = "completion_ids"
    finish_field: str = "finish_reason"

    def __post_init__(self) -> None:
        for name in ("min_tokens", "min_chars", "tail_min_repeats", "tail_min_span"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.ngram_size < 1:
            raise ConfigError(f"ngram_size must be >= 1 (got {self.ngram_size})")
        if self.tail_max_period < 1:
            raise ConfigError(f"tail_max_period must be >= 1 (got {self.tail_max_period})")
        if not 0.0 <= self.max_repeated_ngram_fraction <= 1.0:
            raise ConfigError(
                f"max_repeated_ngram_fraction must be in [0, 1] (got {self.max_repeated_ngram_fraction})"
            )


def _content_tokens(
    record: dict[str, Any], config: FilterConfig, where: str
) -> tuple[np.ndarray, bool | None]:
    """(content token ids without the trailing EOS, whether the last id was an EOS or None if unknown)."""
    ids = record.get(config.ids_field)
    if ids is None:  # text-only data: words stand in for tokens
        words = record[config.text_field].split()
        vocab: dict[str, int] = {}
        return np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int64), None
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise DataError(f"{where}: field {config.ids_field!r} must be a list of token ids")
    ids_T = np.array(ids, dtype=np.int64)
    if config.eos_token_ids:
        ends_with_eos = bool(len(ids) and ids[-1] in config.eos_token_ids)
        return (ids_T[:-1] if ends_with_eos else ids_T), ends_with_eos
    # no EOS ids given: a "stop" sample's last id is its stop token (vLLM and teacher-server include it)
    if record.get(config.finish_field) == "stop" and len(ids):
        return ids_T[:-1], None
    return ids_T, None


def check_record(record: dict[str, Any], config: FilterConfig, where: str = "record") -> list[str]:
    """Reasons (one per failed filter, in ``FILTERS`` order, "<filter>: <detail>") to drop ``record``."""
    if not isinstance(record.get(config.text_field), str):
        raise DataError(f"{where}: missing text field {config.text_field!r} (fields: {sorted(record)})")
    text = record[config.text_field]
    content_T, ends_with_eos = _content_tokens(record, config, where)
    reasons = []
    if not text.strip():
        reasons.append("empty: blank completion")
    elif len(content_T) < config.min_tokens:
        reasons.append(f"too_short: {len(content_T)} tokens < min_tokens {config.min_tokens}")
    elif len(text.strip()) < config.min_chars:
        reasons.append(f"too_short: {len(text.strip())} chars < min_chars {config.min_chars}")

    if config.drop_incomplete:
        finish = record.get(config.finish_field)
        if finish is not None:
            if finish != "stop":
                reasons.append(f"incomplete: finish_reason={finish}")
        elif ends_with_eos is None:
            raise DataError(
                f"{where}: no {config.finish_field!r} field and no EOS ids to check the last token against: "
                "pass eos_token_ids (--eos-id / --tokenizer) or disable the incomplete filter"
            )
        elif not ends_with_eos:
            reasons.append("incomplete: no EOS token at the end")

    loop = find_tail_loop(content_T, config.tail_min_repeats, config.tail_min_span, config.tail_max_period)
    if loop is not None:
        reasons.append(f"repetition: ends with a {loop[0]}-token pattern repeated {loop[1]} times")
    else:
        fraction = repeated_ngram_fraction(content_T, config.ngram_size)
        if fraction > config.max_repeated_ngram_fraction:
            reasons.append(
                f"repetition: {fraction:.2f} of {config.ngram_size}-grams repeated "
                f"> max {config.max_repeated_ngram_fraction}"
            )
    return reasons


@dataclass
class FilterResult:
    kept: list[dict[str, Any]]
    removed: list[dict[str, Any]]  # each with "filter_reasons": [...]
    flagged: dict[str, int] = field(default_factory=dict)  # filter -> records it flagged (can overlap)
    first: dict[str, int] = field(default_factory=dict)  # filter -> records removed by it first (a funnel)

    def summary(self) -> str:
        total = len(self.kept) + len(self.removed)
        lines = [f"{'filter':<12} {'flagged':>8} {'removed first':>14}"]
        lines += [f"{name:<12} {self.flagged[name]:>8} {self.first[name]:>14}" for name in FILTERS]
        lines.append(f"kept {len(self.kept)} / {total}, removed {len(self.removed)}")
        return "\n".join(lines)


def filter_rollouts(records: Iterable[dict[str, Any]], config: FilterConfig | None = None) -> FilterResult:
    """Split ``records`` into kept (unchanged) and removed (with their reasons), counting per filter."""
    config = config or FilterConfig()
    result = FilterResult([], [], dict.fromkeys(FILTERS, 0), dict.fromkeys(FILTERS, 0))
    for i, record in enumerate(records):
        reasons = check_record(record, config, where=f"record {i}")
        if not reasons:
            result.kept.append(record)
            continue
        names = [r.split(":", 1)[0] for r in reasons]
        for name in names:
            result.flagged[name] += 1
        result.first[names[0]] += 1
        result.removed.append({**record, "filter_reasons": reasons})
    return result
