"""Request models of the OpenAI/vLLM-compatible surface: ``/v1/completions``, ``/tokenize``, ``/detokenize``
and TRL's legacy ``/get_sequence_logprobs/``, as those clients send them.

Fields follow OpenAI's legacy completions API plus the vLLM extensions the field's clients use
(``prompt_logprobs``, ``return_token_ids``, ``stop_token_ids``, ``add_special_tokens``). An unknown field is
an error (a typo must not be ignored); an OpenAI/vLLM field this server does not implement is accepted only
at its neutral value, so a client that sends defaults works and one that relies on the feature is told.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from shared.protocol import (
    CHAT_TEMPLATE_KWARGS_DOC,
    ChatMessage,
    ChatTemplateValue,
    check_chat_template_kwargs,
)

# field -> the values that mean "feature off" (what the openai SDK, lm-eval and TRL send by default)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(_Strict):
    """``POST /v1/completions`` (OpenAI legacy completions + vLLM extensions)."""

    model: str | None = Field(None, description="the served model name (GET /v1/models); default: it")
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="a string, a list of strings, a list of token ids or a list of id lists"
    )
    max_tokens: int | None = Field(16, ge=0, description="tokens to sample per choice; 0 = score only")
    temperature: float | None = Field(1.0, ge=0.0, le=1e4, allow_inf_nan=False, description="0 = greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=1024, description="choices per prompt")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = Field(None, description="stop strings (not included in the text)")
    stop_token_ids: list[StrictInt] | None = Field(None, description="vLLM: extra stop tokens besides EOS")
    echo: bool = Field(False, description="return the prompt before the completion (text and logprobs)")
    logprobs: int | None = Field(
        None, ge=0, description="OpenAI's logprobs object with this many top alternatives per token"
    )
    prompt_logprobs: int | None = Field(
        None, ge=-1, description="vLLM: per prompt position the actual token and the top-N, with ranks"
    )
    return_token_ids: bool | None = Field(None, description="vLLM: prompt_token_ids and token_ids per choice")
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM: tokens as 'token_id:<id>'")
    add_special_tokens: bool = Field(True, description="vLLM: add the tokenizer's special tokens to text")
    stream: bool = Field(False, description="server-sent events: one chunk per choice, then [DONE]")
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral values only (see NEUTRAL)
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    @model_validator(mode="after")
    def _neutral_only(self) -> CompletionRequest:
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name)
            if value not in neutral:
                raise ValueError(
                    f"{name}={value!r} is not supported by this server (it serves teacher log-probs and plain "
                    f"sampling); omit it or send {neutral[-1]!r}"
                )
        return self

    @property
    def stops(self) -> list[str] | None:
        if self.stop is None or self.stop == []:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM): a text prompt, or chat messages rendered with the teacher's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, ChatTemplateValue] | None = Field(
        None, description="vLLM: " + CHAT_TEMPLATE_KWARGS_DOC
    )

    _kwargs = field_validator("chat_template_kwargs", mode="before")(
        classmethod(lambda cls, v: check_chat_template_kwargs(v))
    )

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (text) or messages (chat)")
        if self.chat_template_kwargs is not None and self.messages is None:
            raise ValueError("chat_template_kwargs applies to the chat form (messages) only")
        return self


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM)."""

    model: str | None = None
    tokens: list[StrictInt]


class SequenceLogprobsRequest(BaseModel):
    """``POST /get_sequence_logprobs/`` of TRL <= 1.10's ``trl vllm-serve`` (extra fields ignored, as there)."""

    sequences: list[list[StrictInt]] = Field(min_length=1, description="prompt + completion ids per sample")
    prompt_lengths: list[int] = Field(description="prompt tokens per sequence; log-probs start after them")
    top_logprobs: int = Field(100, ge=1, description="top-k per completion position")
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    response_format: Literal["json", "binary"] = "json"

    @model_validator(mode="after")
    def _lengths(self) -> SequenceLogprobsRequest:
        if len(self.sequences) != len(self.prompt_lengths):
            raise ValueError(
                f"sequences ({len(self.sequences)}) and prompt_lengths ({len(self.prompt_lengths)}) must have "
                "the same length"
            )
        for i, (seq, pl) in enumerate(zip(self.sequences, self.prompt_lengths, strict=True)):
            if not 0 <= pl <= len(seq):
                raise ValueError(f"prompt_lengths[{i}]={pl} is outside 0..{len(seq)} (the sequence length)")
        return self


# ------------------------------------------------------------------------------------ response documents


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "opd-distill"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, int]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
