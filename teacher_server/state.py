"""What every request handler of every API surface reads: :class:`ServerState`, on ``app.state.server``."""

from __future__ import annotations

import time

from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import ModelInfo
from teacher_server.backends.base import Backend
from teacher_server.config import ServerConfig
from teacher_server.errors import APIError
from teacher_server.metrics import Metrics
from teacher_server.prepare import Limits


class ServerState:
    """The backend and what is known about it; ``limits`` and ``info`` are set once the model is loaded."""

    def __init__(self, config: ServerConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.metrics = Metrics()
        self.ready = False
        self.load_error: str | None = None
        self.limits: Limits | None = None
        self.info: ModelInfo | None = None
        self.loaded_at = 0.0  # time.time() when the model finished loading
        self.inflight_tokens = 0  # admitted, not yet answered (see service.Admission)

    def on_loaded(self) -> None:
        b, cfg = self.backend, self.config
        tok = b.tokenizer
        caps = b.capabilities()
        has_template = bool(getattr(tok, "chat_template", None))
        vocab = min(len(tok), b.model_vocab_size)
        self.limits = Limits(
            vocab_size=vocab,
            max_model_len=b.max_model_len,
            max_top_k=cfg.max_top_k,
            max_candidates=cfg.max_candidates,
            max_request_sequences=cfg.max_request_sequences,
            max_request_tokens=cfg.max_request_tokens,
            has_chat_template=has_template,
            candidate_ids=caps.candidate_ids,
            temperature=caps.temperature,
            entropy=caps.entropy,
            backend=b.name,
        )
        eos = tok.eos_token_id
        self.info = ModelInfo(
            model=cfg.name,
            backend=b.name,
            max_model_len=b.max_model_len,
            max_top_k=cfg.max_top_k,
            vocab_size=vocab,
            model_vocab_size=b.model_vocab_size,
            normalized_vocab_size=b.normalized_vocab_size or b.model_vocab_size,
            tokenizer_fingerprint=tokenizer_fingerprint(tok),
            chat_template=has_template,
            eos_token_ids=[] if eos is None else [eos],
            capabilities=caps,
            limits={
                "max_request_sequences": cfg.max_request_sequences,
                "max_request_tokens": cfg.max_request_tokens,
                "max_candidates": cfg.max_candidates,
                "max_body_bytes": cfg.max_body_bytes,
                "max_queue_tokens": cfg.max_queue_tokens,
            },
        )
        self.loaded_at = time.time()
        self.ready = True
        self.metrics.ready.set(1)


def require_ready(state: ServerState) -> None:
    """503 + Retry-After until the model is loaded (or with the load error, if loading failed)."""
    if not state.ready:
        msg = f"model failed to load: {state.load_error}" if state.load_error else "model is still loading"
        raise APIError(503, msg, type="not_ready", headers={"Retry-After": "5"})
