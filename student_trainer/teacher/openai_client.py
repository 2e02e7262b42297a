"""Client of a stock OpenAI-compatible vLLM server used as a scoring teacher (``teacher.protocol=openai``).

    client = SyncOpenAIClient(["http://vllm:8000"], api_key=key)
    servers = client.servers()              # {url: OpenAIServer(model, max_model_len)}: GET /v1/models
    ids = client.tokenize("text", url)      # POST /tokenize on one URL (the tokenizer check at connect)
    scored = client.score([{"prompt_ids": p, "completion_ids": c}, ...], top_k=16)   # list[ScoredSequence]

Scoring is ``POST /v1/completions`` with ``max_tokens: 1`` and vLLM's ``prompt_logprobs: k`` extension over
the whole sequence (prompt + completion) as token ids: ``choices[i].prompt_logprobs[P + t]`` is
``{"<id>": {"logprob", "rank", "decoded_token"}}`` for completion token ``t`` of a prompt of ``P`` tokens,
holding the actual token and the top-k (k entries when the token is among them, else k + 1). Each answer is
read into the same :class:`shared.wire.ScoredSequence` the opd protocol returns (:func:`scored_sequence`),
so the losses cannot tell the doors apart. Chat-form prompts (``messages``) are rendered by the server's own
chat template through ``POST /tokenize`` (``add_generation_prompt``), as teacher-server renders them.

Transport is :class:`student_trainer.teacher.pool.EndpointPool`, as for the opd client: balancing over the
URLs, retries with back-off on connection errors / 408 / 429 / 5xx, typed errors carrying the server's
message (vLLM's ``{"error": {"message", ...}}`` and the older ``{"object": "error", "message"}``).
:class:`SyncOpenAIClient` has :class:`~student_trainer.teacher.client.SyncTeacherClient`'s scoring interface
(``score_future``, ``take_stats``, ``close``), so :class:`~student_trainer.teacher.remote.RemoteTeacher`
drives either protocol.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

from shared.wire import ScoredSequence
from student_trainer.teacher.client import SyncFacade, _gather
from student_trainer.teacher.errors import TeacherInputError, TeacherProtocolError, TeacherRequestError
from student_trainer.teacher.pool import (
    ClientStats,
    Endpoint,
    EndpointPool,
    RetryPolicy,
    check_urls,
    split_contiguous,
)

T = TypeVar("T")
_OFF_LOOP_BYTES = 1 << 20  # parse answers above this size in a worker thread (prompt_logprobs JSON is bulky)
_CHAT_CACHE = 4096  # rendered chat prompts kept (the same prompt is scored rollout.n times, every epoch)


@dataclass(frozen=True)
class OpenAIServer:
    """What ``GET /v1/models`` says about one URL: the served model id and, from vLLM, its context length."""

    url: str
    model: str
    max_model_len: int | None


# ------------------------------------------------------------------------------------------- pure parts


def completions_body(model: str, token_lists: Sequence[Sequence[int]], top_k: int) -> dict[str, Any]:
    """The ``/v1/completions`` request scoring every (prompt + completion) id list of ``token_lists``.

    One generated token is the least vLLM accepts (``max_tokens: 0`` is a 400); it is thrown away.
    """
    return {
        "model": model,
        "prompt": [list(map(int, ids)) for ids in token_lists],
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": int(top_k),
    }


def ordered_choices(doc: Any, n: int) -> list[Mapping[str, Any]]:
    """``doc["choices"]`` sorted by ``index``, checked to be exactly one per prompt (0..n-1); ValueError else."""
    choices = doc.get("choices") if isinstance(doc, Mapping) else None
    if not isinstance(choices, list) or not all(isinstance(c, Mapping) for c in choices):
        raise ValueError("the answer has no 'choices' list")
    indices = sorted(c["index"] if isinstance(c.get("index"), int) else -1 for c in choices)
    if indices != list(range(n)):
        raise ValueError(
            f"{len(choices)} choices with indices {indices[:8]} for {n} prompts (want 0..{n - 1})"
        )
    return sorted(choices, key=lambda c: c["index"])


def scored_sequence(
    prompt_logprobs: Any, prompt_len: int, completion_ids: np.ndarray, top_k: int
) -> ScoredSequence:
    """One choice's ``prompt_logprobs`` as the teacher's scores of its completion; ValueError names the fault.

    ``prompt_logprobs``: P + T entries (entry 0 is null), entry ``P + t`` a ``{"<id>": {"logprob", "rank"}}``
    dict holding ``completion_ids[t]`` and the top-k. Returns logprobs (T,) float32 of the actual tokens,
    topk_ids (T, k) int32 and topk_logprobs (T, k) float32 in descending log-prob order (rank on ties).
    """
    t_len = int(completion_ids.shape[0])
    if not isinstance(prompt_logprobs, list) or len(prompt_logprobs) != prompt_len + t_len:
        got = len(prompt_logprobs) if isinstance(prompt_logprobs, list) else type(prompt_logprobs).__name__
        raise ValueError(
            f"prompt_logprobs has {got} positions, want {prompt_len + t_len} (prompt + completion)"
        )
    logprobs_T = np.empty(t_len, np.float32)
    topk_ids_T_k = np.empty((t_len, top_k), np.int32)
    topk_logprobs_T_k = np.empty((t_len, top_k), np.float32)
    for t in range(t_len):
        pos, actual = prompt_len + t, int(completion_ids[t])
        entries = prompt_logprobs[pos]
        if not isinstance(entries, Mapping) or str(actual) not in entries:
            raise ValueError(f"position {pos} (completion token {t}) lacks the actual token {actual}")
        if len(entries) not in (top_k, top_k + 1):
            raise ValueError(
                f"position {pos} has {len(entries)} entries, want {top_k} or {top_k + 1} (top-k + token)"
            )
        rows = []
        for key, entry in entries.items():
            lp = entry.get("logprob") if isinstance(entry, Mapping) else None
            if not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 0:
                raise ValueError(f"position {pos}, token {key}: logprob {lp!r} is not a finite number <= 0")
            rank = entry.get("rank")
            rows.append((-float(lp), rank if isinstance(rank, int) else 0, int(key)))
        logprobs_T[t] = entries[str(actual)]["logprob"]
        if len(entries) == top_k + 1:  # the actual token is not among the top-k: it is the extra entry
            rows = [r for r in rows if r[2] != actual]
        rows.sort()
        topk_ids_T_k[t] = [r[2] for r in rows]
        topk_logprobs_T_k[t] = [-r[0] for r in rows]
    return ScoredSequence(
        completion_ids=np.asarray(completion_ids, np.int32),
        logprobs=logprobs_T,
        topk_ids=topk_ids_T_k,
        topk_logprobs=topk_logprobs_T_k,
        prompt_tokens=prompt_len,
    )


def server_message(body: str) -> str:
    """The human message of an error body: vLLM's ``{"error": {"message"}}``, the older ``{"object": "error",
    "message"}``, FastAPI's ``{"detail"}``; the text itself otherwise."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if isinstance(doc, Mapping):
        inner = doc.get("error")
        for source in (inner if isinstance(inner, Mapping) else {}, doc):
            for key in ("message", "detail"):
                if isinstance(source.get(key), str):
                    return source[key]
    return body


# ------------------------------------------------------------------------------------------------ client


class OpenAIClient:
    """Async scoring client over one or more OpenAI-compatible URLs sharing an :class:`EndpointPool`.

    ``model`` / ``max_model_len`` default to what :meth:`servers` finds; every URL must serve one model id.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_wait_s: float = 600.0,
        max_attempts: int | None = None,
        max_sequences_per_request: int = 64,
        max_tokens_per_request: int = 262_144,
        max_inflight_per_endpoint: int = 4,
        model: str | None = None,
        max_model_len: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.urls = check_urls([urls] if isinstance(urls, str) else list(urls))
        for name, value in (
            ("max_sequences_per_request", max_sequences_per_request),
            ("timeout_s", timeout_s),
        ):
            if not value > 0:
                raise TeacherInputError(f"{name} must be positive, got {value}")
        self.retry = RetryPolicy(max_wait_s=max_wait_s, max_attempts=max_attempts)
        self.max_sequences, self.max_tokens = max_sequences_per_request, max_tokens_per_request
        self.model, self.max_model_len = model, max_model_len
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        n = max_inflight_per_endpoint * len(self.urls)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=60.0),
        )
        self.pool = EndpointPool(self.urls, self._http, self.retry, max_inflight_per_endpoint, seed)
        self._chat: dict[str, list[int]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    def take_stats(self) -> ClientStats:
        """Counters (requests, retries, bytes, latencies, per-URL requests) since the last call."""
        return self.pool.take_stats()

    def _endpoint(self, url: str | None) -> Endpoint | None:
        return None if url is None else self.pool.endpoints[self.urls.index(url.rstrip("/"))]

    async def _call(
        self, method: str, path: str, body: Any = None, url: str | None = None, deadline: float | None = None
    ) -> tuple[str, Any]:
        """One JSON exchange through the pool (pinned to ``url`` if given): (the URL that answered, the doc)."""
        content = None if body is None else json.dumps(body).encode()
        deadline = deadline if deadline is not None else time.monotonic() + self.retry.max_wait_s
        try:
            reply = await self.pool.request(
                method,
                path,
                content=content,
                headers=self._headers,
                deadline=deadline,
                endpoint=self._endpoint(url),
            )
        except TeacherRequestError as exc:  # the pool reads {"error": {...}}; also the other shapes
            message = server_message(exc.message)
            raise TeacherRequestError(exc.url, exc.status, message, type=exc.type, field=exc.field) from None
        try:
            if len(reply.content) > _OFF_LOOP_BYTES:
                return reply.url, await asyncio.to_thread(json.loads, reply.content)
            return reply.url, json.loads(reply.content)
        except ValueError as exc:
            raise TeacherProtocolError(f"teacher {reply.url}{path}: the answer is not JSON: {exc}") from None

    # ----------------------------------------------------------------------------------------- queries
    async def servers(self) -> dict[str, OpenAIServer]:
        """``GET /v1/models`` on every URL; sets :attr:`model` (one id for all URLs) and the smallest
        :attr:`max_model_len` reported. Raises :class:`TeacherProtocolError` on an unusable answer."""

        async def one(url: str) -> OpenAIServer:
            _, doc = await self._call("GET", "/v1/models", url=url)
            data = doc.get("data") if isinstance(doc, Mapping) else None
            if not isinstance(data, list) or not data or not isinstance(data[0].get("id"), str):
                raise TeacherProtocolError(
                    f"teacher {url}/v1/models: no model in 'data' (answer: {str(doc)[:200]})"
                )
            length = data[0].get("max_model_len")
            return OpenAIServer(url, data[0]["id"], length if isinstance(length, int) else None)

        found = dict(zip(self.urls, await _gather([one(u) for u in self.urls]), strict=True))
        ids = {s.model for s in found.values()}
        if len(ids) > 1:
            listing = ", ".join(f"{u} -> {s.model}" for u, s in found.items())
            raise TeacherProtocolError(
                f"the teacher URLs serve different models ({listing}); every URL of one trainer must serve the "
                "same teacher under the same name (vllm serve --served-model-name NAME)"
            )
        self.model = self.model or ids.pop()
        lengths = [s.max_model_len for s in found.values() if s.max_model_len is not None]
        if lengths and self.max_model_len is None:
            self.max_model_len = min(lengths)
        return found

    async def tokenize(self, text: str, url: str | None = None) -> dict[str, Any]:
        """``POST /tokenize`` of ``text`` without special tokens: ``{"tokens", "count", "max_model_len"}``."""
        body = {"model": self._model(), "prompt": text, "add_special_tokens": False}
        return await self._tokens(body, url)

    async def render_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        url: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Prompt ids of chat ``messages`` in the server's chat template (``add_generation_prompt``, vLLM's
        ``chat_template_kwargs`` when given), cached."""
        key = _chat_key(messages, chat_template_kwargs)
        if url is None and key in self._chat:
            return self._chat[key]
        body = {
            "model": self._model(),
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": True,
            "add_special_tokens": False,
        }
        if chat_template_kwargs:
            body["chat_template_kwargs"] = dict(chat_template_kwargs)
        ids = (await self._tokens(body, url))["tokens"]
        if len(self._chat) >= _CHAT_CACHE:
            self._chat.clear()
        self._chat[key] = ids
        return ids

    async def _tokens(self, body: dict[str, Any], url: str | None) -> dict[str, Any]:
        answered, doc = await self._call("POST", "/tokenize", body, url)
        tokens = doc.get("tokens") if isinstance(doc, Mapping) else None
        if not isinstance(tokens, list) or not all(isinstance(i, int) for i in tokens):
            raise TeacherProtocolError(
                f"teacher {answered}/tokenize: no 'tokens' id list (answer: {str(doc)[:200]})"
            )
        return doc

    def _model(self) -> str:
        if self.model is None:
            raise TeacherInputError("the served model id is unknown: call servers() first or pass model=")
        return self.model

    # ------------------------------------------------------------------------------------------- score
    async def score(
        self,
        sequences: Sequence[Mapping[str, Any]],
        *,
        top_k: int = 16,
        return_entropy: bool = False,
        candidate_ids: Sequence[Any] | None = None,
        temperature: float = 1.0,
        url: str | None = None,
    ) -> list[ScoredSequence]:
        """Teacher scores of every ``{"prompt_ids" | "messages", "completion_ids"}`` sequence, in input order.

        ``return_entropy``, ``candidate_ids`` and a temperature other than 1 are what an OpenAI server cannot
        give (:class:`TeacherInputError`); they are accepted as arguments so RemoteTeacher can call either
        client. ``url`` pins every chunk to one URL (the connect-time probe).
        """
        self._check_options(top_k, return_entropy, candidate_ids, temperature)
        model = self._model()
        prompts = await self._prompt_ids(sequences)
        completions = [np.asarray(s["completion_ids"], np.int64).reshape(-1) for s in sequences]
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        self._check_lengths(prompts, lengths)
        if not sequences:
            return []
        results: list[ScoredSequence | None] = [None] * len(sequences)
        deadline = time.monotonic() + self.retry.max_wait_s

        async def run(a: int, b: int) -> None:
            ids = [[*prompts[i], *completions[i].tolist()] for i in range(a, b)]
            answered, doc = await self._call(
                "POST", "/v1/completions", completions_body(model, ids, top_k), url, deadline
            )
            results[a:b] = await asyncio.to_thread(
                self._read, answered, doc, prompts[a:b], completions[a:b], top_k, a
            )

        parts = 1 if url else len(self.urls)
        await _gather(
            [run(a, b) for a, b in split_contiguous(lengths, parts, self.max_sequences, self.max_tokens)]
        )
        return results  # type: ignore[return-value]  # every slot was filled by exactly one chunk

    @staticmethod
    def _read(
        url: str, doc: Any, prompts: list[list[int]], completions: list[np.ndarray], top_k: int, first: int
    ) -> list[ScoredSequence]:
        where = f"teacher {url}/v1/completions"
        try:
            choices = ordered_choices(doc, len(prompts))
        except ValueError as exc:
            raise TeacherProtocolError(f"{where}: {exc}") from None
        out = []
        for j, (choice, prompt, completion) in enumerate(zip(choices, prompts, completions, strict=True)):
            try:
                out.append(scored_sequence(choice.get("prompt_logprobs"), len(prompt), completion, top_k))
            except ValueError as exc:
                raise TeacherProtocolError(f"{where}: sequences[{first + j}]: {exc}") from None
        return out

    async def _prompt_ids(self, sequences: Sequence[Mapping[str, Any]]) -> list[list[int]]:
        """Token-form prompts as given; chat-form ones rendered by the server (each distinct one once)."""
        chats = {
            _chat_key(s["messages"], s.get("chat_template_kwargs")): s for s in sequences if "messages" in s
        }
        calls = [self.render_chat(s["messages"], None, s.get("chat_template_kwargs")) for s in chats.values()]
        rendered = dict(zip(chats, await _gather(calls), strict=True))
        out = []
        for i, s in enumerate(sequences):
            if "messages" in s:
                out.append(rendered[_chat_key(s["messages"], s.get("chat_template_kwargs"))])
            elif s.get("prompt_ids") is not None:
                out.append([int(x) for x in np.asarray(s["prompt_ids"]).reshape(-1)])
            else:
                raise TeacherInputError(f"sequences[{i}]: give prompt_ids or messages (and completion_ids)")
        return out

    def _check_options(self, top_k: int, entropy: bool, candidates: Any, temperature: float) -> None:
        if not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise TeacherInputError(f"top_k: {top_k!r} must be an integer >= 0")
        if entropy or candidates is not None:
            what = "entropy" if entropy else "candidate_ids"
            raise TeacherInputError(
                f"{what}: an OpenAI-protocol teacher returns only prompt_logprobs (top-k)"
            )
        if temperature != 1.0:
            raise TeacherInputError(
                f"temperature: {temperature} — vLLM's prompt_logprobs are at temperature 1 only (raw logits)"
            )

    def _check_lengths(self, prompts: list[list[int]], lengths: list[int]) -> None:
        """Refuse here what the server would answer 400: an empty prompt, a sequence over its context."""
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            if not p:
                raise TeacherInputError(
                    f"sequences[{i}]: the prompt is empty; the first token has no log-prob"
                )
            # max_tokens=1 needs one position after the sequence
            if self.max_model_len is not None and n + 1 > self.max_model_len:
                raise TeacherInputError(
                    f"sequences[{i}]: {len(p)} prompt + {n - len(p)} completion tokens = {n}, but the teacher "
                    f"serves at most {self.max_model_len - 1} (max_model_len {self.max_model_len} minus the one "
                    "token a completion request must generate); lower rollout.max_new_tokens or start the "
                    "server with a larger --max-model-len"
                )


# ---------------------------------------------------------------------------------------- sync facade


class SyncOpenAIClient(SyncFacade):
    """Blocking facade over :class:`OpenAIClient` on a private event-loop thread; ``score_future`` returns a
    ``concurrent.futures.Future`` so a micro-batch is scored while the next one is generated."""

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(lambda: OpenAIClient(urls, **kwargs), "teacher-openai")

    @property
    def urls(self) -> list[str]:
        return self.client.urls

    def servers(self) -> dict[str, OpenAIServer]:
        return self._submit(self.client.servers()).result()

    def tokenize(self, text: str, url: str | None = None) -> dict[str, Any]:
        return self._submit(self.client.tokenize(text, url)).result()

    def render_chat(self, messages: Sequence[Mapping[str, str]], url: str | None = None) -> list[int]:
        return self._submit(self.client.render_chat(messages, url)).result()


def _chat_key(messages: Sequence[Mapping[str, str]], kwargs: Mapping[str, Any] | None) -> str:
    """Cache key of one chat rendering: the messages and the template variables."""
    return json.dumps([list(messages), dict(kwargs or {})], sort_keys=True)
