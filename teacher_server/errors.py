"""Client errors as part of the interface: every one names the field, the value and the limit.

Two types: :class:`APIError` is the HTTP answer (status, body, headers) raised by the request layer;
:class:`UnsupportedRequest` is what a backend raises when it cannot serve a valid request (backends know
nothing of HTTP). :func:`as_api_error` is the one place that turns the second into the first.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

_MAX_VALUE_CHARS = 200


class APIError(Exception):
    """An error the client can fix (4xx) or a server state it should wait out (503)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        limit: Any = None,
        type: str = "invalid_request",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.value, self.limit, self.type, self.headers = _short(value), limit, type, headers

    def body(self) -> dict[str, Any]:
        err = {"type": self.type, "message": self.message, "field": self.field}
        err.update(value=self.value, limit=self.limit)
        return {"error": err}


class UnsupportedRequest(ValueError):
    """A backend cannot serve this (well-formed) request: a capability it lacks, or its engine's own
    validation refused it. Answered as 422 ``invalid_request`` with the same fields."""

    def __init__(
        self, message: str, *, field: str | None = None, value: Any = None, limit: Any = None
    ) -> None:
        super().__init__(message)
        self.message, self.field, self.value, self.limit = message, field, value, limit


def as_api_error(exc: BaseException) -> APIError | None:
    """The HTTP error for ``exc``: itself when it is one, a 422 for a backend's refusal, None otherwise."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnsupportedRequest):
        return APIError(422, exc.message, field=exc.field, value=exc.value, limit=exc.limit)
    return None


def _short(value: Any) -> Any:
    """Keep echoed values small and JSON-safe: a 100k-element list is summarised, not returned."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"[packed array {value.dtype} shape {list(value.shape)}]"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        return f"{{object with keys {sorted(value)[:8]}}}"
    if isinstance(value, str) and len(value) > _MAX_VALUE_CHARS:
        return value[:_MAX_VALUE_CHARS] + "..."
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_short(v) for v in value]
    return repr(value)[:_MAX_VALUE_CHARS]


def field_path(loc: tuple[Any, ...]) -> str:
    """pydantic loc ('sequences', 2, 'completion_ids', 5) -> 'sequences[2].completion_ids[5]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_LIMIT_KEYS = ("ge", "gt", "le", "lt", "min_length", "max_length", "expected")


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as an APIError (422), with a summary of the others in the message."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    where = field_path(loc)
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = f"unknown field {loc[-1]!r} (check the spelling; see GET /docs for the schema)"
    ctx = first.get("ctx") or {}
    limit = next((f"{k} {ctx[k]}" for k in _LIMIT_KEYS if k in ctx), None)
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return APIError(
        422, f"{where or 'body'}: {msg}{more}", field=where or None, value=first.get("input"), limit=limit
    )
