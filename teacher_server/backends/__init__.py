"""Teacher backends, one table: ``hf`` (transformers, embedded default) and ``vllm`` (production GPU).

:data:`BACKENDS` is read by :func:`create_backend`, by ``ServerConfig``'s check of ``--backend`` and by the
CLI's ``--backend`` choices and help, so a new backend is one module plus one row here. Each row names its
class as ``"module:Class"`` and is imported only when chosen (vLLM and torch are heavy).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from teacher_server.backends.base import Backend
    from teacher_server.config import ServerConfig


@dataclass(frozen=True)
class BackendSpec:
    target: str  # "package.module:ClassName", a subclass of Backend taking a ServerConfig
    help: str  # one phrase for --help


BACKENDS: dict[str, BackendSpec] = {
    "hf": BackendSpec("teacher_server.backends.hf:HFBackend", "transformers (default, CPU or GPU)"),
    "vllm": BackendSpec("teacher_server.backends.vllm:VLLMBackend", "vLLM engine (production GPU)"),
}


def backends_help() -> str:
    """``hf = transformers (...); vllm = vLLM engine (...)``, for the CLI and config errors."""
    return "; ".join(f"{name} = {spec.help}" for name, spec in BACKENDS.items())


def create_backend(config: ServerConfig) -> Backend:
    """Instantiate (not load) the configured backend; heavy imports happen here, never at import time."""
    spec = BACKENDS.get(config.backend)
    if spec is None:
        raise ValueError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    module, _, name = spec.target.partition(":")
    return getattr(importlib.import_module(module), name)(config)
