"""The wire codec: exact round trips, the documented byte layout, errors, and bytes per position."""

from __future__ import annotations

import json
import struct

import msgpack
import numpy as np
import pytest

from shared import codec
from shared.wire import ScoredSequence


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.int32).reshape(3, 4),
        np.linspace(-5, 0, 7, dtype=np.float32),
        np.array([2**40, -3], dtype=np.int64),
        np.zeros((0, 16), dtype=np.float32),
        np.array(3.5, dtype=np.float32),
        np.array([[1, 0]], dtype=np.uint8),
    ],
)
def test_msgpack_roundtrip_exact(arr):
    out = codec.decode(codec.encode({"a": arr, "nested": [arr]}))
    for got in (out["a"], out["nested"][0]):
        assert got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


def test_wire_dtypes_ids_int32_logprobs_float32():
    out = codec.decode(codec.encode({"ids": np.arange(3, dtype=np.int64), "lp": np.ones(2, np.float64)}))
    assert out["ids"].dtype == np.int32 and out["lp"].dtype == np.float32


def test_byte_layout_is_the_documented_one():
    """Parse the payload by hand from the module docstring's layout, independently of unpack_array."""
    arr = np.array([[1.5, -2.0, 3.25]], dtype=np.float32)
    packed = msgpack.unpackb(codec.encode(arr), ext_hook=lambda code, data: (code, data))
    code, data = packed
    assert code == codec.NDARRAY_EXT
    assert data[0] == 1 and data[1] == 2  # float32, ndim 2
    assert struct.unpack_from("<2I", data, 2) == (1, 3)
    assert struct.unpack_from("<3f", data, 10) == (1.5, -2.0, 3.25)
    assert len(data) == 2 + 8 + 12


def test_json_nonfinite_become_null_and_back():
    body = codec.encode({"lp": np.array([-np.inf, -1.0], np.float32)}, codec.JSON)
    assert json.loads(body) == {"lp": [None, -1.0]}
    assert codec.as_array(json.loads(body)["lp"], "float32")[0] == -np.inf


@pytest.mark.parametrize(
    "payload, message",
    [
        (bytes([9, 1]) + struct.pack("<I", 1) + b"\0" * 4, "unknown dtype code 9"),
        (bytes([0, 1]) + struct.pack("<I", 3) + b"\0" * 8, "needs 12 bytes, got 8"),
        (bytes([0, 40]), "above the limit"),
        (b"\0", "shorter than"),
    ],
)
def test_bad_packed_arrays_raise_codec_error(payload, message):
    body = msgpack.packb({"x": msgpack.ExtType(codec.NDARRAY_EXT, payload)})
    with pytest.raises(codec.CodecError, match=message):
        codec.decode(body)


def test_malformed_bodies():
    with pytest.raises(codec.CodecError, match="malformed msgpack"):
        codec.decode(b"\xc1\xc1\xc1")
    with pytest.raises(codec.CodecError, match="malformed JSON"):
        codec.decode(b"{not json", codec.JSON)
    with pytest.raises(codec.CodecError, match="unknown msgpack extension"):
        codec.decode(msgpack.packb(msgpack.ExtType(7, b"")))
    with pytest.raises(codec.CodecError, match="over the limit"):
        codec.decode(b"x" * 11, codec.JSON, max_size=10)


def test_media_types():
    assert codec.media_type("application/msgpack") == codec.MSGPACK
    assert codec.media_type("application/x-msgpack; q=1") == codec.MSGPACK
    assert codec.media_type("application/json; charset=utf-8") == codec.JSON
    assert codec.media_type("text/plain") is None


def _response_doc(t: int, k: int, seqs: int) -> dict:
    rng = np.random.default_rng(0)
    results = [
        {
            "completion_ids": rng.integers(0, 150_000, t),
            "logprobs": -rng.random(t, dtype=np.float32),
            "topk_ids": rng.integers(0, 150_000, (t, k)),
            "topk_logprobs": -rng.random((t, k), dtype=np.float32),
            "prompt_tokens": 100,
        }
        for _ in range(seqs)
    ]
    return {
        "model": "m",
        "results": results,
        "usage": {"prompt_tokens": 100 * seqs, "scored_tokens": t * seqs},
    }


def test_bytes_per_position_target_at_k16():
    doc = _response_doc(t=512, k=16, seqs=8)
    per_pos = len(codec.encode(doc)) / (512 * 8)
    assert per_pos <= 140, per_pos
    assert len(codec.encode(doc, codec.JSON)) / (512 * 8) > 3 * per_pos  # JSON lists cost several times more


def test_scored_sequence_from_wire_both_formats():
    doc = _response_doc(t=5, k=3, seqs=1)["results"][0]
    for fmt in (codec.MSGPACK, codec.JSON):
        s = ScoredSequence.from_wire(codec.decode(codec.encode(doc, fmt), fmt))
        assert s.topk_ids.shape == (5, 3) and s.topk_ids.dtype == np.int32
        np.testing.assert_array_equal(s.completion_ids, doc["completion_ids"])
        np.testing.assert_allclose(s.topk_logprobs, doc["topk_logprobs"], rtol=0, atol=0)
