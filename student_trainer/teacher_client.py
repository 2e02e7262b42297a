"""Client of one or more ``teacher-server`` endpoints: scores rollouts, samples teacher completions.

    async with TeacherClient(["http://t1:8000", "http://t2:8000"], api_key=key) as client:
        info = await client.model_info()        # {url: ModelInfo}; all must share one tokenizer
        check_compatibility(info, student_fingerprint, needs_candidate_ids=True, needs_entropy=True)
        scored = await client.score(
            [SequenceInput(completion_ids=c, prompt_ids=p), ...], top_k=16, candidate_ids=[ids_T_K, ...]
        )

Bodies are msgpack both ways (ids as packed int32 arrays, see :mod:`shared.codec`). A large batch is cut into
contiguous chunks spread over the endpoints and reassembled in order. Retries, load balancing and the typed
errors live in :mod:`student_trainer.teacher_pool`: a call either returns every result of the batch, each
exactly once, or raises after the retry budget. :class:`SyncTeacherClient` runs the same client on a
private event-loop thread for synchronous code (and hands out futures, so scoring can overlap generation).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

from shared import codec
from shared.protocol import DEFAULT_TOP_K, ModelInfo, ScoredSequence
from student_trainer.teacher_pool import (
    ClientStats,
    EndpointPool,
    Reply,
    RetryPolicy,
    TeacherError,
    TeacherIncompatible,
    TeacherInputError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherServerError,
    TeacherUnavailable,
    check_urls,
    split_contiguous,
)

__all__ = [
    "ClientStats",
    "GeneratedSample",
    "RetryPolicy",
    "SequenceInput",
    "SyncTeacherClient",
    "TeacherClient",
    "TeacherError",
    "TeacherIncompatible",
    "TeacherInputError",
    "TeacherProtocolError",
    "TeacherRequestError",
    "TeacherServerError",
    "TeacherUnavailable",
    "check_compatibility",
    "split_contiguous",
]

log = logging.getLogger("student_trainer.teacher_client")

_OFF_LOOP_BYTES = 4 << 20  # encode/decode bodies above this size in a worker thread
_CHAT_TOKENS_PER_MESSAGE = 8  # upper bound of a chat template's per-message overhead (role, markers)
T = TypeVar("T")
_INT32 = np.iinfo(np.int32)


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class SequenceInput:
    """One rollout to score, in token form (``prompt_ids``) or chat form (``messages``).

    Chat form is the teacher-aligned prompt: the server renders ``messages`` with the TEACHER's chat template
    (``add_generation_prompt=True``) while ``completion_ids`` stay the student's tokens.
    """

    completion_ids: Sequence[int] | np.ndarray
    prompt_ids: Sequence[int] | np.ndarray | None = None
    messages: Sequence[Mapping[str, str]] | None = None


def as_sequence_input(item: Any, where: str) -> SequenceInput:
    """Accept a :class:`SequenceInput`, a dict with its fields, or a ``(prompt_ids, completion_ids)`` pair."""
    if isinstance(item, SequenceInput):
        seq = item
    elif isinstance(item, Mapping):
        unknown = set(item) - {"prompt_ids", "completion_ids", "messages"}
        if unknown:
            raise TeacherInputError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed: prompt_ids, messages, completion_ids"
            )
        seq = SequenceInput(**item)
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        seq = SequenceInput(prompt_ids=item[0], completion_ids=item[1])
    else:
        raise TeacherInputError(
            f"{where}: expected a SequenceInput, a dict or a (prompt_ids, completion_ids) pair, "
            f"got {type(item).__name__}"
        )
    if (seq.prompt_ids is None) == (seq.messages is None):
        raise TeacherInputError(
            f"{where}: give exactly one of prompt_ids (token form) or messages (chat form)"
        )
    return seq


def _ids(value: Any, where: str, ndim: int) -> np.ndarray:
    """Token ids as an int32 array of ``ndim`` dimensions (the wire dtype), or a TeacherInputError."""
    arr = np.asarray(value)
    if arr.size == 0 and ndim == 1:
        arr = arr.reshape(0).astype(np.int32)
    if arr.ndim != ndim or (arr.size and arr.dtype.kind not in "iu"):
        raise TeacherInputError(
            f"{where}: expected a {ndim}-d array of integer token ids, got shape {list(arr.shape)} of "
            f"{arr.dtype.name}"
        )
    if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        bad = arr.min() if arr.min() < _INT32.min else arr.max()
        raise TeacherInputError(f"{where}: token id {int(bad)} does not fit int32 (token ids are >= 0)")
    return arr.astype(np.int32, copy=False)


def _sequence_doc(seq: SequenceInput, cand: Any, index: int) -> tuple[dict[str, Any], int, int]:
    """The wire form of one sequence, its token count (an upper bound in chat form) and its body bytes."""
    where = f"sequences[{index}]"
    completion = _ids(seq.completion_ids, f"{where}.completion_ids", 1)
    doc: dict[str, Any] = {"completion_ids": completion}
    if seq.prompt_ids is not None:
        doc["prompt_ids"] = _ids(seq.prompt_ids, f"{where}.prompt_ids", 1)
        tokens = doc["prompt_ids"].size + completion.size
        nbytes = 4 * tokens
    else:
        doc["messages"] = [{"role": str(m["role"]), "content": str(m["content"])} for m in seq.messages]
        # byte-level BPE never makes more tokens than UTF-8 bytes: a safe bound for chunking
        text_bytes = sum(len(m["content"].encode()) + len(m["role"]) for m in doc["messages"])
        tokens = completion.size + text_bytes + _CHAT_TOKENS_PER_MESSAGE * len(doc["messages"])
        nbytes = 4 * completion.size + text_bytes
    if cand is not None:
        arr = _ids(cand, f"candidate_ids[{index}]", 2)
        if arr.shape[0] != completion.size or arr.shape[1] < 1:
            raise TeacherInputError(
                f"candidate_ids[{index}]: shape {list(arr.shape)} does not fit a completion of "
                f"{completion.size} tokens; expected ({completion.size}, K) with K >= 1"
            )
        doc["candidate_ids"] = arr
        nbytes += 4 * arr.size
    return doc, int(tokens), int(nbytes) + 64


@dataclass
class GeneratedSample:
    """One teacher sample from ``/v1/generate``."""

    completion_ids: np.ndarray  # (T,) int32, EOS included when finish_reason == "stop" on EOS
    text: str
    finish_reason: str  # "stop" | "length"
    cumulative_logprob: float | None


def _prompt_doc(prompt: Any, where: str) -> dict[str, Any]:
    """A generate prompt: token ids, a text string, a list of chat messages, or a dict with one of those."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, Mapping):
        keys = set(prompt)
        if len(keys & {"prompt_ids", "prompt", "messages"}) != 1 or keys - {
            "prompt_ids",
            "prompt",
            "messages",
        }:
            raise TeacherInputError(
                f"{where}: a prompt dict needs exactly one of prompt_ids, prompt or messages, got {sorted(keys)}"
            )
        if "prompt_ids" in prompt:
            return {"prompt_ids": _ids(prompt["prompt_ids"], f"{where}.prompt_ids", 1)}
        return dict(prompt)
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
        return {"messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]}
    return {"prompt_ids": _ids(prompt, where, 1)}


# ------------------------------------------------------------------------------------------------ client


class TeacherClient:
    """Async client over one or more teacher URLs (use ``async with`` or call :meth:`aclose`).

    ``timeout_s`` bounds one HTTP request (a whole chunk); ``retry`` (or ``max_wait_s`` / ``max_attempts``)
    bounds a whole call. Chunks hold at most ``max_sequences_per_request`` sequences and
    ``max_tokens_per_request`` tokens, tightened to the servers' own limits once :meth:`model_info` ran.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        max_wait_s: float | None = None,
        max_attempts: int | None = None,
        max_sequences_per_request: int = 64,
        max_tokens_per_request: int = 262_144,
        max_inflight_per_endpoint: int = 4,
        seed: int | None = None,
    ) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        self.urls = check_urls(urls)
        for name, value in (
            ("timeout_s", timeout_s),
            ("connect_timeout_s", connect_timeout_s),
            ("max_sequences_per_request", max_sequences_per_request),
            ("max_tokens_per_request", max_tokens_per_request),
            ("max_inflight_per_endpoint", max_inflight_per_endpoint),
        ):
            if not value > 0:
                raise TeacherInputError(f"{name} must be positive, got {value}")
        retry = retry or RetryPolicy()
        if max_wait_s is not None or max_attempts is not None:
            retry = RetryPolicy(
                max_wait_s=retry.max_wait_s if max_wait_s is None else max_wait_s,
                max_attempts=max_attempts if max_attempts is not None else retry.max_attempts,
                base_delay_s=retry.base_delay_s,
                max_delay_s=retry.max_delay_s,
            )
        self.retry = retry
        self.max_sequences = max_sequences_per_request
        self.max_tokens = max_tokens_per_request
        self.max_body_bytes: int | None = None
        self.max_top_k: int | None = None
        self.infos: dict[str, ModelInfo] = {}
        self._headers = {"content-type": codec.MSGPACK, "accept": codec.MSGPACK}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        n = max_inflight_per_endpoint * len(self.urls)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=60.0),
        )
        self.pool = EndpointPool(self.urls, self._http, retry, max_inflight_per_endpoint, seed)

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def take_stats(self) -> ClientStats:
        """Counters (requests, retries, bytes, latencies, per-URL requests) since the last call."""
        return self.pool.take_stats()

    def _deadline(self) -> float:
        return time.monotonic() + self.retry.max_wait_s

    # ------------------------------------------------------------------------------------------- model
    async def model_info(self) -> dict[str, ModelInfo]:
        """``GET /v1/model`` on every URL (retried while a teacher loads); all must share a tokenizer.

        Also tightens the chunk limits to the strictest server's. Raises :class:`TeacherIncompatible`
        when the endpoints report different tokenizer fingerprints.
        """
        deadline = self._deadline()

        async def one(ep) -> ModelInfo:
            reply = await self.pool.request(
                "GET", "/v1/model", headers=self._headers, deadline=deadline, endpoint=ep
            )
            try:
                return ModelInfo.model_validate(_decode(reply))
            except ValueError as exc:
                raise TeacherProtocolError(
                    f"teacher {reply.url}/v1/model: unexpected answer: {exc}"
                ) from None

        infos = await _gather([one(ep) for ep in self.pool.endpoints])
        self.infos = dict(zip(self.urls, infos, strict=True))
        prints = {url: info.tokenizer_fingerprint for url, info in self.infos.items()}
        if len(set(prints.values())) > 1:
            listing = ", ".join(f"{url} -> {fp}" for url, fp in prints.items())
            raise TeacherIncompatible(
                f"the teacher endpoints serve different tokenizers ({listing}); every URL of one trainer must "
                "serve the same teacher"
            )
        if len({info.model for info in infos}) > 1:
            names = {url: info.model for url, info in self.infos.items()}
            log.warning("teacher endpoints share a tokenizer but report different models: %s", names)
        self._apply_server_limits(infos)
        return dict(self.infos)

    def _apply_server_limits(self, infos: list[ModelInfo]) -> None:
        """Chunk within the strictest server's per-request limits (a 413 would not be retried)."""

        def strictest(key: str, current: int | None) -> int | None:
            values = [info.limits[key] for info in infos if key in info.limits]
            values += [] if current is None else [current]
            return min(values) if values else None

        self.max_sequences = strictest("max_request_sequences", self.max_sequences)
        self.max_tokens = strictest("max_request_tokens", self.max_tokens)
        self.max_body_bytes = strictest("max_body_bytes", None)
        self.max_top_k = min(info.max_top_k for info in infos)

    # ------------------------------------------------------------------------------------------- score
    async def score(
        self,
        sequences: Sequence[SequenceInput | Mapping[str, Any] | tuple[Any, Any]],
        *,
        top_k: int = DEFAULT_TOP_K,
        return_entropy: bool = False,
        candidate_ids: Sequence[np.ndarray | None] | None = None,
        temperature: float = 1.0,
        return_tokens: bool = False,
    ) -> list[ScoredSequence]:
        """Teacher scores of every sequence, in input order (see :class:`shared.protocol.ScoredSequence`).

        ``candidate_ids[i]`` is a (T_i, K) array of ids at which the teacher's full-vocabulary log-probs are
        returned as ``candidate_logprobs`` (the student's stored top-k for the student-top-k loss).
        """
        opts = self._score_options(len(sequences), top_k, temperature, candidate_ids)
        opts.update(return_entropy=bool(return_entropy), return_tokens=bool(return_tokens))
        docs, tokens, nbytes = [], [], []
        for i, item in enumerate(sequences):
            cand = None if candidate_ids is None else candidate_ids[i]
            doc, n_tok, n_bytes = _sequence_doc(as_sequence_input(item, f"sequences[{i}]"), cand, i)
            docs.append(doc)
            tokens.append(n_tok)
            nbytes.append(n_bytes)
        if not docs:
            return []
        ranges = self._chunks(tokens, nbytes)
        results: list[ScoredSequence | None] = [None] * len(docs)
        deadline = self._deadline()

        async def run(start: int, end: int) -> None:
            body = await _encode({"sequences": docs[start:end], **opts}, sum(nbytes[start:end]))
            reply = await self.pool.request(
                "POST", "/v1/score", content=body, headers=self._headers, deadline=deadline
            )
            for j, res in enumerate(await _results(reply, end - start)):
                scored = ScoredSequence.from_wire(res)
                if not np.array_equal(scored.completion_ids, docs[start + j]["completion_ids"]):
                    raise TeacherProtocolError(
                        f"teacher {reply.url}/v1/score: result {j} of a chunk carries other completion ids "
                        f"than sequences[{start + j}] (out-of-order or corrupted answer)"
                    )
                results[start + j] = scored

        await _gather([run(a, b) for a, b in ranges])
        return results  # type: ignore[return-value]  # every slot was filled by exactly one chunk

    def _score_options(
        self, n: int, top_k: int, temperature: float, candidate_ids: Sequence[Any] | None
    ) -> dict[str, Any]:
        limit = self.max_top_k
        if not isinstance(top_k, (int, np.integer)) or top_k < 0 or (limit is not None and top_k > limit):
            bound = f"0..{limit}" if limit is not None else ">= 0"
            raise TeacherInputError(f"top_k: {top_k!r} is outside {bound} (the teachers' max_top_k)")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise TeacherInputError(f"temperature: {temperature!r} must be a finite number > 0")
        if candidate_ids is not None and len(candidate_ids) != n:
            raise TeacherInputError(
                f"candidate_ids: {len(candidate_ids)} entries for {n} sequences; give one (T, K) array per "
                "sequence or None"
            )
        return {"top_k": int(top_k), "temperature": float(temperature)}

    def _chunks(self, tokens: list[int], nbytes: list[int]) -> list[tuple[int, int]]:
        ranges = split_contiguous(tokens, len(self.urls), self.max_sequences, self.max_tokens)
        if self.max_body_bytes is None:
            return ranges
        # rare: a body cap tighter than the token cap (many candidate ids); cut those ranges further
        out = []
        for a, b in ranges:
            sub = split_contiguous(nbytes[a:b], 1, b - a, self.max_body_bytes * 9 // 10)
            out.extend((a + s, a + e) for s, e in sub)
        return out

    # ---------------------------------------------------------------------------------------- generate
    async def generate(
        self,
        prompts: Sequence[Any],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[list[GeneratedSample]]:
        """``n`` teacher samples per prompt, in prompt order. A prompt is token ids, a text string, a list of
        chat messages (rendered with the teacher's template) or a dict with one of those keys.

        Prompts are spread over the endpoints in contiguous chunks; with a ``seed`` the hf backend seeds
        each prompt by its index within the request, so reproducibility needs the same URLs and chunk limits.
        """
        if n < 1:
            raise TeacherInputError(f"n: {n} samples per prompt must be >= 1")
        docs = [_prompt_doc(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        if not docs:
            return []
        opts: dict[str, Any] = {"n": int(n), "temperature": float(temperature), "top_p": float(top_p)}
        opts.update(max_tokens=int(max_tokens), seed=seed)
        if stop:
            opts["stop"] = list(stop)
        if stop_token_ids:
            opts["stop_token_ids"] = [int(t) for t in stop_token_ids]
        cost = [(len(d.get("prompt_ids", ())) + max_tokens) * n for d in docs]
        ranges = split_contiguous(cost, len(self.urls), max(1, self.max_sequences // n), self.max_tokens)
        results: list[list[GeneratedSample] | None] = [None] * len(docs)
        deadline = self._deadline()

        async def run(start: int, end: int) -> None:
            body = await _encode({"prompts": docs[start:end], **opts}, 0)
            reply = await self.pool.request(
                "POST", "/v1/generate", content=body, headers=self._headers, deadline=deadline
            )
            for j, res in enumerate(await _results(reply, end - start)):
                results[start + j] = [
                    GeneratedSample(
                        completion_ids=codec.as_array(s["completion_ids"], "int32"),
                        text=s["text"],
                        finish_reason=s["finish_reason"],
                        cumulative_logprob=s.get("cumulative_logprob"),
                    )
                    for s in res["samples"]
                ]

        await _gather([run(a, b) for a, b in ranges])
        return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- helpers


async def _encode(doc: dict[str, Any], approx_bytes: int) -> bytes:
    if approx_bytes > _OFF_LOOP_BYTES:  # keep the event loop (other chunks' I/O) responsive
        return await asyncio.to_thread(codec.encode, doc, codec.MSGPACK)
    return codec.encode(doc, codec.MSGPACK)


def _decode(reply: Reply) -> Any:
    fmt = codec.media_type(reply.content_type) or codec.MSGPACK
    try:
        return codec.decode(reply.content, fmt)
    except codec.CodecError as exc:
        raise TeacherProtocolError(f"teacher {reply.url}: undecodable answer: {exc}") from None


async def _results(reply: Reply, expected: int) -> list[dict[str, Any]]:
    """The ``results`` list of a score/generate answer, checked to hold one entry per item sent."""
    doc = await asyncio.to_thread(_decode, reply) if len(reply.content) > _OFF_LOOP_BYTES else _decode(reply)
    got = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(got, list) or len(got) != expected:
        n = len(got) if isinstance(got, list) else "no"
        raise TeacherProtocolError(f"teacher {reply.url} answered {n} results for {expected} items sent")
    return got


async def _gather(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; on the first error cancel the rest (so no request outlives a failed call)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# ------------------------------------------------------------------------------------- compatibility


def check_compatibility(
    info: ModelInfo | Mapping[str, ModelInfo],
    student_tokenizer_fingerprint: str,
    *,
    needs_candidate_ids: bool = False,
    needs_entropy: bool = False,
    top_k: int | None = None,
    allow_mismatch: bool = False,
) -> list[str]:
    """Refuse a teacher that cannot serve this student and loss; returns warnings (an overridden mismatch).

    Tokenizer fingerprints must match (the teacher's log-probs are read at the student's token ids), unless
    ``allow_mismatch``. Capabilities cannot be overridden: the student-top-k loss needs log-probs at the
    student's candidate ids, the entropy-gap metric needs the teacher's entropy.
    """
    infos = info if isinstance(info, Mapping) else {"(URL not given)": info}
    warnings: list[str] = []
    for url, inf in infos.items():
        if inf.tokenizer_fingerprint != student_tokenizer_fingerprint:
            msg = (
                f"teacher {url} ({inf.model}) uses tokenizer {inf.tokenizer_fingerprint}, the student "
                f"{student_tokenizer_fingerprint}: on-policy distillation compares log-probs token id by "
                "token id, so both must share one tokenizer (e.g. the same model family)"
            )
            if not allow_mismatch:
                raise TeacherIncompatible(msg + "; override only if you know the ids agree (allow_mismatch)")
            log.warning("%s; continuing because the mismatch was explicitly allowed", msg)
            warnings.append(msg)
        caps = inf.capabilities
        if needs_candidate_ids and not caps.candidate_ids:
            raise TeacherIncompatible(
                f"teacher {url} ({inf.backend} backend) cannot return log-probs at the student's candidate "
                "ids (capabilities.candidate_ids = false), which the student-top-k loss needs; serve the "
                "teacher with the hf backend or choose a loss that needs only the teacher's top-k"
            )
        if needs_entropy and not caps.entropy:
            raise TeacherIncompatible(
                f"teacher {url} ({inf.backend} backend) cannot return its entropy (capabilities.entropy = "
                "false); disable the entropy-gap metric or serve the teacher with the hf backend"
            )
        if top_k is not None and top_k > inf.max_top_k:
            raise TeacherIncompatible(
                f"teacher {url} allows top_k up to {inf.max_top_k}, the loss asks {top_k}; lower the loss's "
                f"top_k or start the teacher with --max-top-k {top_k}"
            )
    return warnings


# ---------------------------------------------------------------------------------------- sync facade


class SyncTeacherClient:
    """Blocking facade over :class:`TeacherClient`, which runs on a private event-loop thread.

    ``score_future`` returns a ``concurrent.futures.Future``: a training loop can send a micro-batch to the
    teacher and generate the next one while it is scored.
    """

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()

        async def make() -> TeacherClient:
            return TeacherClient(urls, **kwargs)

        try:
            self.client = self._submit(make()).result()
        except BaseException:
            self._stop_loop()
            raise

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def model_info(self) -> dict[str, ModelInfo]:
        return self._submit(self.client.model_info()).result()

    def score_future(self, sequences: Sequence[Any], **kwargs: Any) -> concurrent.futures.Future:
        return self._submit(self.client.score(sequences, **kwargs))

    def score(self, sequences: Sequence[Any], **kwargs: Any) -> list[ScoredSequence]:
        return self.score_future(sequences, **kwargs).result()

    def generate(self, prompts: Sequence[Any], **kwargs: Any) -> list[list[GeneratedSample]]:
        return self._submit(self.client.generate(prompts, **kwargs)).result()

    def take_stats(self) -> ClientStats:
        return self.client.take_stats()

    def close(self) -> None:
        if self._loop.is_running():
            self._submit(self.client.aclose()).result()
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncTeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
