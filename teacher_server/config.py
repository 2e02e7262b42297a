"""Typed server configuration, validated with messages that name the bad value and the fix."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from teacher_server.backends import BACKENDS, backends_help

API_KEY_ENV = "TEACHER_API_KEY"


class ConfigError(ValueError):
    """A server setting that cannot work; the message says which and how to fix it."""


@dataclass
class ServerConfig:
    model: str
    backend: str = "hf"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_top_k: int = 64
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_batch_tokens: int = 32768  # padded tokens per forward batch (hf)
    max_request_sequences: int = 1024
    max_request_tokens: int = 1_048_576
    max_candidates: int = 256  # K of candidate_ids
    max_body_bytes: int = 256 * 1024 * 1024
    max_queue_tokens: int = 4_194_304  # admitted-but-unfinished tokens before 503
    batch_window_ms: float = 2.0
    logits_chunk_mib: int = 512  # fp32 logits budget per chunk (hf)
    api_key: str | None = None
    trust_remote_code: bool = False
    load_format: str = "auto"  # auto | dummy (random weights from config.json, as vLLM's --load-format dummy)
    # vLLM engine options
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is unknown; use one of: {backends_help()}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; use auto, float32, bfloat16 or float16")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device {self.device!r} is unknown; use auto, cpu, cuda or cuda:N")
        if not 0 <= self.max_top_k <= 4096:
            raise ConfigError(f"--max-top-k {self.max_top_k} must be within 0..4096")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len {self.max_model_len} must be at least 2")
        if self.backend == "hf" and self.max_model_len and self.max_batch_tokens < self.max_model_len:
            raise ConfigError(
                f"--max-batch-tokens {self.max_batch_tokens} is below --max-model-len {self.max_model_len}: "
                "a full-length sequence could never be scored; raise it or lower --max-model-len"
            )
        for name in (
            "max_batch_tokens",
            "max_request_sequences",
            "max_request_tokens",
            "max_queue_tokens",
            "max_candidates",
            "max_body_bytes",
            "logits_chunk_mib",
            "port",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(
                f"--load-format {self.load_format!r} is unknown; use auto or dummy (random weights)"
            )
        if self.batch_window_ms < 0:
            raise ConfigError(f"--batch-window-ms must be >= 0, got {self.batch_window_ms}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization {self.gpu_memory_utilization} must be in (0, 1]")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model.rstrip("/")

    def public(self) -> dict[str, Any]:
        """Settings for logs: everything but the API key."""
        doc = asdict(self)
        doc["api_key"] = "***" if self.api_key else None
        return doc
