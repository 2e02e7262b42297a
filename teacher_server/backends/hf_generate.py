"""Teacher sampling with transformers ``generate`` (the hf backend's ``/v1/generate``)."""

from __future__ import annotations

from typing import Any

import torch

from shared.protocol import GenerateOptions
from shared.wire import GeneratedSample


def _eos_ids(model: Any, tokenizer: Any, extra: list[int] | None) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids + [i for i in (extra or []) if i not in ids]


def _cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Text up to (not including) the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops or []) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    params: GenerateOptions,
    device: torch.device,
    max_model_len: int,
) -> list[list[GeneratedSample]]:
    """``params.n`` samples per prompt. Prompts are generated one at a time (n rows each) so that a seed
    gives the same samples whatever else is in the request. cumulative_logprob is the sum of the model's
    raw (temperature 1, unfiltered) log-probs of the sampled tokens, as vLLM reports by default."""
    eos = _eos_ids(model, tokenizer, params.stop_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    out: list[list[GeneratedSample]] = []
    for index, prompt in enumerate(prompts):
        if params.seed is not None:
            torch.manual_seed(params.seed + index)
        max_new = max(1, min(params.max_tokens, max_model_len - len(prompt)))
        ids = torch.tensor([prompt], device=device)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new,
            num_return_sequences=params.n,
            eos_token_id=eos or None,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
        )
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=tokenizer)
        greedy_copies = params.n if params.temperature == 0 else 1
        if greedy_copies > 1:  # greedy is deterministic: decode once, return n identical samples
            kwargs["num_return_sequences"] = 1
        res = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = res.sequences[:, len(prompt) :].repeat(greedy_copies, 1)
        logits = torch.stack(res.logits, dim=1).float().repeat(greedy_copies, 1, 1)  # (n, steps, V) raw
        token_lp = logits.log_softmax(-1).gather(-1, new[:, : logits.shape[1], None]).squeeze(-1)
        out.append(
            [_sample(row, token_lp[r], eos, pad, params, tokenizer, max_new) for r, row in enumerate(new)]
        )
    return out


def _sample(
    row: torch.Tensor,
    lp: torch.Tensor,
    eos: list[int],
    pad: int,
    params: GenerateOptions,
    tokenizer: Any,
    max_new: int,
) -> GeneratedSample:
    ids = row.tolist()
    finish = "length"
    end = len(ids)
    for i, tok in enumerate(ids):
        if tok in eos:
            end, finish = i + 1, "stop"  # the EOS token is part of the completion, as vLLM returns it
            break
    if finish == "length" and pad not in eos:
        while end > 0 and ids[end - 1] == pad and end < max_new:
            end -= 1
    ids = ids[:end]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text, hit = _cut_at_stop(text, params.stop)
    if hit:
        finish = "stop"
    return GeneratedSample(ids, text, finish, float(lp[:end].sum()))
