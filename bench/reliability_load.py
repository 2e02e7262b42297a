"""Load on a real ``teacher-server``: N clients x S seconds of msgpack ``/v1/score``, and an overload run.

Targets (docs/RELIABILITY.md): 0 errors; under overload nothing but 200 or 503 + Retry-After; the server's
resident memory flat over the run (RSS sampled every second; "flat" = the last 10 s within 10% of the
first 10 s after warm-up).

    python bench/reliability_load.py --clients 64 --seconds 60              # the load run
    python bench/reliability_load.py --clients 64 --seconds 30 --overload   # a queue of 2,048 tokens

Each client loops: a request of ``--sequences`` random sequences (prompt 32 + completion 64 ids, top-16,
student candidates 16), waits for the answer, honours Retry-After on a 503, repeats. Prints req/s,
p50/p99 latency of the 200s, every status seen, and RSS at start / end / max.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit.teacher_process import TeacherProcess  # noqa: E402
from devkit.tiny_models import build_tiny_pair  # noqa: E402
from shared import codec  # noqa: E402


def score_body(rng: np.random.Generator, vocab: int, sequences: int) -> bytes:
    seqs = [
        {
            "prompt_ids": rng.integers(0, vocab, 32).astype(np.int32),
            "completion_ids": rng.integers(0, vocab, 64).astype(np.int32),
            "candidate_ids": rng.integers(0, vocab, (64, 16)).astype(np.int32),
        }
        for _ in range(sequences)
    ]
    return codec.encode({"sequences": seqs, "top_k": 16, "return_entropy": True}, codec.MSGPACK)


async def client_loop(
    url: str, vocab: int, sequences: int, until: float, seed: int, out: dict[str, list]
) -> None:
    rng = np.random.default_rng(seed)
    headers = {"content-type": codec.MSGPACK, "accept": codec.MSGPACK}
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        while time.monotonic() < until:
            body = score_body(rng, vocab, sequences)
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/score", content=body, headers=headers)
            except httpx.HTTPError as exc:
                out["status"].append(f"transport:{type(exc).__name__}")
                continue
            dt = time.perf_counter() - t0
            status = str(r.status_code)
            if r.status_code == 503:
                retry = r.headers.get("retry-after")
                status += "+Retry-After" if retry else " without Retry-After"
                out["status"].append(status)
                await asyncio.sleep(min(float(retry or 1), 2.0) * rng.uniform(0.5, 1.0))
                continue
            out["status"].append(status)
            if r.status_code == 200:
                out["latency"].append(dt)


async def sample_rss(pid: int, until: float, out: list[tuple[float, int]]) -> None:
    proc = psutil.Process(pid)
    t0 = time.monotonic()
    while time.monotonic() < until:
        out.append((time.monotonic() - t0, proc.memory_info().rss))
        await asyncio.sleep(1.0)


async def run_load(url: str, pid: int, vocab: int, clients: int, seconds: float, sequences: int) -> dict:
    until = time.monotonic() + seconds
    out: dict[str, list] = {"status": [], "latency": []}
    rss: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    await asyncio.gather(
        sample_rss(pid, until, rss),
        *(client_loop(url, vocab, sequences, until, seed, out) for seed in range(clients)),
    )
    wall = time.perf_counter() - t0
    lat = sorted(out["latency"])
    return {
        "wall": wall,
        "statuses": collections.Counter(out["status"]),
        "ok": len(lat),
        "p50": statistics.median(lat) if lat else float("nan"),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "rss": rss,
    }


def flat(rss: list[tuple[float, int]], warmup: float = 10.0, window: float = 10.0) -> tuple[float, float]:
    """(mean RSS MiB of the first ``window`` s after ``warmup``, of the last ``window`` s)."""
    end = rss[-1][0]
    first = [r for t, r in rss if warmup <= t < warmup + window] or [rss[0][1]]
    last = [r for t, r in rss if t >= end - window] or [rss[-1][1]]
    return statistics.mean(first) / 2**20, statistics.mean(last) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sequences", type=int, default=4, help="sequences per request")
    p.add_argument("--overload", action="store_true", help="serve with --max-queue-tokens 2048")
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    a = p.parse_args()
    tiny = Path(tempfile.mkdtemp(prefix="load-"))
    teacher, _ = build_tiny_pair(tiny, seed=0)
    args = ["--backend", a.backend, "--max-model-len", "256", "--max-top-k", "32"]
    if a.overload:
        args += ["--max-queue-tokens", "2048"]
    with TeacherProcess(teacher, *args, env={"OMP_NUM_THREADS": "1"}, ready_timeout=600) as server:
        vocab = int(httpx.get(server.url + "/v1/model").json()["vocab_size"])
        res = asyncio.run(run_load(server.url, server.proc.pid, vocab, a.clients, a.seconds, a.sequences))
        alive = server.proc.poll() is None
    st = res["statuses"]
    total = sum(st.values())
    mib = [r / 2**20 for _, r in res["rss"]]
    first, last = flat(res["rss"])
    errors = sum(n for s, n in st.items() if not (s == "200" or s == "503+Retry-After"))
    print(
        f"teacher-server ({a.backend}), {a.clients} clients x {a.seconds:.0f} s, {a.sequences} seqs/request"
    )
    print(
        f"requests {total} ({total / res['wall']:.1f} req/s), 200s {res['ok']} ({res['ok'] / res['wall']:.1f}/s)"
    )
    print(f"latency of 200s: p50 {res['p50'] * 1e3:.0f} ms, p99 {res['p99'] * 1e3:.0f} ms")
    print(f"statuses: {dict(sorted(st.items()))}")
    print(f"errors (anything but 200 or 503 + Retry-After): {errors}")
    print(
        f"server RSS MiB: start {mib[0]:.0f}, end {mib[-1]:.0f}, max {max(mib):.0f}; "
        f"after warm-up {first:.0f} -> last 10 s {last:.0f} ({(last - first) / first:+.1%})"
    )
    print(f"server alive at the end: {alive}; cpu count {os.cpu_count()}")
    return 0 if errors == 0 and alive and abs(last - first) / first < 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
