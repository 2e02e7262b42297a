"""The wire contract shared by the teacher server and the student trainer (imports nothing of ours)."""

from shared.codec import JSON, MSGPACK, CodecError, decode, encode
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import (
    Capabilities,
    GenerateRequest,
    ModelInfo,
    ScoredSequence,
    ScoreRequest,
    ScoreSequence,
)

__all__ = [
    "JSON",
    "MSGPACK",
    "Capabilities",
    "CodecError",
    "GenerateRequest",
    "ModelInfo",
    "ScoreRequest",
    "ScoreSequence",
    "ScoredSequence",
    "decode",
    "encode",
    "tokenizer_fingerprint",
]
