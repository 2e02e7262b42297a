"""Teacher service throughput vs the same backend in-process, plus bytes per scored position.

Measured side by side in one run (rounds alternate service / in-process, so machine noise hits both):
  * service: a real `teacher-server` subprocess, many concurrent clients, msgpack, over loopback HTTP;
  * in-process: the same transformers backend's `score_batch` on the same sequences, batched the same way
    (`plan_batches` with the same token budget) -- the best the service could do without HTTP.

CPU (issue 2, benchmark 2; ~25M-parameter model so compute dominates):
  python bench/bench_score_service.py --preset cpu
GPU (benchmark 3; random-weight Qwen3 shapes, bf16, 8 x 4096 tokens, k = 16):
  python bench/bench_score_service.py --preset gpu --shape qwen3-8b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.teacher_process import TeacherProcess  # noqa: E402
from devkit.tiny_models import TinySpec, save_shape_config, save_tiny  # noqa: E402
from shared import codec  # noqa: E402
from shared.protocol import ScoreOptions  # noqa: E402
from teacher_server.backends.batcher import plan_batches  # noqa: E402
from teacher_server.backends.hf import HFBackend  # noqa: E402
from teacher_server.config import ServerConfig  # noqa: E402
from teacher_server.jobs import ScoreJob  # noqa: E402

CPU_SPEC = TinySpec(
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    intermediate_size=1536,
    initializer_range=0.02,
)
PRESETS = {
    "cpu": dict(
        sequences=64,
        prompt_len=64,
        completion_len=192,
        clients=8,
        per_request=8,
        rounds=3,
        max_batch_tokens=8192,
        device="cpu",
        dtype="float32",
    ),
    "gpu": dict(
        sequences=8,
        prompt_len=512,
        completion_len=3584,
        clients=8,
        per_request=1,
        rounds=4,
        max_batch_tokens=32768,
        device="cuda",
        dtype="bfloat16",
    ),
}


def make_model(args, root: Path) -> tuple[Path, list[str]]:
    if args.shape:
        return save_shape_config(root / args.shape, args.shape), ["--load-format", "dummy"]
    path = save_tiny(root / "cpu-model", CPU_SPEC, seed=0)
    return path, []


def make_jobs(args, vocab: int) -> list[ScoreJob]:
    rng = np.random.default_rng(0)
    return [
        ScoreJob(
            rng.integers(0, vocab, args.prompt_len),
            rng.integers(0, vocab, args.completion_len),
            ScoreOptions(top_k=args.top_k),
        )
        for _ in range(args.sequences)
    ]


async def service_round(url: str, jobs: list[ScoreJob], clients: int, per_request: int, top_k: int) -> float:
    chunks = [jobs[i : i + per_request] for i in range(0, len(jobs), per_request)]
    headers = {"Content-Type": codec.MSGPACK, "Accept": codec.MSGPACK}
    bodies = [
        codec.encode(
            {
                "top_k": top_k,
                "sequences": [
                    {
                        "prompt_ids": j.prompt_ids.astype(np.int32),
                        "completion_ids": j.completion_ids.astype(np.int32),
                    }
                    for j in chunk
                ],
            }
        )
        for chunk in chunks
    ]
    queue = list(range(len(bodies)))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:

        async def worker() -> None:
            while queue:
                r = await client.post(url + "/v1/score", content=bodies[queue.pop()], headers=headers)
                r.raise_for_status()
                codec.decode(r.content)  # the client's decoding is part of the cost

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0


def inprocess_round(backend: HFBackend, jobs: list[ScoreJob], budget: int) -> float:
    import torch

    t0 = time.perf_counter()
    for batch in plan_batches([j.num_tokens for j in jobs], budget):
        backend.score_batch([jobs[i] for i in batch])
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bytes_per_position(url: str, jobs: list[ScoreJob], k: int) -> dict[str, float]:
    seqs = [
        {"prompt_ids": j.prompt_ids.tolist(), "completion_ids": j.completion_ids.tolist()} for j in jobs[:2]
    ]
    positions = sum(len(j.completion_ids) for j in jobs[:2])
    out = {}
    for fmt in (codec.MSGPACK, codec.JSON):
        r = httpx.post(
            url + "/v1/score",
            content=codec.encode({"sequences": seqs, "top_k": k}, fmt),
            headers={"Content-Type": fmt, "Accept": fmt},
            timeout=600,
        )
        r.raise_for_status()
        out["msgpack" if fmt == codec.MSGPACK else "json"] = len(r.content) / positions
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--shape", default=None, help="qwen3-1.7b | qwen3-8b (random weights, config only)")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--json-out", default=None)
    for key, val in PRESETS["cpu"].items():
        p.add_argument("--" + key.replace("_", "-"), type=type(val), default=None)
    args = p.parse_args()
    for key, val in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, val)

    root = Path(tempfile.mkdtemp(prefix="bench-score-"))
    model_dir, extra = make_model(args, root)
    max_len = args.prompt_len + args.completion_len
    server_args = [
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-model-len",
        str(max(max_len, 16)),
        "--max-top-k",
        "64",
        *extra,
    ]
    config = ServerConfig(
        model=str(model_dir),
        device=args.device,
        dtype=args.dtype,
        max_top_k=64,
        max_batch_tokens=args.max_batch_tokens,
        load_format="dummy" if extra else "auto",
    )
    backend = HFBackend(config)
    backend._load_sync()
    jobs = make_jobs(args, min(len(backend.tokenizer), backend.model_vocab_size))
    tokens = sum(j.num_tokens for j in jobs)
    params = sum(p.numel() for p in backend.model.parameters())
    print(
        f"model: {args.shape or 'cpu-25M'} ({params / 1e6:.1f}M params), {args.device} {args.dtype}; "
        f"{args.sequences} seqs x {max_len} tokens = {tokens} tokens/round, k={args.top_k}, "
        f"{args.clients} clients x {args.per_request} seqs/request",
        flush=True,
    )

    with TeacherProcess(model_dir, *server_args, ready_timeout=900) as server:
        asyncio.run(
            service_round(server.url, jobs[: args.per_request], 1, args.per_request, args.top_k)
        )  # warm-up
        inprocess_round(backend, jobs[: args.per_request], args.max_batch_tokens)
        svc, inp = [], []
        for r in range(args.rounds):
            svc.append(
                asyncio.run(service_round(server.url, jobs, args.clients, args.per_request, args.top_k))
            )
            inp.append(inprocess_round(backend, jobs, args.max_batch_tokens))
            print(
                f"round {r}: service {tokens / svc[-1]:,.0f} tok/s | in-process {tokens / inp[-1]:,.0f} tok/s",
                flush=True,
            )
        sizes = {k: bytes_per_position(server.url, jobs, k) for k in (16, 64)}
        metrics = httpx.get(server.url + "/metrics").text
    server_peak = next(
        (
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("teacher_gpu_peak_bytes")
        ),
        0.0,
    )
    svc_tps, inp_tps = tokens / np.median(svc), tokens / np.median(inp)
    result = {
        "model": args.shape or "cpu-25M",
        "params_M": round(params / 1e6, 1),
        "device": args.device,
        "tokens_per_round": tokens,
        "service_tok_s": round(svc_tps),
        "inprocess_tok_s": round(inp_tps),
        "ratio": round(svc_tps / inp_tps, 3),
        "bytes_per_position": {str(k): {f: round(v, 1) for f, v in d.items()} for k, d in sizes.items()},
    }
    if args.device == "cuda":
        import torch

        result["inprocess_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["service_peak_gib"] = round(server_peak / 2**30, 2)
    print(
        f"\nservice / in-process throughput (median of {args.rounds}): "
        f"{svc_tps:,.0f} / {inp_tps:,.0f} tok/s = {svc_tps / inp_tps:.3f}"
    )
    for k, d in sizes.items():
        print(
            f"bytes per scored position at k={k}: msgpack {d['msgpack']:.1f}, JSON {d['json']:.1f} "
            f"({d['json'] / d['msgpack']:.1f}x)"
        )
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
