"""Teacher backends: ``hf`` (transformers, embedded default) and ``vllm`` (production GPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from teacher_server.backends.base import Backend
    from teacher_server.config import ServerConfig

BACKENDS = ("hf", "vllm")


def create_backend(config: ServerConfig) -> Backend:
    """Instantiate (not load) the configured backend; heavy imports happen here, never at import time."""
    if config.backend == "hf":
        from teacher_server.backends.hf import HFBackend

        return HFBackend(config)
    if config.backend == "vllm":
        from teacher_server.backends.vllm import VLLMBackend

        return VLLMBackend(config)
    raise ValueError(f"unknown backend {config.backend!r}; choose one of {BACKENDS}")
