"""The ``hf`` engine sampling from a low-precision shadow of the trained model (``rollout.shadow_dtype``).

    engine = ShadowRolloutEngine(model, tokenizer, "bfloat16", cache_implementation="static")
    batch = engine.generate(prompts, n=4, max_new_tokens=512, top_k_record=16, seed=step_seed)  # the shadow
    ...optimizer.step()...                                                                       # the master
    engine.sync_weights(model)    # master -> shadow, in place (same storage), policy_version += 1

Why: with fp32 master weights the trainer samples under bf16 autocast, and transformers' static KV cache
(3x faster generation on a GPU) cannot work there: it is allocated in one dtype while autocast hands it
fp32 keys (the normed ones) and bf16 values. The shadow is a second copy of the model whose parameters are
in ``shadow_dtype`` (buffers such as the rotary frequencies keep theirs); generation runs on it with autocast
OFF, so the cache sees one dtype throughout. It costs one extra copy of the weights in ``shadow_dtype`` (2
bytes per parameter in bf16: 3.4 GB for a 1.7B student) and one device copy per optimizer step.

The shadow is built once: ``copy.deepcopy`` of the master with every parameter pre-mapped to a new
``shadow_dtype`` tensor, so nothing is shared with the master, the master is never copied at full precision,
and tied parameters (embeddings tied to the output layer) stay one tensor. A LoRA student (``model.lora``)
gets a plain, un-adapted shadow: its LoRA layers replaced by their base layers, which hold the merged weights
W + scale * B @ A (``opd.lora.merged_state_dict``), refreshed the same way after every step. It is in eval mode and needs no
gradients. Everything else is :class:`HFRolloutEngine`'s (the recording, the sampling settings, the padding),
inherited, so its changes apply here too. The recorded log-probs are log_softmax of the shadow's logits
computed in fp32; they are the shadow's distribution, which is the distribution the tokens were sampled
from (with a bf16 shadow it differs from the fp32 master's by bf16 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from student_trainer.errors import ConfigError
from student_trainer.opd.lora import base_causal_lm, iter_merged_tensors, plain_copy
from student_trainer.rollout.base import RolloutBatch
from student_trainer.rollout.hf import HFRolloutEngine

SHADOW_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,  # an exact copy: for tests
}


def make_shadow(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are new ``dtype`` tensors (no gradients), in eval mode; for a
    LoRA student a plain model holding the merged weights (``opd.lora.plain_copy``: the master's weights
    are read once, never duplicated at their own precision, tied parameters stay one tensor)."""
    shadow = plain_copy(model, dtype)
    shadow.eval()
    config = getattr(shadow, "config", None)
    if config is not None and hasattr(config, "dtype"):
        config.dtype = dtype
    return shadow


class ShadowRolloutEngine(HFRolloutEngine):
    """:class:`HFRolloutEngine` generating from a ``shadow_dtype`` copy of ``model``, autocast disabled.

    shadow_dtype: "bfloat16" (the use), "float16", or "float32" (an exact copy, for tests); or a torch dtype.
    The other keyword arguments are :class:`HFRolloutEngine`'s.
    """

    def __init__(self, model: Any, tokenizer: Any, shadow_dtype: str | torch.dtype, **kwargs: Any) -> None:
        dtype = SHADOW_DTYPES.get(shadow_dtype) if isinstance(shadow_dtype, str) else shadow_dtype
        if dtype not in SHADOW_DTYPES.values():
            raise ConfigError(
                f"shadow_dtype={shadow_dtype!r}: use one of {', '.join(SHADOW_DTYPES)} (bfloat16 on a GPU)"
            )
        self.shadow_dtype = dtype
        shadow = make_shadow(model, dtype)
        self._params = dict(shadow.named_parameters())
        self._names = list(self._params)
        self._known = set(shadow.state_dict())  # parameters, their tied aliases, persistent buffers
        self._copy_from(model, "the shadow's parameters do not mirror the model's (an unusual module layout)")
        _check_ties(base_causal_lm(model), shadow)
        super().__init__(shadow, tokenizer, **kwargs)

    @property
    def shadow(self) -> torch.nn.Module:
        """The copy that generates (``self.model`` of the base engine)."""
        return self.model

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current (for a LoRA student: merged) parameters into the shadow's own tensors
        (cast to its dtype; no tensor is reallocated, so a compiled static-cache decode step keeps its
        addresses) and bump the version."""
        self._copy_from(
            model, "sync_weights got a model whose parameters differ from the one the shadow was built from"
        )
        self.policy_version += 1

    def _copy_from(self, model: torch.nn.Module, mismatch: str) -> None:
        """Every shadow parameter from ``model``'s merged tensors, one merged layer alive at a time."""
        copied = set()
        with torch.no_grad():
            for name, tensor in iter_merged_tensors(model):
                if name not in self._known:
                    raise ConfigError(f"{mismatch}: {name} is not in the shadow")
                if name in self._params:
                    self._params[name].data.copy_(tensor)
                    copied.add(name)
        if len(copied) != len(self._names):
            missing = sorted(set(self._names) - copied)[:3]
            raise ConfigError(f"{mismatch}: the model has no {', '.join(missing)}")

    def generate(self, prompts: Sequence[Sequence[int]], **kwargs: Any) -> RolloutBatch:
        """:meth:`HFRolloutEngine.generate` on the shadow, with the caller's autocast (the trainer samples
        under bf16 autocast for its fp32 master weights) turned off: the shadow computes in its own dtype."""
        with torch.autocast(self.model.device.type, enabled=False):
            return super().generate(prompts, **kwargs)


def _check_ties(model: torch.nn.Module, shadow: torch.nn.Module) -> None:
    """Embeddings tied in the master (``config.tie_word_embeddings``) are tied in the shadow."""
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    get_in, get_out = (getattr(model, n, None) for n in ("get_input_embeddings", "get_output_embeddings"))
    if not (tie and get_in and get_out and get_out() is not None):
        return
    tied_master = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tied_shadow = shadow.get_output_embeddings().weight is shadow.get_input_embeddings().weight
    if tied_master != tied_shadow:
        raise ConfigError(
            "the shadow's embeddings are not tied as the model's are (an unusual module layout)"
        )
