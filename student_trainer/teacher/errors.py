"""Typed errors of the teacher boundary. Each says which teacher (URL), what it answered and what to do.

TeacherError (student_trainer.errors.TrainerError)
├── TeacherInputError (ValueError)   a bad argument to the client, caught before anything is sent
├── TeacherRequestError              the server refused the request (4xx): fix the request
├── TeacherUnavailable               no endpoint answered within the retry budget
├── TeacherServerError               the server kept answering HTTP 500 (its bug, see its log)
├── TeacherProtocolError             a 2xx answer that breaks the wire contract
└── TeacherIncompatible              this teacher cannot serve this student or loss
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from student_trainer.errors import TrainerError


class TeacherError(TrainerError):
    """Base of every error the teacher boundary raises (HTTP client, local teacher, compatibility checks)."""


class TeacherInputError(TeacherError, ValueError):
    """A bad argument to the client (caught before anything is sent): names the field, value and limit."""


class TeacherRequestError(TeacherError):
    """The server refused the request (4xx other than 408/429). Retrying cannot help: fix the request."""

    def __init__(
        self,
        url: str,
        status: int,
        message: str,
        *,
        type: str | None = None,
        field: str | None = None,
        value: Any = None,
        limit: Any = None,
    ) -> None:
        self.url, self.status, self.message = url, status, message
        self.type, self.field, self.value, self.limit = type, field, value, limit
        super().__init__(f"teacher {url} answered HTTP {status}: {message}")


class TeacherUnavailable(TeacherError):
    """No endpoint answered within the retry budget. ``errors`` maps each URL tried to its last error."""

    def __init__(self, what: str, attempts: int, waited_s: float, budget: str, errors: Mapping[str, str]):
        self.attempts, self.waited_s, self.errors = attempts, waited_s, dict(errors)
        last = "; ".join(f"{url}: {err}" for url, err in errors.items())
        super().__init__(
            f"no teacher answered {what} after {attempts} attempt(s) over {waited_s:.1f}s ({budget}); "
            f"last errors: {last}"
        )


class TeacherServerError(TeacherError):
    """The server kept failing with HTTP 500 (a bug on its side, not an outage); carries the URL and message."""

    def __init__(self, url: str, status: int, message: str, attempts: int) -> None:
        self.url, self.status, self.message, self.attempts = url, status, message, attempts
        super().__init__(
            f"teacher {url} answered HTTP {status} {attempts} time(s) for the same request: {message} "
            "(see the server's log)"
        )


class TeacherProtocolError(TeacherError):
    """A 2xx answer the client cannot use (undecodable body, wrong number of results, ids that differ)."""


class TeacherIncompatible(TeacherError):
    """The teacher(s) cannot serve this student or loss: tokenizer fingerprint or capability mismatch."""
