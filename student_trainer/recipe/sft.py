"""Supervised fine-tuning of the student on (filtered) teacher rollouts: the off-policy cold start.

Full-parameter SFT with accelerate, cross-entropy on completion tokens only (token mean over the global
batch), right padding, AdamW + schedule + clipping, checkpoint / ``resume``, the same JSONL metrics, step
line and plot as ``train``. The output directory is a ``save_pretrained`` model + tokenizer: pass it as the
student of ``train`` (``push_to_hub`` uploads it when training ends).

Data: a ``.jsonl``/``.json``/``.parquet`` file or a ``datasets`` source (directory or Hub name, ``split``),
in one of the formats of ``SFT_FORMATS``, detected from the first record (every record must then fit it):

- ``rollouts`` (``student-trainer generate``'s output): the prompt as ``prompt_ids``, or ``messages`` /
  ``question`` rendered with the student's template (``student_template``: "chat" or a ``{question}``
  string); the completion as ``completion_ids`` (EOS included when the teacher stopped) or ``completion``
  text (tokenized, EOS appended when ``finish_reason`` is "stop" or absent).
- TRL's ``prompt_completion``: ``{"prompt": str, "completion": str}``; the prompt is tokenized as is, EOS
  is appended to the completion.
- TRL's ``conversational``: ``{"messages": [...]}`` ending with an assistant turn: that LAST assistant turn is
  the target; everything before it, rendered with the chat template and the generation prompt, is the prompt.
- TRL's ``conversational_prompt_completion``: ``{"prompt": [messages], "completion": [assistant message]}``.

In the chat formats the target is the text the chat template adds after the prompt (the assistant turn and
its end-of-turn tokens), so the loss never reaches a prompt token; ``chat_template_kwargs`` go to every
rendering. Prompt ids are what the student is given at generation time (``add_special_tokens=False``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from student_trainer.errors import ConfigError, DataError
from student_trainer.opd import checkpoint
from student_trainer.opd.chunked import gather_logprobs
from student_trainer.opd.optim import build_optimizer, build_scheduler
from student_trainer.opd.policy import HiddenStatesLM, load_causal_lm, pack, resolve_dtype
from student_trainer.tracking import JsonlLog, plot_metrics, summary_line


class SFTDataError(DataError):
    """A record that cannot become a training example; the message names the line and the field."""


@dataclass
class SFTConfig:
    model: str
    data: str  # .jsonl / .json / .parquet file, a datasets directory or a Hub name
    output_dir: str = "runs/sft"
    split: str = "train"  # the split of a datasets source
    subset: str | None = None  # the config (subset) of a datasets source that has several
    steps: int | None = None  # default: epochs over the data
    epochs: float = 1.0
    batch_size: int = 64  # sequences per optimizer step, global
    micro_batch: int = 8  # sequences per forward, per process
    lr: float = 1e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_length: int = 8192
    student_template: str = "chat"
    system_prompt: str | None = None
    question_field: str = "question"
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. {"enable_thinking": False}
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 1
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    resume: bool = False
    log_every: int = 1
    plot: bool = True
    push_to_hub: bool = False  # upload output_dir to the Hugging Face Hub at the end
    hub_model_id: str | None = None
    hub_private: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch < 1:
            raise ConfigError(f"batch_size={self.batch_size} and micro_batch={self.micro_batch} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be >= 1 (or leave it unset to use epochs)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub needs hub_model_id (--hub-model-id your-name/qwen3-1.7b-sft)")


Example = tuple[list[int], list[int]]  # (prompt_ids, completion_ids)


@dataclass(frozen=True)
class SFTFormat:
    """One dataset format ``sft`` reads: how to recognise a record and turn it into an :data:`Example`."""

    name: str
    shape: str  # what a record looks like (for the error that lists the formats)
    matches: Callable[[dict[str, Any], SFTConfig], bool]
    example: Callable[[dict[str, Any], _Context], Example]


@dataclass
class _Context:
    cfg: SFTConfig
    tokenizer: Any
    where: str = ""
    renderer: Any = None  # the student's PromptRenderer, built on first use


def load_examples(cfg: SFTConfig, tokenizer: Any) -> list[Example]:
    """(prompt_ids, completion_ids) per record, in source order; the format is detected from the first record
    (:data:`SFT_FORMATS`). Records longer than ``max_length`` are truncated at the end."""
    from student_trainer.data.records import read_records

    records = read_records(cfg.data, split=cfg.split, subset=cfg.subset)
    if not records:
        raise SFTDataError(f"{cfg.data}: no records")
    fmt = detect_format(records[0], cfg)
    ctx = _Context(cfg, tokenizer)
    out = []
    for i, rec in enumerate(records):
        ctx.where = f"{cfg.data}: record {i}"
        if not fmt.matches(rec, cfg):
            raise SFTDataError(
                f"{ctx.where} does not fit the format {fmt.name!r} detected from record 0 ({fmt.shape}); "
                f"its fields: {sorted(rec)}"
            )
        prompt, completion = fmt.example(rec, ctx)
        if not completion:
            continue
        completion = completion[: max(1, cfg.max_length - len(prompt))]
        out.append((prompt[: cfg.max_length - len(completion)], completion))
    if not out:
        raise SFTDataError(f"{cfg.data}: no usable records (every completion is empty)")
    return out


def detect_format(record: dict[str, Any], cfg: SFTConfig) -> SFTFormat:
    """The first format of :data:`SFT_FORMATS` the record fits, or an error listing them all."""
    for fmt in SFT_FORMATS:
        if fmt.matches(record, cfg):
            return fmt
    listing = "; ".join(f"{f.name}: {f.shape}" for f in SFT_FORMATS)
    raise SFTDataError(
        f"{cfg.data}: record 0 (fields {sorted(record)}) fits none of the SFT formats: {listing}"
    )


# ---------------------------------------------------------------------------------------------- formats


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _is_rollout(rec: dict[str, Any], cfg: SFTConfig) -> bool:
    has_prompt = (
        "prompt_ids" in rec or _is_messages(rec.get("messages")) or rec.get(cfg.question_field) is not None
    )
    return has_prompt and ("completion_ids" in rec or isinstance(rec.get("completion"), str))


def _rollout_example(rec: dict[str, Any], ctx: _Context) -> Example:
    cfg, tokenizer = ctx.cfg, ctx.tokenizer
    if "prompt_ids" in rec:
        prompt = [int(t) for t in rec["prompt_ids"]]
    else:
        question = rec.get("messages") or rec.get(cfg.question_field)
        if ctx.renderer is None:
            from student_trainer.data.prompts import PromptRenderer, PromptTemplates

            templates = PromptTemplates(
                cfg.student_template,
                "same",
                system_prompt=cfg.system_prompt,
                chat_template_kwargs=cfg.chat_template_kwargs or {},
            )
            ctx.renderer = PromptRenderer(tokenizer, templates)
        prompt = ctx.renderer.render(question).student_ids
    if "completion_ids" in rec:
        return prompt, [int(t) for t in rec["completion_ids"]]
    completion = _ids(tokenizer, rec["completion"])
    if rec.get("finish_reason", "stop") == "stop":
        completion = _with_eos(completion, tokenizer)
    return prompt, completion


def _is_prompt_completion(rec: dict[str, Any], cfg: SFTConfig) -> bool:
    return isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)


def _prompt_completion_example(rec: dict[str, Any], ctx: _Context) -> Example:
    # TRL's standard prompt-completion: the prompt as is (no template), EOS closes the completion
    prompt = _ids(ctx.tokenizer, rec["prompt"])
    if not prompt:
        raise SFTDataError(f"{ctx.where}: the prompt is empty")
    return prompt, _with_eos(_ids(ctx.tokenizer, rec["completion"]), ctx.tokenizer)


def _is_conversational(rec: dict[str, Any], cfg: SFTConfig) -> bool:
    return _is_messages(rec.get("messages")) and "completion" not in rec and "completion_ids" not in rec


def _conversational_example(rec: dict[str, Any], ctx: _Context) -> Example:
    messages = _checked_messages(rec["messages"], f"{ctx.where} field 'messages'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last != len(messages) - 1:
        roles = [m["role"] for m in messages]
        raise SFTDataError(
            f"{ctx.where}: 'messages' must end with the assistant turn to learn (the target); roles: {roles}"
        )
    return _chat_example(messages[:last], messages[last:], ctx)


def _is_conversational_pc(rec: dict[str, Any], cfg: SFTConfig) -> bool:
    return _is_messages(rec.get("prompt")) and _is_messages(rec.get("completion"))


def _conversational_pc_example(rec: dict[str, Any], ctx: _Context) -> Example:
    prompt = _checked_messages(rec["prompt"], f"{ctx.where} field 'prompt'")
    completion = _checked_messages(rec["completion"], f"{ctx.where} field 'completion'")
    if completion[0]["role"] != "assistant":
        raise SFTDataError(
            f"{ctx.where}: 'completion' must start with an assistant message, "
            f"got role {completion[0]['role']!r}"
        )
    return _chat_example(prompt, completion, ctx)


SFT_FORMATS: tuple[SFTFormat, ...] = (
    SFTFormat(
        "conversational_prompt_completion",
        '{"prompt": [messages], "completion": [assistant message]} (TRL conversational prompt-completion)',
        _is_conversational_pc,
        _conversational_pc_example,
    ),
    SFTFormat(
        "rollouts",
        "prompt_ids | messages | <question_field> with completion_ids | completion "
        "(student-trainer generate)",
        _is_rollout,
        _rollout_example,
    ),
    SFTFormat(
        "prompt_completion",
        '{"prompt": str, "completion": str} (TRL standard prompt-completion)',
        _is_prompt_completion,
        _prompt_completion_example,
    ),
    SFTFormat(
        "conversational",
        '{"messages": [..., {"role": "assistant", ...}]} '
        "(TRL conversational; the last assistant turn is the target)",
        _is_conversational,
        _conversational_example,
    ),
)


def _chat_example(prompt: list[dict[str, str]], target: list[dict[str, str]], ctx: _Context) -> Example:
    """Prompt = ``prompt`` rendered with the generation prompt; completion = what the template renders after
    it for ``prompt + target`` (the assistant turn with its end-of-turn tokens)."""
    cfg, tokenizer = ctx.cfg, ctx.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise SFTDataError(f"{ctx.where}: chat-form data, but the student tokenizer has no chat template")
    if cfg.system_prompt and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    if not prompt:
        raise SFTDataError(f"{ctx.where}: no messages before the assistant turn (nothing to condition on)")
    kwargs = cfg.chat_template_kwargs or {}
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)
    full_text = tokenizer.apply_chat_template(prompt + target, tokenize=False, **kwargs)
    if not full_text.startswith(prompt_text):
        raise SFTDataError(
            f"{ctx.where}: the chat template does not render the prompt (with its generation prompt) as the "
            "start of the whole conversation, so the assistant turn cannot be cut out; prompt ends "
            f"{prompt_text[-60:]!r}, the conversation there reads "
            f"{full_text[len(prompt_text) - 60 : len(prompt_text)]!r}"
        )
    return _ids(tokenizer, prompt_text), _ids(tokenizer, full_text[len(prompt_text) :])


def _checked_messages(value: list[dict[str, Any]], where: str) -> list[dict[str, str]]:
    for j, m in enumerate(value):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SFTDataError(f"{where}[{j}]: a message needs string 'role' and 'content', got {m!r:.120}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else [*ids, eos]


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def run_sft(cfg: SFTConfig) -> Path:
    """Train; returns the output directory (a loadable model)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() and cfg.dtype == "auto" else "no"
    )
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if cfg.dtype == "auto" else resolve_dtype(cfg.dtype, accelerator.device)
    model, tokenizer = load_causal_lm(cfg.model, dtype, cfg.gradient_checkpointing)
    examples = load_examples(cfg, tokenizer)
    steps = cfg.steps or max(1, int(cfg.epochs * len(examples) / cfg.batch_size))
    policy = HiddenStatesLM(model)
    optimizer = build_optimizer(policy, cfg.lr, (0.9, 0.999), cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.warmup_steps, steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    start, position = 0, (0, 0)
    last = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if last is not None:
        state = checkpoint.load(accelerator, last)
        start, position = state["step"], tuple(state["data_position"])
        accelerator.print(f"resumed from {last} at step {start}")
    log = JsonlLog(out / "metrics.jsonl", resume_step=start) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        (out / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        accelerator.print(f"sft: {len(examples)} examples, {steps} steps x {cfg.batch_size} sequences")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in range(start, steps):
        t0 = time.perf_counter()
        batch, position = _take(examples, position, cfg.batch_size, cfg.seed)
        mine = batch[rank::world]
        tokens_local = torch.tensor(float(sum(len(c) for _, c in mine)), device=accelerator.device)
        tokens_global = accelerator.reduce(tokens_local.clone(), reduction="sum")
        loss_sum = 0.0
        micro = [mine[i : i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)]
        for i, mb in enumerate(micro):
            packed = pack([p for p, _ in mb], [c for _, c in mb], pad).to(accelerator.device)
            ctx = accelerator.no_sync(policy) if i < len(micro) - 1 else nullcontext()
            with ctx, accelerator.autocast():
                hidden = packed.hidden_at_completion(policy(packed.input_ids_B_L, packed.attention_mask_B_L))
                head = accelerator.unwrap_model(policy).head
                lp = gather_logprobs(hidden, head, packed.targets_N[:, None]).logprobs_N_M[:, 0]
                # token mean over the GLOBAL batch; DDP averages gradients over processes, hence * world
                loss = -lp.sum() / tokens_global.clamp_min(1) * world
                accelerator.backward(loss)
            loss_sum += float(-lp.detach().sum())
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_global = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), reduction="sum")
        metrics = {
            "step": step + 1,
            "sft/loss": float(loss_global / tokens_global.clamp_min(1)),
            "sft/tokens": int(tokens_global),
            "optim/lr": scheduler.get_last_lr()[0],
            "optim/grad_norm": None if grad_norm is None else float(grad_norm),
            "time/tokens_per_s": float(tokens_global) / (time.perf_counter() - t0),
        }
        if log is not None:
            log.write(metrics)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            accelerator.print(summary_line(step + 1, steps, {"opd/loss": metrics["sft/loss"], **metrics}))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            checkpoint.save(
                accelerator, out, step + 1, {"data_position": list(position)}, cfg.keep_checkpoints
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(policy).causal_lm.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if cfg.plot:
            plot_metrics(
                out / "metrics.jsonl",
                out / "sft_curves.png",
                keys=("sft/loss", "optim/lr", "optim/grad_norm"),
                title="SFT",
            )
        accelerator.print(f"saved the fine-tuned student to {out}")
        if cfg.push_to_hub:
            from student_trainer.hub import push_output

            push_output(
                out,
                cfg.hub_model_id,
                cfg.hub_private,
                commit_message=f"sft: {steps} steps on {cfg.data} (opd-distill)",
            )
    accelerator.end_training()
    return out


def _take(examples: list, position: tuple[int, int], n: int, seed: int) -> tuple[list, tuple[int, int]]:
    """The next ``n`` examples of the seeded per-epoch order, and the new (epoch, index) position."""
    epoch, index = position
    order = _order(len(examples), seed, epoch)
    batch = []
    while len(batch) < n:
        if index == len(examples):
            epoch, index = epoch + 1, 0
            order = _order(len(examples), seed, epoch)
        batch.append(examples[int(order[index])])
        index += 1
    return batch, (epoch, index)
