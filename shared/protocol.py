"""Request and response models of the teacher service (``/v1/score``, ``/v1/generate``, ``/v1/model``).

Alignment (the one rule everyone must agree on): completion position ``t`` is predicted from
``prompt + completion[:t]``. ``logprobs[t]`` is the teacher's log-prob of ``completion_ids[t]`` there,
``topk_*[t]`` are the teacher's k most likely next tokens there, ``candidate_logprobs[t][j]`` is the
teacher's log-prob of ``candidate_ids[t][j]`` there (normalised over the FULL vocabulary: the
``ModelInfo.normalized_vocab_size`` ids) and ``entropy[t]`` is the entropy of the teacher's whole next-token
distribution there (nats).

Requests are validated with pydantic (unknown fields are errors, so a typo such as ``topk`` is caught).
Responses are plain documents whose arrays the codec packs; the ``*Doc`` models here describe them for
OpenAPI, and :mod:`shared.wire` builds and reads them (request bodies, ``ScoredSequence``,
``GeneratedSample``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_TOP_K = 16


def _ids_from_wire(value: Any) -> Any:
    """Accept packed arrays (msgpack requests) where lists of ints are expected."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise ValueError(f"packed array of ids must have an integer dtype, got {value.dtype.name}")
        return value.tolist()
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)


class ChatMessage(_Strict):
    role: str = Field(description="system, user, assistant, ...")
    content: str


# apply_chat_template's own arguments: a chat_template_kwargs key may not override them (tokenize=True would
# return ids where text is expected, messages would replace the conversation)
RESERVED_CHAT_TEMPLATE_KWARGS = frozenset(
    {
        "add_generation_prompt",
        "chat_template",
        "continue_final_message",
        "conversation",
        "documents",
        "max_length",
        "messages",
        "padding",
        "processor_kwargs",
        "return_assistant_tokens_mask",
        "return_dict",
        "return_tensors",
        "tokenize",
        "tokenizer_kwargs",
        "tools",
        "truncation",
    }
)
ChatTemplateValue = str | int | float | bool | None
CHAT_TEMPLATE_KWARGS_DOC = (
    "chat form only: extra variables for the chat template, passed to apply_chat_template as keyword "
    'arguments (e.g. {"enable_thinking": false} for Qwen3; vLLM\'s name); string keys, values string, '
    "number, boolean or null"
)


def check_chat_template_kwargs(value: Any) -> dict[str, ChatTemplateValue] | None:
    """``value`` if it is None or a dict of str keys to JSON scalars that apply_chat_template can take, else
    ValueError naming the bad key (pydantic turns it into a 422 at the field)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"expected an object of name -> value, got {type(value).__name__}")
    for key, v in value.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"key {key!r} is not a valid template variable name (letters, digits, _)")
        if key in RESERVED_CHAT_TEMPLATE_KWARGS:
            raise ValueError(
                f"key {key!r} is an argument of apply_chat_template itself, not a template variable; "
                f"reserved: {sorted(RESERVED_CHAT_TEMPLATE_KWARGS)}"
            )
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise ValueError(f"{key}: expected a string, number, boolean or null, got {type(v).__name__}")
        if isinstance(v, float) and not np.isfinite(v):
            raise ValueError(f"{key}: {v} is not a finite number")
    return dict(value)


class ScoreSequence(_Strict):
    """One rollout to score, in exactly one of three forms.

    * token form: ``prompt_ids`` + ``completion_ids``;
    * text form: ``prompt`` + ``completion`` (tokenized separately by the teacher's tokenizer, no special
      tokens added to the completion) or ``completion_ids``;
    * chat form: ``messages`` + (``completion`` or ``completion_ids``); the prompt is rendered with the
      TEACHER's chat template with ``add_generation_prompt=True`` and the optional ``chat_template_kwargs``.
    """

    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[ChatMessage] | None = None
    chat_template_kwargs: dict[str, ChatTemplateValue] | None = Field(
        None, description=CHAT_TEMPLATE_KWARGS_DOC
    )
    candidate_ids: list[list[int]] | None = Field(
        None, description="[T][K] token ids; the teacher's full-vocabulary log-prob at each is returned"
    )

    _to_list = field_validator("prompt_ids", "completion_ids", "candidate_ids", mode="before")(
        classmethod(lambda cls, v: _ids_from_wire(v))
    )
    _kwargs = field_validator("chat_template_kwargs", mode="before")(
        classmethod(lambda cls, v: check_chat_template_kwargs(v))
    )

    @model_validator(mode="after")
    def _one_form(self) -> ScoreSequence:
        form = self.form
        given = sorted(
            k
            for k in (
                "prompt_ids",
                "prompt",
                "messages",
                "chat_template_kwargs",
                "completion",
                "completion_ids",
            )
            if getattr(self, k) is not None
        )
        allowed = {
            "tokens": {"prompt_ids", "completion_ids"},
            "text": {"prompt", "completion", "completion_ids"},
            "chat": {"messages", "chat_template_kwargs", "completion", "completion_ids"},
        }
        if form is None:
            raise ValueError(
                "give exactly one prompt field: prompt_ids (token form), prompt (text form) or messages "
                f"(chat form); got {given or 'none'}"
            )
        extra = set(given) - allowed[form]
        if extra:
            raise ValueError(f"{form} form does not take {sorted(extra)}; allowed: {sorted(allowed[form])}")
        has_ids, has_text = self.completion_ids is not None, self.completion is not None
        if form == "tokens" and not has_ids:
            raise ValueError("token form needs completion_ids")
        if form in ("text", "chat") and has_ids == has_text:
            raise ValueError(f"{form} form needs exactly one of completion (text) or completion_ids")
        return self

    @property
    def form(self) -> Literal["tokens", "text", "chat"] | None:
        present = [k for k in ("prompt_ids", "prompt", "messages") if getattr(self, k) is not None]
        if len(present) != 1:
            return None
        return {"prompt_ids": "tokens", "prompt": "text", "messages": "chat"}[present[0]]


class _ScoreSequences(_Strict):
    sequences: list[ScoreSequence] = Field(min_length=1, description="the rollouts to score")


class ScoreOptions(_Strict):
    """What to compute for every sequence of a score request. The server's jobs carry this object as is, so
    a new option is one field here plus the backend code that honours it."""

    top_k: int = Field(DEFAULT_TOP_K, ge=0, description="teacher top-k per position (0..server max_top_k)")
    return_entropy: bool = Field(False, description="teacher full-distribution entropy per position")
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="divides logits first")
    return_tokens: bool = Field(False, description="decoded completion token strings, for people")
    return_ranks: bool = Field(
        False, description="rank of each completion token in the teacher's distribution (1 = most likely)"
    )


class ScoreRequest(ScoreOptions, _ScoreSequences):  # this base order keeps "sequences" the first field
    """``POST /v1/score``: the sequences and the options that apply to all of them."""

    def options(self) -> ScoreOptions:
        return ScoreOptions.model_validate(self.model_dump(include=set(ScoreOptions.model_fields)))


class Usage(BaseModel):
    prompt_tokens: int
    scored_tokens: int


class SequenceScoresDoc(BaseModel):
    """JSON shape of one result (documentation; msgpack carries the same keys with packed arrays)."""

    completion_ids: list[int]
    logprobs: list[float | None]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float | None]]
    candidate_logprobs: list[list[float | None]] | None = None
    entropy: list[float] | None = None
    tokens: list[str] | None = None
    ranks: list[int] | None = None
    prompt_tokens: int


class ScoreResponseDoc(BaseModel):
    model: str
    results: list[SequenceScoresDoc]
    usage: Usage


# ---------------------------------------------------------------------------------------------- generate


class GeneratePrompt(_Strict):
    """One prompt in exactly one form: ``prompt_ids``, ``prompt`` (text) or ``messages`` (chat template, with
    the optional ``chat_template_kwargs``)."""

    prompt_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    chat_template_kwargs: dict[str, ChatTemplateValue] | None = Field(
        None, description=CHAT_TEMPLATE_KWARGS_DOC
    )

    _to_list = field_validator("prompt_ids", mode="before")(classmethod(lambda cls, v: _ids_from_wire(v)))
    _kwargs = field_validator("chat_template_kwargs", mode="before")(
        classmethod(lambda cls, v: check_chat_template_kwargs(v))
    )

    @model_validator(mode="after")
    def _one_form(self) -> GeneratePrompt:
        given = [k for k in ("prompt_ids", "prompt", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt_ids, prompt or messages; got {given or 'none'}")
        if self.chat_template_kwargs is not None and self.messages is None:
            raise ValueError(f"chat_template_kwargs applies to the chat form (messages) only; got {given[0]}")
        return self


class _GeneratePrompts(_Strict):
    prompts: list[GeneratePrompt] = Field(min_length=1)


class GenerateOptions(_Strict):
    """How to sample every prompt of a generate request; the backends receive this object as is."""

    n: int = Field(1, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    max_tokens: int = Field(256, ge=1)
    seed: int | None = Field(None, description="makes sampling reproducible for a given server and batch")
    stop: list[str] | None = Field(None, description="stop strings (not included in the text)")
    stop_token_ids: list[int] | None = Field(None, description="extra stop tokens besides EOS")


class GenerateRequest(GenerateOptions, _GeneratePrompts):  # this base order keeps "prompts" the first field
    """``POST /v1/generate``: the prompts and the sampling options that apply to all of them."""

    def options(self) -> GenerateOptions:
        return GenerateOptions.model_validate(self.model_dump(include=set(GenerateOptions.model_fields)))


class GenerateSampleDoc(BaseModel):
    completion_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    cumulative_logprob: float | None


class GenerateResultDoc(BaseModel):
    prompt_tokens: int
    samples: list[GenerateSampleDoc]


class GenerateResponseDoc(BaseModel):
    model: str
    results: list[GenerateResultDoc]
    usage: dict[str, int]


# ------------------------------------------------------------------------------------------------- model


class Capabilities(BaseModel):
    candidate_ids: bool = Field(description="log-probs at arbitrary per-position ids (student top-k loss)")
    entropy: bool = Field(description="full-distribution teacher entropy")
    temperature: bool = Field(description="temperature other than 1.0 for scoring")
    generate: bool = Field(description="POST /v1/generate")


class ModelInfo(BaseModel):
    model: str
    backend: str
    max_model_len: int
    max_top_k: int
    vocab_size: int = Field(description="tokenizer length: ids must be below it")
    model_vocab_size: int = Field(description="rows of the output layer (may be padded above vocab_size)")
    normalized_vocab_size: int | None = Field(
        None,
        description="ids [0, n) every log-prob, top-k and entropy is normalised over: vocab_size when the "
        "server excludes padded output rows, model_vocab_size when they share the mass; None = not reported "
        "(older servers)",
    )
    tokenizer_fingerprint: str
    chat_template: bool
    eos_token_ids: list[int]
    capabilities: Capabilities
    limits: dict[str, int] = Field(default_factory=dict, description="per-request limits the server enforces")


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None
    value: Any = None
    limit: Any = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
