"""Client of one or more ``teacher-server`` endpoints: scores rollouts, samples teacher completions.

    async with TeacherClient(["http://t1:8000", "http://t2:8000"], api_key=key) as client:
        info = await client.model_info()        # {url: ModelInfo}; all must share one tokenizer
        check_compatibility(info, student_fingerprint, needs_candidate_ids=True)   # teacher.compat
        scored = await client.score(
            [SequenceInput(completion_ids=c, prompt_ids=p), ...], top_k=16, candidate_ids=[ids_T_K, ...]
        )

Bodies are built and read by :mod:`shared.wire` (the contract the server validates) and travel as msgpack
both ways (ids as packed int32 arrays, see :mod:`shared.codec`). A large batch is cut into contiguous chunks
spread over the endpoints and reassembled in order. Retries and load balancing live in
:mod:`student_trainer.teacher.pool`, the typed errors in :mod:`student_trainer.teacher.errors`: a call
either returns every result of the batch, each exactly once, or raises after the retry budget. :class:`SyncTeacherClient` runs the same client on a
private event-loop thread for synchronous code (and hands out futures, so scoring can overlap generation).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

from shared import codec, wire
from shared.protocol import DEFAULT_TOP_K, ModelInfo
from shared.wire import GeneratedSample, ScoredSequence
from student_trainer.teacher.errors import (
    TeacherError,
    TeacherIncompatible,
    TeacherInputError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherServerError,
    TeacherUnavailable,
)
from student_trainer.teacher.pool import (
    ClientStats,
    EndpointPool,
    Reply,
    RetryPolicy,
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
    "split_contiguous",
]

log = logging.getLogger("student_trainer.teacher.client")

_OFF_LOOP_BYTES = 4 << 20  # encode/decode bodies above this size in a worker thread
_CHAT_TOKENS_PER_MESSAGE = 8  # upper bound of a chat template's per-message overhead (role, markers)
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class SequenceInput:
    """One rollout to score: one prompt form (``prompt_ids``, ``prompt`` text or chat ``messages``) and the
    completion as ids (or as ``completion`` text in the text and chat forms).

    Chat form is the teacher-aligned prompt: the server renders ``messages`` with the TEACHER's chat template
    (``add_generation_prompt=True``) while ``completion_ids`` stay the student's tokens.
    """

    completion_ids: Sequence[int] | np.ndarray | None = None
    prompt_ids: Sequence[int] | np.ndarray | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None  # chat form: the teacher's template variables


_SEQUENCE_KEYS = frozenset(f.name for f in dataclasses.fields(SequenceInput))


def as_sequence_input(item: Any, where: str) -> SequenceInput:
    """Accept a :class:`SequenceInput`, a dict with its fields, or a ``(prompt_ids, completion_ids)`` pair."""
    if isinstance(item, SequenceInput):
        return item
    if isinstance(item, Mapping):
        unknown = set(item) - _SEQUENCE_KEYS
        if unknown:
            raise TeacherInputError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SEQUENCE_KEYS)}"
            )
        return SequenceInput(**item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return SequenceInput(prompt_ids=item[0], completion_ids=item[1])
    raise TeacherInputError(
        f"{where}: expected a SequenceInput, a dict or a (prompt_ids, completion_ids) pair, got {type(item).__name__}"
    )


def _sequence(item: Any, cand: Any, index: int) -> tuple[dict[str, Any], int, int]:
    """The wire form of one sequence (:func:`shared.wire.sequence_doc`), its token count (an upper bound in
    text and chat form, for chunking) and its approximate body size in bytes."""
    where = f"sequences[{index}]"
    fields = dataclasses.asdict(as_sequence_input(item, where))
    try:
        doc = wire.sequence_doc(**fields, candidate_ids=cand, where=where)
    except wire.WireInputError as exc:
        raise TeacherInputError(str(exc)) from None
    ids = sum(int(doc[k].size) for k in ("prompt_ids", "completion_ids", "candidate_ids") if k in doc)
    # byte-level BPE never makes more tokens than UTF-8 bytes: a safe bound for chunking
    text_bytes = len(doc.get("prompt", "").encode()) + len(doc.get("completion", "").encode())
    text_bytes += sum(len(m["content"].encode()) + len(m["role"]) for m in doc.get("messages", ()))
    tokens = text_bytes + _CHAT_TOKENS_PER_MESSAGE * len(doc.get("messages", ()))
    tokens += sum(int(doc[k].size) for k in ("prompt_ids", "completion_ids") if k in doc)
    return doc, int(tokens), 4 * ids + text_bytes + 64


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
        **options: Any,
    ) -> list[ScoredSequence]:
        """Teacher scores of every sequence, in input order (see :class:`shared.wire.ScoredSequence`).

        ``candidate_ids[i]`` is a (T_i, K) array of ids at which the teacher's full-vocabulary log-probs are
        returned as ``candidate_logprobs`` (the student's stored top-k for the student-top-k loss). Further
        ``options`` are :class:`shared.protocol.ScoreOptions` fields, passed through.
        """
        self._check_score_options(len(sequences), top_k, temperature, candidate_ids)
        opts = dict(top_k=top_k, temperature=temperature, return_entropy=return_entropy, **options)
        opts["return_tokens"] = return_tokens
        _checked(wire.score_request, opts)
        docs, tokens, nbytes = [], [], []
        for i, item in enumerate(sequences):
            cand = None if candidate_ids is None else candidate_ids[i]
            doc, n_tok, n_bytes = _sequence(item, cand, i)
            docs.append(doc)
            tokens.append(n_tok)
            nbytes.append(n_bytes)
        if not docs:
            return []
        ranges = self._chunks(tokens, nbytes)
        results: list[ScoredSequence | None] = [None] * len(docs)
        deadline = self._deadline()

        async def run(start: int, end: int) -> None:
            body = await _encode(wire.score_request(docs[start:end], **opts), sum(nbytes[start:end]))
            reply = await self.pool.request(
                "POST", "/v1/score", content=body, headers=self._headers, deadline=deadline
            )
            for j, res in enumerate(await _results(reply, end - start)):
                scored = _parsed(reply, ScoredSequence.from_wire, res)
                sent = docs[start + j].get("completion_ids")
                if sent is not None and not np.array_equal(scored.completion_ids, sent):
                    raise TeacherProtocolError(
                        f"teacher {reply.url}/v1/score: result {j} of a chunk carries other completion ids "
                        f"than sequences[{start + j}] (out-of-order or corrupted answer)"
                    )
                results[start + j] = scored

        await _gather([run(a, b) for a, b in ranges])
        return results  # type: ignore[return-value]  # every slot was filled by exactly one chunk

    def _check_score_options(
        self, n: int, top_k: int, temperature: float, candidate_ids: Sequence[Any] | None
    ) -> None:
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
        try:
            docs = [wire.prompt_doc(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        except wire.WireInputError as exc:
            raise TeacherInputError(str(exc)) from None
        if not docs:
            return []
        opts = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        opts.update(stop=stop, stop_token_ids=stop_token_ids)
        _checked(wire.generate_request, opts)
        cost = [(len(d.get("prompt_ids", ())) + max_tokens) * n for d in docs]
        ranges = split_contiguous(cost, len(self.urls), max(1, self.max_sequences // n), self.max_tokens)
        results: list[list[GeneratedSample] | None] = [None] * len(docs)
        deadline = self._deadline()

        async def run(start: int, end: int) -> None:
            body = await _encode(wire.generate_request(docs[start:end], **opts), 0)
            reply = await self.pool.request(
                "POST", "/v1/generate", content=body, headers=self._headers, deadline=deadline
            )
            for j, res in enumerate(await _results(reply, end - start)):
                results[start + j] = _parsed(reply, wire.generated_samples, res)

        await _gather([run(a, b) for a, b in ranges])
        return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- helpers


async def _encode(doc: dict[str, Any], approx_bytes: int) -> bytes:
    if approx_bytes > _OFF_LOOP_BYTES:  # keep the event loop (other chunks' I/O) responsive
        return await asyncio.to_thread(codec.encode, doc, codec.MSGPACK)
    return codec.encode(doc, codec.MSGPACK)


def _checked(build: Callable[..., dict[str, Any]], opts: dict[str, Any]) -> None:
    """Validate request options with the contract's own model before anything is sent."""
    try:
        build([], **opts)
    except wire.WireInputError as exc:
        raise TeacherInputError(str(exc)) from None


def _decode(reply: Reply) -> Any:
    fmt = codec.media_type(reply.content_type) or codec.MSGPACK
    try:
        return codec.decode(reply.content, fmt)
    except codec.CodecError as exc:
        raise TeacherProtocolError(f"teacher {reply.url}: undecodable answer: {exc}") from None


async def _results(reply: Reply, expected: int) -> list[Mapping[str, Any]]:
    """The ``results`` list of a score/generate answer, checked to hold one entry per item sent."""
    doc = await asyncio.to_thread(_decode, reply) if len(reply.content) > _OFF_LOOP_BYTES else _decode(reply)
    return _parsed(reply, wire.response_results, doc, expected)


def _parsed(reply: Reply, read: Callable[..., T], *args: Any) -> T:
    """``read(*args)`` with a wire-format error reported as the teacher's protocol error."""
    try:
        return read(*args)
    except wire.WireFormatError as exc:
        raise TeacherProtocolError(f"teacher {reply.url}: {exc}") from None


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


# ---------------------------------------------------------------------------------------- sync facade


class SyncFacade:
    """A client that lives on a private event-loop thread, with the blocking calls every teacher client has.

    ``factory`` builds the async client on that loop. ``score_future`` returns a ``concurrent.futures.Future``:
    a training loop can send a micro-batch to the teacher and generate the next one while it is scored.
    """

    def __init__(self, factory: Callable[[], Any], thread_name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=thread_name, daemon=True)
        self._thread.start()

        async def make() -> Any:
            return factory()

        try:
            self.client = self._submit(make()).result()
        except BaseException:
            self._stop_loop()
            raise

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def score_future(self, sequences: Sequence[Any], **kwargs: Any) -> concurrent.futures.Future:
        return self._submit(self.client.score(sequences, **kwargs))

    def score(self, sequences: Sequence[Any], **kwargs: Any) -> list[ScoredSequence]:
        return self.score_future(sequences, **kwargs).result()

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

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncTeacherClient(SyncFacade):
    """Blocking facade over :class:`TeacherClient`, which runs on a private event-loop thread."""

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(lambda: TeacherClient(urls, **kwargs), "teacher-client")

    def model_info(self) -> dict[str, ModelInfo]:
        return self._submit(self.client.model_info()).result()

    def generate(self, prompts: Sequence[Any], **kwargs: Any) -> list[list[GeneratedSample]]:
        return self._submit(self.client.generate(prompts, **kwargs)).result()
