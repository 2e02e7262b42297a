"""LoRA students (``model.lora``, issue 12): peft adapters are trained, the base weights stay frozen.

    model, tokenizer = load_causal_lm(cfg.model.student, dtype)
    model = apply_lora(model, lora_settings(cfg.model.lora))    # a peft.PeftModel; only the adapters train
    engine.sync_weights(model)                                   # engines read merged_state_dict(model)
    save_final(model, tokenizer, out_dir, merge=cfg.train.merge_lora)

What the rollout engines see: the hf engine generates on the trained module itself, whose injected LoRA
layers add ``scale * B @ A`` in every forward; an engine with its own copy of the weights (the shadow, vLLM)
holds a plain, un-adapted model and loads :func:`merged_state_dict`: W + scale * B @ A per adapted layer
under the base model's own parameter names, computed without touching the training model (merging in place,
peft's ``merge_adapter``, would put the delta into the frozen weights the optimizer trains around). vLLM's
own LoRA path (a ``LoRARequest`` per step, the adapter saved to disk) is measured against the merged push in
``bench/bench_lora_sync.py``.

Only plain LoRA on linear layers is merged here (no DoRA or other variants, no LoRA bias, no embedding
layers): :func:`apply_lora` refuses anything else at start, not at the first sync. ``peft`` is the ``lora``
extra; nothing here imports it unless a LoRA model is built or loaded.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from student_trainer.errors import ConfigError, MissingDependencyError
from student_trainer.opd.distributed import full_tensor, gathered


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("model.lora needs peft: pip install 'opd[lora]' (peft>=0.13)") from exc
    return peft


def is_lora(model: Any) -> bool:
    """Whether ``model`` is a peft model (a model can only be one if peft has been imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_causal_lm(model: Any) -> Any:
    """The transformers model: for a peft model its base model, LoRA layers injected and active (its
    ``base_model`` attribute is the decoder body, as for any causal LM); any other model itself."""
    return model.get_base_model() if is_lora(model) else model


def apply_lora(model: Any, settings: dict[str, Any]) -> Any:
    """Wrap a transformers causal LM in a LoRA adapter (``settings``: ``config.lora_settings``: r, alpha,
    dropout, target_modules). ``"all-linear"`` adapts every linear layer but the output layer (peft's
    shorthand). The base weights are frozen, the adapter trains (B = 0: the wrapped model starts as the
    base model), the training mode is kept and tied embeddings stay tied. Raises ConfigError for a target
    the engines cannot merge (see the module docstring)."""
    peft = _require_peft()
    training = model.training
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"],
    )
    wrapped = peft.get_peft_model(model, config)
    layers = _adapted_layers(wrapped.get_base_model())
    if not layers:
        raise ConfigError(f"model.lora.target_modules={settings['target_modules']!r} matched no layer")
    out = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and any(m is out for m in layers.values()):
        raise ConfigError(
            "model.lora adapts the output layer, which is tied to the input embeddings: its merged weight "
            "would untie them; leave the output layer out of model.lora.target_modules"
        )
    wrapped.train(training)
    return wrapped


def _adapted_layers(base: torch.nn.Module) -> dict[str, Any]:
    """``{module name: LoRA layer}`` of a base model with injected layers; refuses what cannot be merged."""
    peft = sys.modules.get("peft")
    if peft is None:
        return {}
    from peft.tuners.lora import Linear, LoraLayer

    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, m in layers.items():
        if not isinstance(m, Linear):
            raise ConfigError(
                f"model.lora adapts {name} ({type(m).__name__}): only linear layers are supported (the "
                "rollout engines load merged weights); list linear modules in model.lora.target_modules"
            )
        extras = [a for a in m.lora_A if a in getattr(m, "lora_variant", {}) or m.lora_bias.get(a)]
        if extras:
            raise ConfigError(f"{name}: LoRA variants (DoRA, ...) and LoRA bias are not supported ({extras})")
    return layers


def _merged_weight(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """W + sum over active, unmerged adapters of scale * B @ A: a new tensor in W's dtype, computed in fp32
    (as peft's ``merge`` on CPU) with one fused ``addmm`` per adapter (2-3x faster than B @ A, scale, add)."""
    if layer.disable_adapters:
        return weight.detach()
    out = None
    with torch.no_grad():
        for name in layer.active_adapters:
            if name not in layer.lora_A or name in layer.merged_adapters:
                continue  # a merged adapter is in W already
            b, a = layer.lora_B[name].weight.float(), layer.lora_A[name].weight.float()
            if layer.fan_in_fan_out:  # W stored (in, out): its delta is (B @ A).T = A.T @ B.T
                b, a = a.T, b.T
            scale = layer.scaling[name]
            if out is None:  # a new tensor: W itself is never written
                out = torch.addmm(
                    weight.detach().float(), b.to(weight.device), a.to(weight.device), alpha=scale
                )
            else:
                out.addmm_(b.to(weight.device), a.to(weight.device), alpha=scale)
        return weight.detach() if out is None else out.to(weight.dtype)


def iter_merged_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the equivalent merged model's state dict, one at a time (a sync holds one merged
    layer at a time, not a second copy of the model): the base model's names (what ``from_pretrained``
    builds and ``merge_and_unload`` leaves), adapter tensors left out, each tied tensor once under its first
    name (as a checkpoint holds it). Unadapted tensors are the model's own (detached, not copied); merged
    ones are new. A plain model yields its own state dict the same way."""
    base = base_causal_lm(model)
    layers = _adapted_layers(base) if is_lora(model) else {}
    with gathered(base.parameters()):  # a sharded student (FSDP2, ZeRO-3): whole tensors, on every process
        yield from _merged_tensors(base, layers)


def _merged_tensors(base: torch.nn.Module, layers: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for name, tensor in base.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensor = full_tensor(tensor)
        layer_name, rest = _split_adapted(name, layers)
        if layer_name is None:
            yield name, tensor.detach()
        elif rest[0] == "base_layer":  # the adapted layer's own weight and bias
            leaf = ".".join(rest[1:])
            merged = _merged_weight(layers[layer_name], tensor) if leaf == "weight" else tensor.detach()
            yield f"{layer_name}.{leaf}", merged
        # anything else under an adapted layer is adapter state (lora_A, lora_B)


def _split_adapted(name: str, layers: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(the adapted layer ``name`` lies in, the rest of the name) or (None, [])."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix, parts[i:]
    return None, []


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """:func:`iter_merged_tensors` as a dict: the merged model's weights under the base model's names,
    the training model unchanged. A plain model: its state dict as it is (tied tensors once)."""
    return dict(iter_merged_tensors(model))


def plain_copy(model: Any, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A separate, un-adapted transformers model holding ``model``'s merged weights (cast to ``dtype``),
    no gradients, nothing shared with ``model`` (buffers deep-copied as they are).

    The deepcopy memo maps each parameter to its new tensor before the copy starts, so the weights are read
    once, never duplicated at their own precision, and a parameter reached twice (tied weights) is one
    tensor in the copy too. LoRA layers are then replaced by their base layers and the merged weights
    copied in. A plain model gives a plain copy.
    """
    base = base_causal_lm(model)
    memo: dict[int, Any] = {}
    with gathered(base.parameters()):  # ZeRO-3 partitions a model at load: copy its whole tensors
        for p in base.parameters():
            whole = full_tensor(p).detach()
            memo[id(p)] = torch.nn.Parameter(whole.to(dtype=dtype or p.dtype, copy=True), requires_grad=False)
    out = copy.deepcopy(base, memo)
    if is_lora(model):
        for name in _adapted_layers(out):
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name)
            setattr(parent, child, getattr(parent, child).get_base_layer())
        if hasattr(out, "peft_config"):
            del out.peft_config  # peft's bookkeeping, copied along with the base model
        own = dict(out.named_parameters())
        with torch.no_grad():
            for name, tensor in iter_merged_tensors(model):
                if name in own:
                    own[name].copy_(tensor)
    return out


def save_final(model: Any, tokenizer: Any, out_dir: str | Path, merge: bool) -> Path:
    """The trained student in ``out_dir``, with its tokenizer. A LoRA model: the adapter only
    (``adapter_config.json`` + ``adapter_model.safetensors``; load it with ``peft.PeftModel.from_pretrained``
    on the base model, or :func:`load_saved`) or, with ``merge``, a full transformers model directory of the
    merged weights (loads with ``AutoModelForCausalLM.from_pretrained``, no peft). A plain model: the whole
    model either way."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_lora(model) and merge:
        # the base model's own save with the merged tensors: its config, generation config and tie handling
        base_causal_lm(model).save_pretrained(out, state_dict=merged_state_dict(model))
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_saved(path: str | Path, dtype: torch.dtype = torch.float32, base: str | None = None) -> Any:
    """A model saved by :func:`save_final`: an adapter directory (on ``base``, default: the base model path
    the adapter records) as a peft model in eval mode, or any transformers model directory."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    peft = _require_peft()
    base = base or peft.PeftConfig.from_pretrained(path).base_model_name_or_path
    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), path)
