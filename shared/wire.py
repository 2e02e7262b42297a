"""Request bodies and result documents of the teacher service: the only code that builds or reads them.

Both sides meet here. The trainer's client builds bodies with :func:`sequence_doc` + :func:`score_request`
and :func:`prompt_doc` + :func:`generate_request`; the server validates exactly those bodies with
:class:`shared.protocol.ScoreRequest` / :class:`~shared.protocol.GenerateRequest` (a test round-trips every
form through the codec). The server answers with :meth:`ScoredSequence.to_wire` and
:meth:`GeneratedSample.to_wire` documents wrapped by :func:`score_response` / :func:`generate_response`; the
client reads them back with ``from_wire``. Token ids travel as int32 arrays, log-probs as float32 (see
:mod:`shared.codec` for the bytes).

Alignment (the protocol's one rule): completion position ``t`` is predicted from ``prompt + completion[:t]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from shared.codec import as_array
from shared.protocol import GenerateOptions, ScoreOptions, check_chat_template_kwargs

_INT32 = np.iinfo(np.int32)
PROMPT_FIELDS = ("prompt_ids", "prompt", "messages")


class WireInputError(ValueError):
    """An argument that cannot become a valid request body; the message names the field and the value."""


class WireFormatError(ValueError):
    """A document that does not have the shape the protocol promises (wrong keys, wrong result count)."""


# ----------------------------------------------------------------------------------------------- requests


def ids_array(value: Any, where: str, ndim: int = 1) -> np.ndarray:
    """Token ids as a C-contiguous int32 array of ``ndim`` dimensions (the wire dtype)."""
    arr = np.asarray(value)
    if arr.size == 0 and ndim == 1:
        arr = arr.reshape(0).astype(np.int32)
    if arr.ndim != ndim or (arr.size and arr.dtype.kind not in "iu"):
        raise WireInputError(
            f"{where}: expected a {ndim}-d array of integer token ids, got shape {list(arr.shape)} of "
            f"{arr.dtype.name}"
        )
    if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        bad = arr.min() if arr.min() < _INT32.min else arr.max()
        raise WireInputError(f"{where}: token id {int(bad)} does not fit int32 (token ids are >= 0)")
    return np.ascontiguousarray(arr, dtype=np.int32)


def messages_doc(messages: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, str]]:
    """Chat messages as the protocol's ``{role, content}`` objects."""
    try:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    except (KeyError, TypeError):
        raise WireInputError(f"{where}: each message needs 'role' and 'content'") from None


def template_kwargs_doc(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``chat_template_kwargs`` checked as the server checks them (:func:`shared.protocol.check_chat_template_kwargs`)."""
    try:
        return check_chat_template_kwargs(dict(kwargs)) or {}
    except (ValueError, TypeError) as exc:
        raise WireInputError(f"{where}: {exc}") from None


def sequence_doc(
    *,
    completion_ids: Any = None,
    completion: str | None = None,
    prompt_ids: Any = None,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    candidate_ids: Any = None,
    where: str = "sequence",
) -> dict[str, Any]:
    """One ``ScoreSequence``: exactly one prompt form (token ids, text or chat messages, the latter with optional
    ``chat_template_kwargs``) and exactly one completion form (ids, or text in the text/chat forms);
    ``candidate_ids`` is a (T, K) id array."""
    given = [
        k
        for k, v in (("prompt_ids", prompt_ids), ("prompt", prompt), ("messages", messages))
        if v is not None
    ]
    if len(given) != 1:
        raise WireInputError(
            f"{where}: give exactly one of prompt_ids (token form), prompt (text form) or messages "
            f"(chat form); got {given or 'none'}"
        )
    if (completion_ids is None) == (completion is None):
        raise WireInputError(f"{where}: give exactly one of completion_ids or completion (text)")
    if prompt_ids is not None and completion is not None:
        raise WireInputError(f"{where}: the token form needs completion_ids, not completion text")
    doc: dict[str, Any] = {}
    if prompt_ids is not None:
        doc["prompt_ids"] = ids_array(prompt_ids, f"{where}.prompt_ids")
    elif prompt is not None:
        doc["prompt"] = str(prompt)
    else:
        doc["messages"] = messages_doc(messages, f"{where}.messages")
    if chat_template_kwargs:
        if messages is None:
            raise WireInputError(f"{where}.chat_template_kwargs: only the chat form (messages) takes it")
        doc["chat_template_kwargs"] = template_kwargs_doc(
            chat_template_kwargs, f"{where}.chat_template_kwargs"
        )
    if completion_ids is not None:
        doc["completion_ids"] = ids_array(completion_ids, f"{where}.completion_ids")
    else:
        doc["completion"] = str(completion)
    if candidate_ids is not None:
        arr = ids_array(candidate_ids, f"{where}.candidate_ids", 2)
        t = doc["completion_ids"].size if "completion_ids" in doc else None
        if arr.shape[1] < 1 or (t is not None and arr.shape[0] != t):
            expected = f"({t}, K)" if t is not None else "(T, K)"
            raise WireInputError(
                f"{where}.candidate_ids: shape {list(arr.shape)} does not fit the completion; expected "
                f"{expected} with K >= 1"
            )
        doc["candidate_ids"] = arr
    return doc


def score_request(sequences: Sequence[Mapping[str, Any]], **options: Any) -> dict[str, Any]:
    """A ``POST /v1/score`` body from :func:`sequence_doc` documents; ``options`` are
    :class:`shared.protocol.ScoreOptions` fields (validated here with the server's own model)."""
    return {"sequences": list(sequences), **_options(ScoreOptions, options)}


def _options(model: type[BaseModel], options: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return model.model_validate(dict(options)).model_dump()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise WireInputError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


def prompt_doc(prompt: Any, where: str = "prompt") -> dict[str, Any]:
    """One ``GeneratePrompt``: token ids, a text string, a list of chat messages, or a dict with exactly one of
    ``prompt_ids``, ``prompt``, ``messages``."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, Mapping):
        keys = set(prompt) - ({"chat_template_kwargs"} if "messages" in prompt else set())
        if len(keys & set(PROMPT_FIELDS)) != 1 or keys - set(PROMPT_FIELDS):
            raise WireInputError(
                f"{where}: a prompt dict needs exactly one of prompt_ids, prompt or messages (messages may "
                f"come with chat_template_kwargs), got {sorted(prompt)}"
            )
        if "prompt_ids" in prompt:
            return {"prompt_ids": ids_array(prompt["prompt_ids"], f"{where}.prompt_ids")}
        if "messages" in prompt:
            doc: dict[str, Any] = {"messages": messages_doc(prompt["messages"], f"{where}.messages")}
            if prompt.get("chat_template_kwargs"):
                kwargs = prompt["chat_template_kwargs"]
                doc["chat_template_kwargs"] = template_kwargs_doc(kwargs, f"{where}.chat_template_kwargs")
            return doc
        return {"prompt": str(prompt["prompt"])}
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
        return {"messages": messages_doc(prompt, where)}
    return {"prompt_ids": ids_array(prompt, where)}


def generate_request(prompts: Sequence[Mapping[str, Any]], **options: Any) -> dict[str, Any]:
    """A ``POST /v1/generate`` body from :func:`prompt_doc` documents; ``options`` are
    :class:`shared.protocol.GenerateOptions` fields (validated here with the server's own model)."""
    return {"prompts": list(prompts), **_options(GenerateOptions, options)}


# ------------------------------------------------------------------------------------------------ results


@dataclass
class ScoredSequence:
    """The teacher's scores of one sequence. Shapes: T = completion length, k = top_k, K = candidates.

    The server's backends produce it, :meth:`to_wire` is the result document, :meth:`from_wire` reads it.
    """

    completion_ids: np.ndarray  # (T,) int
    logprobs: np.ndarray  # (T,) float32
    topk_ids: np.ndarray  # (T, k) int32
    topk_logprobs: np.ndarray  # (T, k) float32
    prompt_tokens: int = 0
    candidate_logprobs: np.ndarray | None = None  # (T, K) float32
    entropy: np.ndarray | None = None  # (T,) float32
    tokens: list[str] | None = None  # decoded completion tokens, on request
    ranks: np.ndarray | None = (
        None  # (T,) int32: 1 + the number of ids more likely than the token, on request
    )

    def to_wire(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "completion_ids": self.completion_ids,
            "logprobs": self.logprobs,
            "topk_ids": self.topk_ids,
            "topk_logprobs": self.topk_logprobs,
            "prompt_tokens": int(self.prompt_tokens),
        }
        for key in ("candidate_logprobs", "entropy", "tokens", "ranks"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        return doc

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> ScoredSequence:
        try:
            ids = as_array(doc["completion_ids"], "int32")
            t = ids.shape[0]

            def mat(key: str, dtype: str) -> np.ndarray | None:
                if doc.get(key) is None:
                    return None
                return as_array(doc[key], dtype).reshape(t, -1)

            return cls(
                completion_ids=ids,
                logprobs=as_array(doc["logprobs"], "float32"),
                topk_ids=mat("topk_ids", "int32"),
                topk_logprobs=mat("topk_logprobs", "float32"),
                prompt_tokens=int(doc.get("prompt_tokens", 0)),
                candidate_logprobs=mat("candidate_logprobs", "float32"),
                entropy=None if doc.get("entropy") is None else as_array(doc["entropy"], "float32"),
                tokens=doc.get("tokens"),
                ranks=None if doc.get("ranks") is None else as_array(doc["ranks"], "int32"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireFormatError(f"malformed score result: {type(exc).__name__}: {exc}") from None


@dataclass
class GeneratedSample:
    """One sample of ``/v1/generate``. ``completion_ids`` include the EOS token when the model stopped on it."""

    completion_ids: np.ndarray  # (T,) int32
    text: str
    finish_reason: str  # "stop" | "length"
    cumulative_logprob: float | None  # sum of the raw (temperature 1) log-probs of the sampled tokens

    def __post_init__(self) -> None:
        self.completion_ids = ids_array(self.completion_ids, "completion_ids")

    def to_wire(self) -> dict[str, Any]:
        return {
            "completion_ids": self.completion_ids.tolist(),  # a plain list on the wire, as it always was
            "text": self.text,
            "finish_reason": self.finish_reason,
            "cumulative_logprob": self.cumulative_logprob,
        }

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> GeneratedSample:
        try:
            return cls(
                completion_ids=as_array(doc["completion_ids"], "int32"),
                text=doc["text"],
                finish_reason=doc["finish_reason"],
                cumulative_logprob=doc.get("cumulative_logprob"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireFormatError(f"malformed generate sample: {type(exc).__name__}: {exc}") from None


def score_response(model: str, results: Sequence[ScoredSequence]) -> dict[str, Any]:
    """The ``/v1/score`` answer: one result per sequence, in request order, and the token usage."""
    scored = sum(int(r.completion_ids.shape[0]) for r in results)
    prompt = sum(int(r.prompt_tokens) for r in results)
    return {
        "model": model,
        "results": [r.to_wire() for r in results],
        "usage": {"prompt_tokens": prompt, "scored_tokens": scored},
    }


def generate_response(
    model: str, prompt_lengths: Sequence[int], samples: Sequence[Sequence[GeneratedSample]]
) -> dict[str, Any]:
    """The ``/v1/generate`` answer: per prompt its length and its samples, and the token usage."""
    generated = sum(int(s.completion_ids.shape[0]) for group in samples for s in group)
    return {
        "model": model,
        "results": [
            {"prompt_tokens": int(p), "samples": [s.to_wire() for s in group]}
            for p, group in zip(prompt_lengths, samples, strict=True)
        ],
        "usage": {"prompt_tokens": int(sum(prompt_lengths)), "completion_tokens": generated},
    }


def response_results(doc: Any, expected: int) -> list[Mapping[str, Any]]:
    """The ``results`` list of a score/generate answer, checked to hold one entry per item sent."""
    got = doc.get("results") if isinstance(doc, Mapping) else None
    if not isinstance(got, list) or len(got) != expected:
        n = len(got) if isinstance(got, list) else "no"
        raise WireFormatError(f"answered {n} results for {expected} items sent")
    return got


def generated_samples(result: Mapping[str, Any]) -> list[GeneratedSample]:
    """The samples of one ``/v1/generate`` result."""
    samples = result.get("samples") if isinstance(result, Mapping) else None
    if not isinstance(samples, list):
        raise WireFormatError("a generate result has no 'samples' list")
    return [GeneratedSample.from_wire(s) for s in samples]
