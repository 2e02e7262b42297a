"""Wire encoding for the teacher service: the only module that knows the byte layout.

Two encodings of the same JSON-shaped documents:

* **JSON** (``application/json``) for people and curl. NumPy arrays become nested lists; non-finite floats
  (a log-prob of ``-inf``) become ``null`` because JSON has no infinity.
* **msgpack** (``application/msgpack``) for the trainer. Every NumPy array travels as one msgpack extension
  object (type code :data:`NDARRAY_EXT`) holding raw little-endian bytes plus its shape, never as a list of
  numbers. Payload layout::

      byte 0        dtype code (see _DTYPES: 0 int32, 1 float32, 2 int64, 3 float16, 4 uint8, 5 float64)
      byte 1        ndim (0..8)
      4 * ndim      shape, uint32 little-endian each
      rest          the array's data, C order, little-endian

  Ids go out as int32 and log-probs as float32, so a scored position at k = 16 costs
  4 (id) + 4 (log-prob) + 16 * (4 + 4) (top-k) = 136 bytes plus a few bytes per sequence.

Both sides call :func:`encode` / :func:`decode`; nothing else may build or parse these bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgpack
import numpy as np

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_ALIASES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

NDARRAY_EXT = 0x4E  # 'N'
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<i4"),
    1: np.dtype("<f4"),
    2: np.dtype("<i8"),
    3: np.dtype("<f2"),
    4: np.dtype("|u1"),
    5: np.dtype("<f8"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_MAX_NDIM = 8


class CodecError(ValueError):
    """A body that cannot be decoded (malformed JSON/msgpack, a bad packed array)."""


def media_type(header: str | None) -> str | None:
    """Map a Content-Type / Accept header to :data:`JSON`, :data:`MSGPACK`, or None (unknown / absent)."""
    if not header:
        return None
    for part in header.split(","):
        mime = part.split(";")[0].strip().lower()
        if mime in _MSGPACK_ALIASES:
            return MSGPACK
        if mime in ("application/json", "*/*", "application/*") or mime.endswith("+json"):
            return JSON
    return None


def _wire_array(arr: np.ndarray) -> np.ndarray:
    """Cast to the wire dtype: ids to int32, log-probs to float32 (the contract), others kept if known."""
    if arr.dtype.kind in "iu" and arr.dtype != np.uint8:
        if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
            return arr.astype("<i8", order="C", copy=False)
        return arr.astype("<i4", order="C", copy=False)
    if arr.dtype.kind == "f" and arr.dtype != np.float16:
        return arr.astype("<f4", order="C", copy=False)
    if arr.dtype.kind == "b":
        return arr.astype("|u1", order="C", copy=False)
    arr = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
    if arr.dtype not in _CODES:
        raise CodecError(f"cannot pack arrays of dtype {arr.dtype}")
    return arr


def pack_array(arr: np.ndarray) -> msgpack.ExtType:
    """One NumPy array -> one msgpack extension object (see the module docstring for the layout)."""
    arr = _wire_array(arr)
    if arr.ndim > _MAX_NDIM:
        raise CodecError(f"arrays of at most {_MAX_NDIM} dimensions can be packed, got {arr.ndim}")
    header = struct.pack(f"<BB{arr.ndim}I", _CODES[arr.dtype], arr.ndim, *arr.shape)
    return msgpack.ExtType(NDARRAY_EXT, header + arr.tobytes())


def unpack_array(payload: bytes) -> np.ndarray:
    """Inverse of :func:`pack_array`; validates the header against the payload length."""
    if len(payload) < 2:
        raise CodecError("packed array: payload shorter than its 2-byte header")
    code, ndim = payload[0], payload[1]
    if code not in _DTYPES:
        raise CodecError(f"packed array: unknown dtype code {code} (known: {sorted(_DTYPES)})")
    if ndim > _MAX_NDIM:
        raise CodecError(f"packed array: ndim {ndim} is above the limit {_MAX_NDIM}")
    offset = 2 + 4 * ndim
    if len(payload) < offset:
        raise CodecError(f"packed array: header announces {ndim} dims but the payload ends early")
    shape = struct.unpack_from(f"<{ndim}I", payload, 2)
    dtype = _DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(payload) - offset != expected:
        raise CodecError(
            f"packed array: shape {list(shape)} of {dtype.name} needs {expected} bytes, "
            f"got {len(payload) - offset}"
        )
    return np.frombuffer(payload, dtype=dtype, offset=offset).reshape(shape)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist") and hasattr(obj, "numpy"):  # a torch tensor slipped through
        return pack_array(obj.detach().cpu().numpy())
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != NDARRAY_EXT:
        raise CodecError(f"unknown msgpack extension type {code} (only {NDARRAY_EXT} = packed array)")
    return unpack_array(data)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f" and not np.isfinite(obj).all():
            return np.where(np.isfinite(obj), obj, None).tolist()
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def encode(doc: Any, fmt: str = MSGPACK) -> bytes:
    """Encode a JSON-shaped document whose leaves may be NumPy arrays."""
    if fmt == MSGPACK:
        return msgpack.packb(doc, default=_default, use_bin_type=True)
    if fmt == JSON:
        return json.dumps(_jsonable(doc), separators=(",", ":"), allow_nan=False).encode()
    raise CodecError(f"unknown format {fmt!r}; use {JSON!r} or {MSGPACK!r}")


def decode(body: bytes, fmt: str = MSGPACK, max_size: int | None = None) -> Any:
    """Decode a body. msgpack packed arrays come back as read-only NumPy arrays; JSON as plain lists.

    Raises :class:`CodecError` with a readable message for anything malformed.
    """
    if max_size is not None and len(body) > max_size:
        raise CodecError(f"body of {len(body)} bytes is over the limit of {max_size} bytes")
    if fmt == MSGPACK:
        try:
            return msgpack.unpackb(body, ext_hook=_ext_hook, raw=False, strict_map_key=True)
        except CodecError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types
            raise CodecError(f"malformed msgpack body: {type(exc).__name__}: {exc}") from None
    if fmt == JSON:
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CodecError(f"malformed JSON body: {exc}") from None
    raise CodecError(f"unknown format {fmt!r}; use {JSON!r} or {MSGPACK!r}")


def as_array(value: Any, dtype: str) -> np.ndarray:
    """A wire value (packed array or nested list, with None for non-finite floats) -> NumPy array."""
    if isinstance(value, np.ndarray):
        return value.astype(dtype, copy=False)
    if dtype.startswith("f") or dtype.startswith("<f"):
        return _float_list(value, dtype)
    return np.asarray(value, dtype=dtype)


def _float_list(value: Any, dtype: str) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)  # JSON nulls (non-finite log-probs) arrive as NaN here
    if np.isnan(arr).any():
        obj = np.asarray(value, dtype=object)
        arr = np.where(np.equal(obj, None), -np.inf, obj).astype(dtype)
    return arr
