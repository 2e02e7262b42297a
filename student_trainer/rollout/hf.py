"""The ``hf`` rollout engine (``rollout.engine: hf``, the default): transformers ``generate`` on the trained
module itself, with the student's top-k recorded during sampling.

    engine = HFRolloutEngine(model, tokenizer)                    # holds a reference to the trained module
    batch = engine.generate([p.student_ids for p in prompts], n=4, temperature=1.0, top_p=1.0,
                            max_new_tokens=512, top_k_record=16, seed=step_seed)
    for s in batch.samples:        # n consecutive samples per prompt, in prompt order
        s.prompt_index, s.completion_ids, s.topk_ids, s.topk_logprobs, s.sampled_logprobs, s.finished
    ...optimizer.step()...
    engine.sync_weights(model)     # after every update: batch.policy_version tells which weights sampled

What is recorded (shapes per sample, T = completion length; CPU tensors):
  completion_ids (T,) int64: the sampled tokens; when the model emits an end-of-sequence id the completion
      ends with it (``finished=True``), otherwise it is ``max_new_tokens`` long (``finished=False``).
  topk_ids (T, k) int64, topk_logprobs (T, k) float32: the student's k most likely next tokens at position t
      and their log-probs, log_softmax(logits / temperature) over the tokenizer's ids, before top-p: the
      tempered distribution p_t the tokens are sampled from (docs/OPD.md, "Temperature, top-p and padded
      rows"), the support S_t of the student-top-k loss. Greedy (temperature 0) records temperature 1.
  sampled_logprobs (T,) float32: log p_t(completion_ids[t]) from the same tempered distribution.
Alignment is the protocol's: position t is predicted from ``prompt + completion[:t]``.

Only the logits of the current step are kept: a LogitsProcessor placed before generate's temperature
and top-p warpers takes the top-k of each step, so no [B, T, V] tensor is ever held. The model's own
``generation_config`` (a Hub one may carry temperature 0.6, top_k 20, a repetition penalty) is ignored during
rollouts, so tokens are sampled from p_t reshaped only by the temperature and top-p given here.

A LoRA student (``model.lora``, a peft model) generates through its base transformers model, whose injected
LoRA layers add the current adapter in every forward (``opd.lora.base_causal_lm``): the adapted weights,
with transformers' own ``generate`` and ``generation_config``, and nothing to merge or copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from student_trainer.errors import ConfigError, DataError
from student_trainer.opd.lora import base_causal_lm
from student_trainer.rollout.base import RolloutBatch, RolloutEngine, RolloutSample, check_request

# ------------------------------------------------------------------------------------- recording hooks


class _TopKRecorder(LogitsProcessor):
    """Records, per generation step, the top-k of log_softmax(logits / temperature) (the distribution the
    token is sampled from, before top-p) and keeps that step's log-probs until :class:`_SampledLogprob`
    reads the sampled token's. Optionally masks ids >= ``vocab_limit``. ``temperature`` must be > 0 (greedy
    decoding passes 1: the raw distribution). The scores it returns are the raw ones (masked), so generate's
    own temperature warper still divides them once."""

    def __init__(self, k: int, vocab_limit: int | None, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"the recorder's temperature must be > 0, got {temperature}")
        self.k, self.vocab_limit, self.temperature = k, vocab_limit, temperature
        self.topk_ids: list[torch.Tensor] = []  # per step (B, k)
        self.topk_logprobs: list[torch.Tensor] = []  # per step (B, k)
        self.sampled: list[torch.Tensor] = []  # per step (B,)
        self.last_logprobs_B_V: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.vocab_limit is not None and self.vocab_limit < scores.shape[-1]:
            # padded output rows are not tokens: neither sampled nor part of p_t's support
            scores = scores.clone()
            scores[:, self.vocab_limit :] = float("-inf")
        tempered_B_V = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        logprobs_B_V = torch.log_softmax(tempered_B_V, dim=-1)
        if self.k:
            values, ids = logprobs_B_V.topk(self.k, dim=-1)
            self.topk_ids.append(ids)
            self.topk_logprobs.append(values)
        self.last_logprobs_B_V = logprobs_B_V
        return scores


class _SampledLogprob(StoppingCriteria):
    """Runs after each sampled token is appended: gathers its recorded log-prob. Never stops anything."""

    def __init__(self, recorder: _TopKRecorder) -> None:
        self.recorder = recorder

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        lp = self.recorder.last_logprobs_B_V
        self.recorder.sampled.append(lp.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.recorder.last_logprobs_B_V = None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# ----------------------------------------------------------------------------------------- HF engine


class HFRolloutEngine(RolloutEngine):
    """Rollouts with transformers ``generate`` on the trained module itself (always the current weights).

    batch_size: rows (prompt x sample) per ``generate`` call; None = all at once.
    cache_implementation: None (dynamic KV cache, right for CPU) or "static" (on CUDA transformers compiles
        the decode step: 3-6x faster for a 1.7B student on an H200; the first call per prompt width compiles,
        20-45 s; see docs/bench_results/rollout_engine.md).
    prompt_pad_multiple: left-pad prompts to a multiple of this length (fewer distinct shapes to compile with
        the static cache; padding does not change the results).
    vocab_limit: mask output ids >= this (use len(tokenizer) when the output layer is padded, so that no id
        outside the tokenizer is sampled or recorded); the loss must then use the same support.
    eos_token_ids: ids that end a completion; default: the model's generation_config and the tokenizer's EOS.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int | None = None,
        cache_implementation: str | None = None,
        prompt_pad_multiple: int = 1,
        vocab_limit: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"rollout batch_size={batch_size} must be >= 1 (or None for all rows at once)")
        if cache_implementation not in (None, "dynamic", "static"):
            raise ConfigError(
                f"cache_implementation={cache_implementation!r}: use None, 'dynamic' or 'static'"
            )
        if prompt_pad_multiple < 1:
            raise ConfigError(f"prompt_pad_multiple={prompt_pad_multiple} must be >= 1")
        model = base_causal_lm(model)  # a LoRA student: its transformers model, adapter layers in it
        rows = model.get_output_embeddings().weight.shape[0]
        if vocab_limit is not None and not 1 <= vocab_limit <= rows:
            raise ConfigError(f"vocab_limit={vocab_limit} must be in [1, {rows}] (the output layer's rows)")
        self.vocab_size = vocab_limit or rows
        self.model = model
        self.batch_size = batch_size
        self.cache_implementation = cache_implementation
        self.prompt_pad_multiple = prompt_pad_multiple
        self.vocab_limit = vocab_limit
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else _eos_ids(model, tokenizer)
        if not self.eos_token_ids:
            raise ConfigError(
                "no end-of-sequence id: the tokenizer and the model's generation_config have none"
            )
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]
        self.policy_version = 0

    def sync_weights(self, model: torch.nn.Module) -> None:
        # generate runs on the very module the optimizer updates (a LoRA student's injected adapter layers
        # included), so there is nothing to copy
        self.model = base_causal_lm(model)
        self.policy_version += 1

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
    ) -> RolloutBatch:
        check_request(prompts, self.vocab_size, n, temperature, top_p, max_new_tokens, top_k_record)
        rows = [(i, j, list(map(int, p))) for i, p in enumerate(prompts) for j in range(n)]
        step = self.batch_size or len(rows)
        samples: list[RolloutSample] = []
        with _rollout_mode(self.model, seed):
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                samples += self._generate_rows(chunk, temperature, top_p, max_new_tokens, top_k_record)
        return RolloutBatch(samples, self.policy_version, n, top_k_record)

    def _generation_config(self, temperature: float, top_p: float, max_new: int) -> GenerationConfig:
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p)
            if temperature > 0
            else dict(do_sample=False, temperature=1.0, top_p=1.0)
        )
        return GenerationConfig(
            **sampling,
            max_new_tokens=max_new,
            top_k=0,  # transformers' global default is 50: p_t must not be cut
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            cache_implementation=self.cache_implementation,
            return_dict_in_generate=False,
        )

    def _generate_rows(
        self, rows: list[tuple[int, int, list[int]]], temperature: float, top_p: float, max_new: int, k: int
    ) -> list[RolloutSample]:
        device = self.model.device
        input_ids, attention_mask = left_pad(
            [r[2] for r in rows], self.pad_token_id, self.prompt_pad_multiple
        )
        width = input_ids.shape[1]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None:
            if width >= limit:
                raise DataError(
                    f"a prompt of {width} tokens leaves no room to generate: the student's "
                    f"max_position_embeddings is {limit}; filter or shorten long prompts"
                )
            max_new = min(
                max_new, limit - width
            )  # such samples come back unfinished, as if cut at max length
        # the recorded p_t is the sampling distribution: tempered; greedy records temperature 1
        recorder = _TopKRecorder(k, self.vocab_limit, temperature if temperature > 0 else 1.0)
        sequences = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=self._generation_config(temperature, top_p, max_new),
            logits_processor=LogitsProcessorList([recorder]),
            stopping_criteria=StoppingCriteriaList([_SampledLogprob(recorder)]),
        )
        completions_B_S = sequences[:, width:].cpu()
        steps = completions_B_S.shape[1]
        # generate may run a step or two past the end on GPU and drop it; keep the first `steps` records
        sampled_B_S = torch.stack(recorder.sampled[:steps], dim=1).float().cpu()
        if k:
            topk_ids_B_S_K = torch.stack(recorder.topk_ids[:steps], dim=1).cpu()
            topk_lp_B_S_K = torch.stack(recorder.topk_logprobs[:steps], dim=1).float().cpu()
        else:
            topk_ids_B_S_K = torch.zeros(len(rows), steps, 0, dtype=torch.long)
            topk_lp_B_S_K = torch.zeros(len(rows), steps, 0)
        eos = torch.tensor(self.eos_token_ids)
        is_eos_B_S = torch.isin(completions_B_S, eos)
        out = []
        for b, (prompt_index, sample_index, prompt) in enumerate(rows):
            hits = is_eos_B_S[b].nonzero()
            finished = bool(hits.numel())
            t = int(hits[0]) + 1 if finished else steps  # the end-of-sequence token belongs to the completion
            out.append(
                RolloutSample(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    prompt_ids=torch.tensor(prompt, dtype=torch.long),
                    completion_ids=completions_B_S[b, :t].clone(),
                    topk_ids=topk_ids_B_S_K[b, :t].clone(),
                    topk_logprobs=topk_lp_B_S_K[b, :t].clone(),
                    sampled_logprobs=sampled_B_S[b, :t].clone(),
                    finished=finished,
                )
            )
        return out


def build(cfg: Any, model: Any, tokenizer: Any, accelerator: Any = None) -> HFRolloutEngine:
    """The engine for a trainer config (the registry entry of ``rollout.engine: hf``).

    Sampling is restricted to tokenizer ids when the output layer is padded beyond the tokenizer (Qwen:
    151,936 rows, 151,669 tokens). ``rollout.shadow_dtype`` set: a :class:`ShadowRolloutEngine` generating
    from a copy of the weights in that dtype, autocast off (``rollout.shadow``). The static KV cache takes
    one dtype, so without a shadow it is refused with fp32 master weights under bf16 autocast (transformers
    fails inside the cache otherwise); with a shadow the combination works.
    """
    mixed = getattr(accelerator, "mixed_precision", "no")
    shadow_dtype = cfg.rollout.shadow_dtype
    if cfg.rollout.static_cache and mixed != "no" and not shadow_dtype:
        raise ConfigError(
            "rollout.static_cache=true with fp32 master weights and bf16 autocast: the static KV cache takes "
            "the weights' dtype and refuses bf16 keys; set rollout.shadow_dtype=bfloat16 (generate from a "
            "bf16 copy of the weights), model.dtype=bfloat16 or rollout.static_cache=false"
        )
    rows = model.get_output_embeddings().weight.shape[0]
    kwargs = dict(
        cache_implementation="static" if cfg.rollout.static_cache else None,
        prompt_pad_multiple=64 if cfg.rollout.static_cache else 1,  # fewer shapes to compile
        vocab_limit=len(tokenizer) if rows > len(tokenizer) else None,
    )
    if shadow_dtype:
        from student_trainer.rollout.shadow import ShadowRolloutEngine

        return ShadowRolloutEngine(model, tokenizer, shadow_dtype, **kwargs)
    return HFRolloutEngine(model, tokenizer, **kwargs)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) input ids and attention mask, prompts right-aligned; W = longest rounded up to ``multiple``."""
    longest = max(len(p) for p in prompts)
    width = -(-longest // multiple) * multiple
    ids_B_W = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask_B_W = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        if p:
            ids_B_W[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask_B_W[b, width - len(p) :] = 1
    return ids_B_W, mask_B_W


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


@contextlib.contextmanager
def _rollout_mode(model: Any, seed: int | None) -> Iterator[None]:
    """Eval mode (no dropout; gradient checkpointing would also turn the KV cache off in train mode), the
    model's own generation_config out of the way, and with a seed a forked RNG so the caller's RNG stream is
    untouched. Everything is restored afterwards."""
    was_training = model.training
    saved_config = model.generation_config
    # generate fills unset fields from model.generation_config (a Hub sampling preset or penalties);
    # a bare config with only the special ids leaves transformers' neutral defaults
    model.generation_config = GenerationConfig(
        bos_token_id=saved_config.bos_token_id,
        eos_token_id=saved_config.eos_token_id,
        pad_token_id=saved_config.pad_token_id,
    )
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        model.generation_config = saved_config
        model.train(was_training)
