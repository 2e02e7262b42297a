"""Transport of the teacher client: endpoints, load balancing, retries with backoff, typed errors, stats.

A large batch is cut into contiguous chunks (:func:`split_contiguous`), at least one per endpoint, so the
results reassemble in order. One logical request (a chunk of sequences) goes to the healthy endpoint with the fewest outstanding
requests (round-robin among equals). A connection error, a timeout, 408, 429 or 5xx marks that endpoint down
for a cool-down (exponential in its consecutive failures, full jitter, never shorter than the server's
Retry-After) and the request moves on: at once to another healthy endpoint if there is one, else it waits
for the first endpoint to come back. That repeats until the call's deadline (``max_wait_s``) or
``max_attempts``, then :class:`TeacherUnavailable`. Any other 4xx is the caller's mistake and is raised at
once as :class:`TeacherRequestError`, with the server's message.

Each request's result is handed back exactly once, so a dead teacher can delay a training step but never
lose or double one. Scoring is idempotent, so re-sending a request whose answer was lost is safe.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from shared import codec
from student_trainer.teacher.errors import (
    TeacherInputError,
    TeacherRequestError,
    TeacherServerError,
    TeacherUnavailable,
)

log = logging.getLogger("student_trainer.teacher.client")

RETRYABLE_STATUS = frozenset({408, 429})  # plus every 5xx


# ------------------------------------------------------------------------------------------ retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """How long one client call keeps retrying. Defaults outlast a teacher restart of a few minutes."""

    max_wait_s: float = 600.0  # per call: retrying stops (TeacherUnavailable) once this much time has passed
    max_attempts: int | None = None  # per request; None = bounded by max_wait_s only
    base_delay_s: float = 0.25  # cool-down after an endpoint's first failure (before jitter)
    max_delay_s: float = 10.0  # cap of the exponential cool-down (Retry-After may ask for longer)
    # HTTP 500 usually means a bug that the same request will hit again (a restarting or overloaded teacher
    # gives connection errors, 502-504 or 503), so a request answered 500 this often ends the call
    max_internal_errors: int = 3

    def __post_init__(self) -> None:
        if not self.max_wait_s >= 0:
            raise TeacherInputError(f"max_wait_s must be >= 0 seconds, got {self.max_wait_s}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise TeacherInputError(f"max_attempts must be >= 1 or None (no limit), got {self.max_attempts}")
        if self.max_internal_errors < 1:
            raise TeacherInputError(f"max_internal_errors must be >= 1, got {self.max_internal_errors}")
        if not 0 < self.base_delay_s <= self.max_delay_s:
            raise TeacherInputError(
                f"need 0 < base_delay_s <= max_delay_s, got base_delay_s={self.base_delay_s}, "
                f"max_delay_s={self.max_delay_s}"
            )

    def describe(self) -> str:
        attempts = f", max_attempts={self.max_attempts}" if self.max_attempts else ""
        return f"max_wait_s={self.max_wait_s:g}{attempts}"


def backoff_delay(failures: int, base_s: float, cap_s: float, u: float) -> float:
    """Exponential backoff with full jitter: ``u * min(cap, base * 2**(failures - 1))``, ``u`` in [0, 1).

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads clients that failed
    together, so a restarted teacher is not hit by all of them in the same millisecond.
    """
    if failures < 1:
        return 0.0
    return u * min(cap_s, base_s * 2.0 ** min(failures - 1, 62))


def parse_retry_after(value: str | None, now_epoch: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now_epoch is None else now_epoch
    return max(0.0, when.timestamp() - now)


# ----------------------------------------------------------------------------------------------- chunking


def split_contiguous(
    weights_N: Sequence[int], parts: int, max_items: int, max_weight: int | None = None
) -> list[tuple[int, int]]:
    """Cut N items into contiguous ``[start, end)`` ranges balanced by weight.

    At least ``min(parts, N)`` ranges, each with at most ``max_items`` items and at most ``max_weight`` total
    weight (an item heavier than that gets a range of its own). Contiguous ranges keep results in request
    order when reassembled.
    """
    n, total = len(weights_N), sum(weights_N)
    ranges: list[tuple[int, int]] = []
    start, before = 0, 0  # before: weight of the closed ranges
    while start < n:
        left_n, left_w = n - start, total - before
        need = max(parts - len(ranges), math.ceil(left_n / max_items))
        if max_weight:
            need = max(need, math.ceil(left_w / max_weight))
        need = min(need, left_n)
        target = left_w / need  # re-balanced after every range, so a forced cut does not skew the rest
        end, acc = start, 0
        while end < n:
            w = weights_N[end]
            full = end - start >= max_items or (max_weight is not None and acc + w > max_weight)
            # stop when this item's midpoint passes the target, or the other ranges would run out of items
            if end > start and (full or acc + w / 2 > target or n - end < need):
                break
            acc, end = acc + w, end + 1
        ranges.append((start, end))
        start, before = end, before + acc
    return ranges


# ------------------------------------------------------------------------------------------------- stats


@dataclass
class ClientStats:
    """Client-side counters for the trainer's metrics; :meth:`summary` gives namespaced floats."""

    requests: int = 0  # successful HTTP exchanges
    failures: int = 0  # failed attempts (connection errors, timeouts, retryable statuses)
    retries: int = 0  # attempts that followed a failure
    bytes_sent: int = 0
    bytes_received: int = 0
    backoff_s: float = 0.0  # time requests spent waiting for an endpoint to come back
    latencies_s: list[float] = field(default_factory=list)  # per successful request
    status_failures: dict[int, int] = field(default_factory=dict)  # e.g. {503: 2}
    requests_per_url: dict[str, int] = field(default_factory=dict)

    def summary(self, prefix: str = "teacher/") -> dict[str, float]:
        lat = sorted(self.latencies_s)
        out = {
            "requests": float(self.requests),
            "failures": float(self.failures),
            "retries": float(self.retries),
            "bytes_sent": float(self.bytes_sent),
            "bytes_received": float(self.bytes_received),
            "backoff_s": self.backoff_s,
            "latency_mean_s": sum(lat) / len(lat) if lat else 0.0,
            "latency_p50_s": lat[len(lat) // 2] if lat else 0.0,
            "latency_max_s": lat[-1] if lat else 0.0,
        }
        return {prefix + k: v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------- pool


def check_urls(urls: list[str]) -> list[str]:
    """Validated teacher base URLs without trailing slashes; each at most once."""
    if not urls:
        raise TeacherInputError("urls: give at least one teacher URL, e.g. http://127.0.0.1:8000")
    out = []
    for url in urls:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise TeacherInputError(f"urls: {url!r} is not an http(s) URL such as http://127.0.0.1:8000")
        out.append(url.rstrip("/"))
    if len(set(out)) != len(out):
        raise TeacherInputError(f"urls: {out} lists a URL twice")
    return out


@dataclass
class Endpoint:
    """One teacher URL and what the client knows about its health."""

    url: str
    outstanding: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0  # time.monotonic() before which the endpoint is avoided
    last_error: str | None = None


@dataclass
class _Failure:
    reason: str
    retry_after: float | None = None
    status: int | None = None
    message: str = ""


@dataclass
class Reply:
    url: str
    status: int
    content: bytes
    content_type: str


def error_from_response(url: str, response: httpx.Response) -> TeacherRequestError:
    """The server's ``{"error": {type, message, field, value, limit}}`` body as a typed exception."""
    try:
        doc = codec.decode(response.content, codec.media_type(response.headers.get("content-type")) or "")
        err = doc["error"] if isinstance(doc, dict) and isinstance(doc.get("error"), dict) else {}
    except (codec.CodecError, KeyError):
        err = {}
    message = err.get("message") or response.text[:300] or response.reason_phrase
    return TeacherRequestError(
        url,
        response.status_code,
        str(message),
        type=err.get("type"),
        field=err.get("field"),
        value=err.get("value"),
        limit=err.get("limit"),
    )


class EndpointPool:
    """Load balancing and retries over several teacher URLs sharing one pooled ``httpx.AsyncClient``.

    ``max_inflight_per_endpoint`` bounds concurrent requests to the pool as a whole (times the number of
    endpoints), so while one endpoint is down the others take its share.
    """

    def __init__(
        self,
        urls: list[str],
        http: httpx.AsyncClient,
        policy: RetryPolicy,
        max_inflight_per_endpoint: int = 4,
        seed: int | None = None,
    ) -> None:
        self.endpoints = [Endpoint(u) for u in urls]
        self.http = http
        self.policy = policy
        self.stats = ClientStats()
        self._slots = asyncio.Semaphore(max_inflight_per_endpoint * len(urls))
        self._rng = random.Random(seed)
        self._next = 0  # round-robin cursor among equally loaded endpoints

    # -------------------------------------------------------------------------------------- selection
    def _healthy(self, now: float) -> list[int]:
        return [i for i, e in enumerate(self.endpoints) if e.down_until <= now]

    def pick(self, now: float) -> Endpoint | None:
        """The healthy endpoint with the fewest outstanding requests (round-robin on ties), or None."""
        healthy = self._healthy(now)
        if not healthy:
            return None
        n = len(self.endpoints)
        best = min(healthy, key=lambda i: (self.endpoints[i].outstanding, (i - self._next) % n))
        self._next = (best + 1) % n
        return self.endpoints[best]

    def _mark_ok(self, ep: Endpoint) -> None:
        if ep.failures:
            log.info("teacher %s is answering again", ep.url)
        ep.failures, ep.down_until, ep.last_error = 0, 0.0, None

    def _mark_failed(self, ep: Endpoint, failure: _Failure, now: float) -> bool:
        """Start or extend the endpoint's cool-down; True when this failure is a new outage step."""
        # Requests that were in flight together all fail together: count one failure per outage step,
        # not one per request, so the cool-down does not jump to its cap after a single outage.
        new_step = ep.down_until <= now
        if new_step:
            ep.failures += 1
        delay = backoff_delay(
            ep.failures, self.policy.base_delay_s, self.policy.max_delay_s, self._rng.random()
        )
        ep.down_until = max(ep.down_until, now + max(delay, failure.retry_after or 0.0))
        ep.last_error = failure.reason
        return new_step

    # ------------------------------------------------------------------------------------------ sending
    async def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        deadline: float,
        timeout: float | httpx.Timeout | None = None,
        endpoint: Endpoint | None = None,
    ) -> Reply:
        """Send one logical request with retries; return the first 2xx reply.

        ``deadline`` (``time.monotonic()``) is shared by all requests of one client call. ``endpoint`` pins
        the request to one URL (used for per-URL queries such as ``/v1/model``).
        """
        attempts, internal, start, errors = 0, 0, time.monotonic(), {}
        while True:
            await self._wait_for_endpoint(deadline, endpoint)
            async with self._slots:
                # choose only once a slot is free, so the choice reflects the load at sending time
                ep = endpoint or self.pick(time.monotonic()) or self._soonest()
                attempts += 1
                if attempts > 1:
                    self.stats.retries += 1
                failure, reply = await self._attempt(ep, method, path, content, headers, timeout)
            if reply is not None:
                return reply
            now = time.monotonic()
            new_step = self._mark_failed(ep, failure, now)
            errors[ep.url] = failure.reason
            internal += failure.status == 500
            if internal >= self.policy.max_internal_errors:
                raise TeacherServerError(ep.url + path, 500, failure.message, internal)
            budget_spent = now >= deadline
            attempts_spent = self.policy.max_attempts is not None and attempts >= self.policy.max_attempts
            if budget_spent or attempts_spent:
                raise TeacherUnavailable(
                    f"{method} {path}", attempts, now - start, self.policy.describe(), errors
                )
            # one warning per outage step of an endpoint, not one per waiting request
            log.log(
                logging.WARNING if new_step else logging.DEBUG,
                "teacher %s%s failed (%s); attempt %d of this request, retrying%s",
                ep.url,
                path,
                failure.reason,
                attempts,
                "" if endpoint else " on the next available teacher",
            )

    def _soonest(self) -> Endpoint:
        return min(self.endpoints, key=lambda e: e.down_until)

    async def _wait_for_endpoint(self, deadline: float, pinned: Endpoint | None) -> None:
        """Return when ``pinned`` (or, unpinned, any endpoint) is due to be tried; never past the deadline."""
        now = time.monotonic()
        if pinned is None and self._healthy(now):
            return
        due = (pinned or self._soonest()).down_until
        wait = min(due, deadline) - now
        if wait > 0:
            self.stats.backoff_s += wait
            await asyncio.sleep(wait)

    async def _attempt(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float | httpx.Timeout | None,
    ) -> tuple[_Failure | None, Reply | None]:
        url = ep.url + path
        ep.outstanding += 1
        t0 = time.perf_counter()
        try:
            kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
            response = await self.http.request(method, url, content=content, headers=headers, **kwargs)
        except httpx.TransportError as exc:  # connect/read/write errors, timeouts, broken connections
            self.stats.failures += 1
            return _Failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), None
        finally:
            ep.outstanding -= 1
        latency = time.perf_counter() - t0
        status = response.status_code
        if status >= 500 or status in RETRYABLE_STATUS:
            self.stats.failures += 1
            self.stats.status_failures[status] = self.stats.status_failures.get(status, 0) + 1
            err = error_from_response(url, response)
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            return _Failure(f"HTTP {status}: {err.message}", retry_after, status, err.message), None
        self._mark_ok(ep)  # the server answered: it is alive even when it refuses the request
        if status >= 400:
            raise error_from_response(url, response)
        st = self.stats
        st.requests += 1
        st.bytes_sent += len(content or b"")
        st.bytes_received += len(response.content)
        st.latencies_s.append(latency)
        st.requests_per_url[ep.url] = st.requests_per_url.get(ep.url, 0) + 1
        return None, Reply(ep.url, status, response.content, response.headers.get("content-type", ""))

    def take_stats(self) -> ClientStats:
        """The counters since the last call, and start new ones."""
        stats, self.stats = self.stats, ClientStats()
        return stats
