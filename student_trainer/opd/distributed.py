"""The trainer on N processes, through accelerate: which engine shards the student, at what precision, and
how the code that needs whole tensors (the chunked head loss, the rollout engines, the final save) gets them.

    acc = build_accelerator(cfg.model.dtype, log_with=trackers, project_dir=out)
    policy, optimizer = acc.prepare(policy, optimizer)
    acc.print(setup_line(acc, policy))          # world size, distributed type, sharding, precision

Engines (accelerate's own; nothing here re-implements them):

- DDP (``MULTI_GPU`` / ``MULTI_CPU``): every process holds the whole model.
- FSDP2 (``distributed_type: FSDP`` with ``fsdp_version: 2``): each decoder layer is its own ``fully_shard``
  unit, the rest (embeddings, final norm, output layer) the root unit; parameters are DTensors sharded on dim
  0. The chunked head loss runs inside the root module's forward (``HiddenStatesLM.forward(..., head_fn=)``),
  where the root unit is whole, so it reads the whole output-layer weight, and FSDP's own backward
  reduce-scatters its gradient. FSDP1 is refused (flat parameters do not expose the head's weight).
- DeepSpeed ZeRO (``distributed_type: DEEPSPEED``): stages 1/2 keep whole parameters; stage 3 partitions them,
  and the output layer's weight is registered as an external parameter of the root module
  (``deepspeed.zero.register_external_parameter``), so ZeRO gathers it for the root's forward and backward.

On a machine without a GPU accelerate never enables FSDP: it builds a ``MULTI_CPU`` (DDP) world and drops the
plugin without a word (so an FSDP launch trains unsharded copies). :func:`build_accelerator` enables the FSDP2
plugin the launcher asked for there (torch's FSDP2 runs on CPU with gloo); that is how the tests shard.

Precision, one rule, printed at start: ``model.dtype`` is the dtype the trained weights are stored in (auto =
fp32 master weights); accelerate's ``mixed_precision`` is the compute (autocast) dtype. When the launch does
not set ``mixed_precision``, it is bf16 on a GPU with ``model.dtype: auto`` and ``no`` otherwise; a launch that
sets it wins for the compute dtype. fp16 compute over bf16 weights (or the reverse) is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from student_trainer.errors import ConfigError

MIXED_PRECISIONS = ("no", "bf16", "fp16")
PARAM_SHARDING = ("fsdp2", "zero3")  # no process holds every parameter whole


def compute_precision(model_dtype: str, gpu: bool, launcher: str | None) -> str:
    """accelerate's ``mixed_precision`` for this run: the launcher's when it set one, else bf16 on a GPU for
    fp32 master weights (``model.dtype: auto``) and ``no`` otherwise. Raises ConfigError on a half/half clash."""
    mixed = launcher if launcher else ("bf16" if gpu and model_dtype == "auto" else "no")
    if mixed not in MIXED_PRECISIONS:
        raise ConfigError(f"mixed_precision={mixed!r} from the accelerate config: use no, bf16 or fp16")
    half = {"bfloat16": "bf16", "float16": "fp16"}.get(model_dtype)
    if half and mixed != "no" and mixed != half:
        raise ConfigError(
            f"model.dtype={model_dtype} stores the weights in {half}, but the accelerate config asks for "
            f"mixed_precision={mixed}: set mixed_precision to {half} or no in the accelerate config, or "
            "model.dtype=auto (fp32 master weights) to compute in it"
        )
    return mixed


def build_accelerator(model_dtype: str, grad_clip: float = 0.0, **kwargs: Any):
    """The run's ``Accelerator`` (``kwargs``: log_with, project_dir, ...), with the precision rule applied, the
    DeepSpeed settings this loop needs, and the FSDP2 / DeepSpeed plugin the launcher asked for in force on
    CPU-only machines too (where accelerate would silently run DDP)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    gpu = torch.cuda.is_available()
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    mixed = compute_precision(model_dtype, gpu, None if launcher in (None, "") else launcher.lower())
    fsdp = _env_flag("ACCELERATE_USE_FSDP")
    if fsdp and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ConfigError(
            "the accelerate config asks for FSDP version 1; this trainer shards with FSDP2 (fsdp_version: 2, "
            "see configs/accelerate/fsdp.yaml): FSDP1's flat parameters hide the output layer's weight that the "
            "chunked loss reads"
        )
    ds = _deepspeed_plugin(grad_clip, mixed) if _env_flag("ACCELERATE_USE_DEEPSPEED") else None
    acc = Accelerator(mixed_precision=mixed, cpu=not gpu, deepspeed_plugin=ds, **kwargs)
    if acc.distributed_type == DistributedType.MULTI_CPU and fsdp:
        _enable_fsdp2_on_cpu(acc)
    elif acc.distributed_type == DistributedType.MULTI_CPU and ds is not None:
        _enable_deepspeed_on_cpu(acc, ds, mixed)
    return acc


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _deepspeed_plugin(grad_clip: float, mixed: str):
    """accelerate's DeepSpeed plugin from the launcher's settings, fitted to this loop: one optimizer step per
    training step whatever the number of micro-batches (the loop marks the last micro-batch as the
    accumulation boundary, so ``gradient_accumulation_steps`` is 1 and DeepSpeed does not rescale the loss,
    which is already the step's token mean), ``optim.grad_clip`` as DeepSpeed's clipping, the trainer's own
    AdamW (no DeepSpeed optimizer), a 16-bit consolidated save for the final model under ZeRO-3."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    if plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1  # rollouts, not a dataloader, feed it
    plugin.deepspeed_config["gradient_accumulation_steps"] = 1
    plugin.deepspeed_config["gradient_clipping"] = float(grad_clip)
    plugin.deepspeed_config.setdefault("zero_force_ds_cpu_optimizer", False)
    zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
    if int(zero.get("stage", plugin.zero_stage)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return plugin


def _enable_fsdp2_on_cpu(acc: Any) -> None:
    """accelerate builds FSDP plugins only for GPU-like worlds; on CPU it falls back to DDP. Put the plugin the
    launcher configured (read from its environment, as accelerate does) into the shared state."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = (
        DistributedType.FSDP
    )  # what a new AcceleratorState copies


def _enable_deepspeed_on_cpu(acc: Any, plugin: Any, mixed: str) -> None:
    """The same for DeepSpeed (its CPU accelerator runs ZeRO over gloo): the plugin into the shared state and
    DeepSpeed's communication layer on the process group accelerate opened."""
    import deepspeed
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    acc.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    acc.state.deepspeed_plugins = {"default": plugin}
    plugin.select(_from_accelerator_state=True)
    plugin.set_mixed_precision(mixed)
    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def sharding(acc: Any) -> str:
    """``none`` | ``fsdp2`` | ``zero1`` | ``zero2`` | ``zero3``: how parameters are split across processes."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp2"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{int(acc.deepspeed_plugin.zero_stage)}"
    return "none"


def local_fraction(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this process stores, parameters of the whole model), counted once per tensor: a DTensor
    counts its local shard, a ZeRO-3 parameter its partition (``ds_tensor``)."""
    local = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "ds_numel"):
            total += int(p.ds_numel)
            local += int(p.ds_tensor.numel())
        elif _is_dtensor(p):
            total += p.numel()
            local += p.to_local().numel()
        else:
            total += p.numel()
            local += p.numel()
    return local, total


def setup_line(acc: Any, model: torch.nn.Module) -> str:
    """The start-of-run line: world size, distributed type, sharding, weight and compute dtypes."""
    local, total = local_fraction(model)
    dtypes = sorted({str(_local(p).dtype).removeprefix("torch.") for p in model.parameters()})
    line = (
        f"distributed: world size {acc.num_processes}, {acc.distributed_type}, sharding {sharding(acc)}; "
        f"weights {'/'.join(dtypes)}, mixed precision {acc.mixed_precision}"
    )
    if sharding(acc) in PARAM_SHARDING:
        line += f"; this process holds {local:,} of {total:,} parameters ({local / max(total, 1):.2f})"
    return line


def shard_line(acc: Any, model: torch.nn.Module) -> str:
    """One process's share of the parameters (every process prints its own)."""
    local, total = local_fraction(model)
    return f"rank {acc.process_index}/{acc.num_processes} holds {local} of {total} parameters"


def prepare_head(acc: Any, policy: torch.nn.Module) -> None:
    """ZeRO-3: register the output layer's weight with the root module, which reads it outside the head's own
    forward (the chunked loss); the other engines need nothing."""
    if sharding(acc) != "zero3":
        return
    import deepspeed

    inner = acc.unwrap_model(policy)
    deepspeed.zero.register_external_parameter(inner, inner.head.weight)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every process must call it in the same order)."""
    return t.full_tensor() if _is_dtensor(t) else t


@contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """ZeRO-3 parameters gathered whole for reading inside the block (every process must enter it); others:
    nothing to do (DTensors are made whole with :func:`full_tensor`)."""
    params = list(params)
    if any(hasattr(p, "ds_numel") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def unwrap_state_dict(acc: Any, policy: torch.nn.Module, prefix: str = "causal_lm.") -> dict[str, Any]:
    """The whole model's state dict on the main process (accelerate gathers it: FSDP2 full state dict, ZeRO-3
    16-bit consolidation), keys relative to the wrapped causal LM. Every process must call it."""
    sd = acc.get_state_dict(policy)
    return {k.removeprefix(prefix): v for k, v in (sd or {}).items()}
