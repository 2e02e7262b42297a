"""The wire contract shared by the teacher server and the student trainer (imports nothing of ours).

``protocol`` — the request models the server validates and the documented response shapes;
``wire`` — the request bodies and result documents both sides build and read; ``codec`` — the bytes
(JSON or msgpack with packed arrays); ``fingerprint`` — the tokenizer identity both sides compare.
"""

from shared.codec import JSON, MSGPACK, CodecError, decode, encode
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import (
    Capabilities,
    GenerateRequest,
    ModelInfo,
    ScoreRequest,
    ScoreSequence,
)
from shared.wire import GeneratedSample, ScoredSequence, WireFormatError, WireInputError

__all__ = [
    "JSON",
    "MSGPACK",
    "Capabilities",
    "CodecError",
    "GenerateRequest",
    "GeneratedSample",
    "ModelInfo",
    "ScoreRequest",
    "ScoreSequence",
    "ScoredSequence",
    "WireFormatError",
    "WireInputError",
    "decode",
    "encode",
    "tokenizer_fingerprint",
]
