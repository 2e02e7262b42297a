"""The student as the trainers see it: final hidden states from a causal LM, plus batch packing.

The losses apply the output layer themselves, in row chunks (``student_trainer.opd.chunked``), so the student's
forward stops at the final hidden states and the ``[B, T, V]`` logits are never built. ``HiddenStatesLM``
wraps a Hugging Face causal LM for that; it is what ``accelerator.prepare`` sees (DDP hooks fire for the
head's parameters too, because their gradients arrive in the same backward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class HiddenStatesLM(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> (B, L, H)`` final hidden states; ``head`` is the LM head.

    ``forward(..., head_fn=f)`` returns ``f(hidden_B_L_H, head)`` instead: the loss is computed inside this
    module's forward, where a sharding engine has made the head's weight whole (FSDP2 unshards the tail unit;
    ZeRO-3 gathers the weight registered as external, ``opd.distributed``). ``_no_split_modules`` is the
    wrapped model's, so accelerate's FSDP2 wrapping makes each decoder layer a unit; this module has no
    embedding getters on purpose, so the embeddings, the final norm and the head stay in the root unit, which
    FSDP2 keeps whole from the root's forward to the end of its backward (a separate head unit would only be
    unsharded by a call of the head's own forward, which the chunked loss never makes).
    """

    def __init__(self, causal_lm: Any) -> None:
        super().__init__()
        self.causal_lm = causal_lm

    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.hf_model, "_no_split_modules", None)

    @property
    def hf_model(self) -> Any:
        """The transformers model (inside a peft wrapper for a LoRA student)."""
        get_base = getattr(self.causal_lm, "get_base_model", None)
        return get_base() if get_base is not None else self.causal_lm

    @property
    def head(self) -> torch.nn.Linear:
        return self.hf_model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        head_fn: Callable[[torch.Tensor, torch.nn.Module], Any] | None = None,
    ) -> Any:
        out = self.hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden_B_L_H = out.last_hidden_state
        return hidden_B_L_H if head_fn is None else head_fn(hidden_B_L_H, self.head)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(
    path: str, dtype: torch.dtype, gradient_checkpointing: bool = False, trust_remote_code=False
):
    """Model and tokenizer through ``from_pretrained``; the model is in train mode, fp32 master weights on
    CPU, the requested dtype otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model, tokenizer


@dataclass
class PackedBatch:
    """Right-padded prompt+completion rows and where the completion tokens are.

    Shapes: B rows, L = longest prompt+completion, N = total completion tokens.
    ``positions_N`` are flat indices into (B * L) of the positions that PREDICT each completion token
    (position p - 1 + t predicts completion[t]); ``targets_N`` the completion tokens; ``row_N`` their row.
    """

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    positions_N: torch.Tensor
    targets_N: torch.Tensor
    row_N: torch.Tensor
    lengths: list[int]  # completion length per row

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids_B_L.to(device),
            self.attention_mask_B_L.to(device),
            self.positions_N.to(device),
            self.targets_N.to(device),
            self.row_N.to(device),
            self.lengths,
        )

    def hidden_at_completion(self, hidden_B_L_H: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (N, H): the hidden states that predict the completion tokens."""
        return hidden_B_L_H.reshape(-1, hidden_B_L_H.shape[-1]).index_select(0, self.positions_N)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> PackedBatch:
    """Right-pad ``prompt + completion`` per row (right padding keeps positions of real tokens unchanged)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    positions, targets, rows = [], [], []
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(p) < 1:
            raise ValueError(f"row {b}: empty prompt; at least one token is needed to predict the completion")
        s = seqs[b]
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
        positions.append(torch.arange(len(p) - 1, len(p) - 1 + len(c)) + b * width)
        targets.append(torch.tensor(list(c), dtype=torch.long))
        rows.append(torch.full((len(c),), b, dtype=torch.long))
    return PackedBatch(
        ids, mask, torch.cat(positions), torch.cat(targets), torch.cat(rows), [len(c) for c in completions]
    )
