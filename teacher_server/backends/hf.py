"""transformers backend: the embedded default, on CPU or GPU.

One forward of the base model per batch (right padding, attention mask), then the output layer applied only
to the positions that predict completion tokens, in row chunks (see
:mod:`teacher_server.backends.hf_scoring`). Log-probs, top-k and entropy are normalised over the tokenizer's
ids: output rows past ``len(tokenizer)`` (padding, Qwen: 151,936 rows for 151,669 ids) are left out.
At load time a probe checks that "base model + output layer" reproduces the model's own logits; models with
extra logit processing that the probe cannot reproduce fall back to the full forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import torch

from shared.protocol import Capabilities, GenerateOptions
from shared.wire import GeneratedSample, ScoredSequence
from teacher_server.backends.base import Backend
from teacher_server.backends.batcher import MicroBatcher
from teacher_server.backends.hf_scoring import HeadOutputs, chunk_rows_for, chunked_head_scores
from teacher_server.config import ServerConfig
from teacher_server.jobs import ScoreJob

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on GPU, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


class HFBackend(Backend):
    name = "hf"

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: Any = None
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._batcher: MicroBatcher | None = None
        self._softcap: float | None = None
        self._split_head = True
        self.on_batch = None  # set by the app: (sequences, tokens, seconds) -> None
        self._gen_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------------ loading
    async def load(self) -> None:
        await asyncio.to_thread(self._load_sync)
        self._batcher = MicroBatcher(
            self._score_batch_guarded,
            self.config.max_batch_tokens,
            window_s=self.config.batch_window_ms / 1000,
            on_batch=lambda *a: self.on_batch and self.on_batch(*a),
        )
        self._batcher.start()

    def _load_sync(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        remote = cfg.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=remote)
        if cfg.load_format == "dummy":  # random weights, initialised directly on the device
            model_config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=remote)
            with torch.device(self.device):
                self.model = AutoModelForCausalLM.from_config(
                    model_config, dtype=self.dtype, trust_remote_code=remote
                )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                cfg.model, dtype=self.dtype, trust_remote_code=remote
            )
            self.model.to(self.device)
        self.model.eval()
        mc = self.model.config
        self.model_vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.normalized_vocab_size = min(len(self.tokenizer), self.model_vocab_size)
        limit = int(getattr(mc, "max_position_embeddings", 0) or 0) or 32768
        self.max_model_len = min(cfg.max_model_len or limit, limit)
        if self.max_model_len > cfg.max_batch_tokens:
            log.warning(
                "max_model_len %d is above --max-batch-tokens %d; capping max_model_len to it",
                self.max_model_len,
                cfg.max_batch_tokens,
            )
            self.max_model_len = cfg.max_batch_tokens
        self._softcap = getattr(mc, "final_logit_softcapping", None)
        self._split_head = self._probe_split_head()

    @torch.inference_mode()
    def _probe_split_head(self) -> bool:
        """True when base model + lm_head (+ softcap) equals the model's logits on a probe input."""
        ids = torch.arange(1, 9, device=self.device)[None] % self.model_vocab_size
        full = self.model(input_ids=ids).logits.float()
        hidden = self.model.base_model(input_ids=ids).last_hidden_state
        mine = self.model.get_output_embeddings()(hidden).float()
        if self._softcap:
            mine = torch.tanh(mine / self._softcap) * self._softcap
        ok = torch.allclose(full, mine, atol=1e-3 if self.dtype != torch.float32 else 1e-5, rtol=1e-3)
        if not ok:
            log.warning("model applies extra logit processing; using the full forward (more memory)")
        return ok

    def capabilities(self) -> Capabilities:
        return Capabilities(candidate_ids=True, entropy=True, temperature=True, generate=True)

    def stats(self) -> dict[str, float]:
        b = self._batcher
        out = {"queue_jobs": b.queued_jobs, "queue_tokens": b.queued_tokens} if b else {}
        if self.device.type == "cuda":
            out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["gpu_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return out

    async def close(self) -> None:
        if self._batcher:
            await self._batcher.close()

    # ------------------------------------------------------------------------------------------ scoring
    async def score(self, jobs: list[ScoreJob]) -> list[ScoredSequence]:
        assert self._batcher is not None, "backend not loaded"
        return await self._batcher.submit(jobs, [j.num_tokens for j in jobs])

    def _score_batch_guarded(self, jobs: list[ScoreJob]) -> list[ScoredSequence]:
        """Run a batch; on GPU out-of-memory, split it in halves instead of failing the requests."""
        try:
            return self.score_batch(jobs)
        except torch.OutOfMemoryError:
            if len(jobs) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(jobs) // 2
            log.warning("out of memory on a batch of %d sequences; splitting", len(jobs))
            return self._score_batch_guarded(jobs[:half]) + self._score_batch_guarded(jobs[half:])

    @torch.inference_mode()
    def score_batch(self, jobs: list[ScoreJob]) -> list[ScoredSequence]:
        """Score a batch synchronously (also the in-process API used by benchmarks and tests)."""
        seqs = [np.concatenate([j.prompt_ids, j.completion_ids]) for j in jobs]
        longest = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(jobs), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), longest), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.from_numpy(s)
            mask[row, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self._split_head:
            states = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            head = self.model.get_output_embeddings()
        else:
            states = self.model(input_ids=ids, attention_mask=mask).logits
            head = torch.nn.Identity()
        chunk = chunk_rows_for(self.model_vocab_size, self.config.logits_chunk_mib * 2**20)
        results = []
        for row, job in enumerate(jobs):
            p, t = len(job.prompt_ids), len(job.completion_ids)
            # position p-1+i predicts completion token i (prompt + completion[:i] -> completion[i])
            rows = states[row, p - 1 : p - 1 + t]
            cand = None if job.candidate_ids is None else torch.from_numpy(job.candidate_ids).to(self.device)
            out = chunked_head_scores(
                rows,
                head,
                torch.from_numpy(job.completion_ids).to(self.device),
                job.top_k,
                cand,
                job.temperature,
                job.want_entropy,
                chunk_rows=chunk,
                softcap=self._softcap if self._split_head else None,
                vocab_limit=self.normalized_vocab_size,
                want_ranks=job.options.return_ranks,
            )
            results.append(_to_result(job, out))
        return results

    # --------------------------------------------------------------------------------------- generation
    async def generate(
        self, prompts: list[list[int]], params: GenerateOptions
    ) -> list[list[GeneratedSample]]:
        async with self._gen_lock:  # one generate at a time; scoring keeps its own thread
            return await asyncio.to_thread(self._generate_sync, prompts, params)

    @torch.inference_mode()
    def _generate_sync(
        self, prompts: list[list[int]], params: GenerateOptions
    ) -> list[list[GeneratedSample]]:
        from teacher_server.backends.hf_generate import generate_samples

        t0 = time.perf_counter()
        out = generate_samples(self.model, self.tokenizer, prompts, params, self.device, self.max_model_len)
        log.debug("generated for %d prompts in %.2fs", len(prompts), time.perf_counter() - t0)
        return out


def _np(t: torch.Tensor | None, dtype: str) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu").numpy().astype(dtype, copy=False)


def _to_result(job: ScoreJob, out: HeadOutputs) -> ScoredSequence:
    return ScoredSequence(
        completion_ids=job.completion_ids,
        prompt_tokens=int(job.prompt_ids.shape[0]),
        logprobs=_np(out.logprobs, "float32"),
        topk_ids=_np(out.topk_ids, "int32"),
        topk_logprobs=_np(out.topk_logprobs, "float32"),
        candidate_logprobs=_np(out.candidate_logprobs, "float32"),
        entropy=_np(out.entropy, "float32"),
        ranks=_np(out.ranks, "int32"),
    )
