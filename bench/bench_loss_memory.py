"""Peak memory of each OPD loss (forward + backward from the final hidden states) at a Qwen-size vocabulary:
the chunked implementations of student_trainer.opd.chunked vs a naive full-vocab fp32 log_softmax, side by side.

    python bench/bench_loss_memory.py                      # CPU: N=2048 tokens, H=256, V=151,936 (~1.5 min)
    python bench/bench_loss_memory.py --device cuda        # GPU: bf16 hidden states and head

What is measured (extra memory above what exists before the case: inputs, parameters):
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the case (exact, torch's allocator).
- CPU: torch has no CPU allocator statistics, so two figures are reported. "torch peak" replays the
  allocation and free events that ``torch.profiler`` records with ``profile_memory=True`` and takes the
  maximum of the running total: exact for every tensor torch allocates (autograd saved tensors, temporaries,
  gradients), blind to library-internal scratch (oneDNN/MKL) and allocator fragmentation. "RSS peak" is the
  process's peak resident set (VmHWM, reset through /proc/self/clear_refs before each case) minus the RSS
  before it: everything the process touched, page-granular, inflated by what glibc keeps after frees.
Both include the head's weight gradient (V x H fp32), which any implementation allocates.
Times are wall-clock of the same (profiled) run, one repetition: indicative only.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student_trainer.opd.chunked import full_vocab_reverse_kl, gather_logprobs, head_logits  # noqa: E402
from student_trainer.opd.losses import (  # noqa: E402
    full_vocab_loss,
    sampled_token_loss,
    student_topk_loss,
    teacher_topk_tail_loss,
)

MiB = 1024**2


# ------------------------------------------------------------------------------------------ measuring


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _profiled_peak(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak, out


def measure(fn: Callable[[], torch.Tensor], device: torch.device) -> dict[str, float]:
    """Run fn (forward + backward, returns the detached loss) once; peak extra bytes and seconds."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return {
            "peak": torch.cuda.max_memory_allocated() - before,
            "rss": float("nan"),
            "s": seconds,
            "loss": loss,
        }
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _rss_bytes("VmRSS")
    t0 = time.perf_counter()
    peak, loss = _profiled_peak(fn)
    seconds = time.perf_counter() - t0
    return {"peak": peak, "rss": _rss_bytes("VmHWM") - rss0, "s": seconds, "loss": loss}


# ---------------------------------------------------------------------------------------------- cases


def build_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)  # on the device: a [V, H] CPU randn takes seconds
    n, h, v, k = args.tokens, args.hidden, args.vocab, args.k

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    head = torch.nn.Linear(h, v, bias=False, device=device, dtype=dtype)
    teacher_head = torch.nn.Linear(h, v, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(randn(v, h, scale=h**-0.5))
        teacher_head.weight.copy_(head.weight + randn(v, h, scale=0.3 * h**-0.5))
    hidden = randn(n, h, scale=3.0).requires_grad_(True)
    teacher_hidden = hidden.detach().clone()
    with torch.no_grad():  # teacher service data, computed once (not part of any measured case)
        t_logp = torch.log_softmax(teacher_head(teacher_hidden).float(), -1)
        y = torch.randint(0, v, (n,), generator=g, device=device)
        s_ids = torch.log_softmax(head(hidden).float(), -1).topk(k, -1).indices  # stored student top-k
        t_top = t_logp.topk(k, -1)
        data = {
            "y": y,
            "s_ids": s_ids,
            "t_y": t_logp.gather(1, y[:, None]).squeeze(1),
            "t_cand": t_logp.gather(1, s_ids),
            "t_top_ids": t_top.indices,
            "t_top_lp": t_top.values,
        }
        del t_logp, t_top
    return {
        "head": head,
        "teacher_head": teacher_head,
        "hidden": hidden,
        "teacher_hidden": teacher_hidden,
        **data,
    }


def cases(inp: dict, chunk_rows: int) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    head, hidden = inp["head"], inp["hidden"]

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            loss = loss_fn()
            loss.backward()
            return loss.detach()

        return step

    def naive_logp() -> torch.Tensor:
        return torch.log_softmax(head(hidden).float(), dim=-1)

    def chunked(ids: torch.Tensor, method: str = "recompute") -> torch.Tensor:
        return gather_logprobs(hidden, head, ids, chunk_rows=chunk_rows, method=method).logprobs_N_M

    def naive_full() -> torch.Tensor:
        logp = naive_logp()
        with torch.no_grad():
            logq = torch.log_softmax(inp["teacher_head"](inp["teacher_hidden"]).float(), dim=-1)
        return full_vocab_loss((logp.exp() * (logp - logq)).sum(-1))

    def chunked_full() -> torch.Tensor:
        teacher = head_logits(inp["teacher_hidden"], inp["teacher_head"])
        return full_vocab_loss(full_vocab_reverse_kl(hidden, head, teacher, chunk_rows=chunk_rows).kl_N)

    y, s_ids, t_ids = inp["y"][:, None], inp["s_ids"], inp["t_top_ids"]
    return {
        "sampled-token": {
            "naive": run(lambda: sampled_token_loss(naive_logp().gather(1, y).squeeze(1), inp["t_y"])),
            "chunked": run(lambda: sampled_token_loss(chunked(y).squeeze(1), inp["t_y"])),
        },
        "student top-k (code)": {
            "naive": run(lambda: student_topk_loss(naive_logp().gather(1, s_ids), inp["t_cand"])),
            "chunked": run(lambda: student_topk_loss(chunked(s_ids), inp["t_cand"])),
            "chunked (checkpoint)": run(
                lambda: student_topk_loss(chunked(s_ids, "checkpoint"), inp["t_cand"])
            ),
        },
        "teacher top-k + tail": {
            "naive": run(lambda: teacher_topk_tail_loss(naive_logp().gather(1, t_ids), inp["t_top_lp"])),
            "chunked": run(lambda: teacher_topk_tail_loss(chunked(t_ids), inp["t_top_lp"])),
        },
        "full vocabulary": {"naive": run(naive_full), "chunked": run(chunked_full)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--tokens", type=int, default=2048, help="N, response tokens in the micro-batch")
    p.add_argument("--hidden", type=int, default=256, help="H, hidden size")
    p.add_argument("--vocab", type=int, default=151_936, help="V (Qwen3's padded vocabulary)")
    p.add_argument("--k", type=int, default=16, help="top-k size")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per chunk for the chunked losses")
    p.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on cuda"
    )
    p.add_argument("--only", default="", help="comma-separated substrings of loss names to run")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        p.error("CPU measurement needs Linux /proc/self/clear_refs")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    n, v, c = args.tokens, args.vocab, args.chunk_rows
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__} | {device.type} ({dev_name}, {torch.get_num_threads()} threads) | "
        f"N={n} H={args.hidden} V={v} k={args.k} chunk_rows={c} dtype={str(dtype).removeprefix('torch.')}"
    )
    print(
        f"one fp32 [N, V] tensor = {n * v * 4 / MiB:.0f} MiB; one fp32 [chunk_rows, V] = {c * v * 4 / MiB:.0f} MiB"
    )

    inp = build_inputs(args, device, dtype)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    t_start = time.perf_counter()
    header = f"{'loss':<22} {'implementation':<22} {'torch peak MiB':>14} {'RSS peak MiB':>12} {'time s':>7} {'naive/this':>10}"
    print(header)
    print("-" * len(header))
    for loss_name, impls in cases(inp, c).items():
        if only and not any(s in loss_name for s in only):
            continue
        results = {}
        for name, fn in impls.items():
            # free the previous case's gradients BEFORE measuring: a free inside the measured window would
            # offset the running total, and accumulating into an existing .grad would hide its allocation
            inp["head"].weight.grad, inp["hidden"].grad = None, None
            results[name] = measure(fn, device)
        naive = results["naive"]
        for name, r in results.items():
            ratio = naive["peak"] / r["peak"]
            rss = f"{r['rss'] / MiB:12.0f}" if r["rss"] == r["rss"] else f"{'-':>12}"
            print(f"{loss_name:<22} {name:<22} {r['peak'] / MiB:14.0f} {rss} {r['s']:7.2f} {ratio:9.1f}x")
        ref = naive["loss"].double().item()
        diffs = [abs(r["loss"].double().item() - ref) / max(abs(ref), 1e-30) for r in results.values()]
        print(f"{'':<22} (loss {ref:.6g}; max relative |chunked - naive| = {max(diffs):.1e})")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
