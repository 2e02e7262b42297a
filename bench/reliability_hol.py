"""Head-of-line and slow clients on a real ``teacher-server``: do a few legal but large requests, and
clients that trickle their bodies, push the other clients' latency past a bound?

Two phases on one server, side by side in one run:

1. *alone*: ``--small`` clients send small msgpack ``/v1/score`` requests (1 sequence, 32 + 16 tokens)
   for ``--seconds``; a prober times ``GET /health`` every 50 ms.
2. *with*: the same, plus ``--big`` clients sending the largest request the server admits by default
   (``--big-sequences`` sequences of 256 tokens, ~4 MB JSON bodies of text-free ids), plus ``--slow``
   clients that send headers and then one byte of body per second (a slow-loris).

Prints, per phase, the small clients' p50/p99, the big requests' latency, the slow clients' outcomes
(the status they got, or still open), and the worst ``/health`` answer time (the event loop's stall).

    python bench/reliability_hol.py --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit.teacher_process import TeacherProcess  # noqa: E402
from devkit.tiny_models import build_tiny_pair  # noqa: E402
from shared import codec  # noqa: E402

MSGPACK = {"content-type": codec.MSGPACK, "accept": codec.MSGPACK}


def small_body(rng: np.random.Generator, vocab: int) -> bytes:
    seq = {
        "prompt_ids": rng.integers(0, vocab, 32).astype(np.int32),
        "completion_ids": rng.integers(0, vocab, 16).astype(np.int32),
    }
    return codec.encode({"sequences": [seq], "top_k": 16}, codec.MSGPACK)


def big_body(rng: np.random.Generator, vocab: int, sequences: int) -> bytes:
    """JSON (the expensive body to decode), ``sequences`` x (64 prompt + 192 completion) ids."""
    seqs = [
        {
            "prompt_ids": rng.integers(0, vocab, 64).tolist(),
            "completion_ids": rng.integers(0, vocab, 192).tolist(),
        }
        for _ in range(sequences)
    ]
    return json.dumps({"sequences": seqs, "top_k": 16}).encode()


async def small_loop(url: str, vocab: int, until: float, seed: int, lat: list[float]) -> None:
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300.0) as c:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            r = await c.post("/v1/score", content=small_body(rng, vocab), headers=MSGPACK)
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)
            else:
                await asyncio.sleep(0.2)


async def big_loop(url: str, vocab: int, sequences: int, until: float, seed: int, out: list) -> None:
    rng = np.random.default_rng(1000 + seed)
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as c:
        while time.monotonic() < until:
            body = big_body(rng, vocab, sequences)
            t0 = time.perf_counter()
            r = await c.post("/v1/score", content=body, headers={"content-type": "application/json"})
            out.append((r.status_code, time.perf_counter() - t0, len(body)))


async def slow_client(host: str, port: int, until: float, out: list) -> None:
    """Headers for a 64 KiB body, then one byte a second until the server answers or the phase ends."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {64 * 1024}\r\n\r\n{{"
    )
    writer.write(head.encode())
    await writer.drain()
    status = "open at the end"
    t0 = time.monotonic()
    try:
        while time.monotonic() < until:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=1.0)
                status = line.decode(errors="replace").strip() or "closed by the server"
                break
            except asyncio.TimeoutError:
                writer.write(b" ")
                await writer.drain()
    except (ConnectionError, OSError) as exc:
        status = f"closed by the server ({type(exc).__name__})"
    out.append((status, time.monotonic() - t0))
    writer.close()


async def health_probe(url: str, until: float, worst: list[float]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as c:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            await c.get("/health")
            worst.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)


async def phase(url: str, vocab: int, a: argparse.Namespace, loaded: bool) -> dict:
    until = time.monotonic() + a.seconds
    small: list[float] = []
    big: list = []
    slow: list = []
    health: list[float] = []
    host, port = url.removeprefix("http://").split(":")
    tasks = [small_loop(url, vocab, until, s, small) for s in range(a.small)]
    tasks.append(health_probe(url, until, health))
    if loaded:
        tasks += [big_loop(url, vocab, a.big_sequences, until, s, big) for s in range(a.big)]
        tasks += [slow_client(host, int(port), until, slow) for _ in range(a.slow)]
    await asyncio.gather(*tasks)
    small.sort()
    return {
        "small_n": len(small),
        "small_p50": statistics.median(small) if small else float("nan"),
        "small_p99": small[min(len(small) - 1, int(0.99 * len(small)))] if small else float("nan"),
        "big": big,
        "slow": collections.Counter(s for s, _ in slow),
        "health_max": max(health) if health else float("nan"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--small", type=int, default=4)
    p.add_argument("--big", type=int, default=2)
    p.add_argument("--big-sequences", type=int, default=256, help="sequences of 256 tokens per big request")
    p.add_argument("--slow", type=int, default=8)
    p.add_argument("--server-arg", action="append", default=[], help="extra teacher-server argument")
    a = p.parse_args()
    teacher, _ = build_tiny_pair(Path(tempfile.mkdtemp(prefix="hol-")), seed=0)
    args = ["--max-model-len", "256", "--max-top-k", "32", *a.server_arg]
    with TeacherProcess(teacher, *args, env={"OMP_NUM_THREADS": "1"}) as server:
        vocab = int(httpx.get(server.url + "/v1/model").json()["vocab_size"])
        alone = asyncio.run(phase(server.url, vocab, a, loaded=False))
        loaded = asyncio.run(phase(server.url, vocab, a, loaded=True))
    print(
        f"small clients {a.small}, big clients {a.big} x {a.big_sequences} sequences, slow clients {a.slow}"
    )
    for name, r in (("alone", alone), ("with big + slow", loaded)):
        print(
            f"{name:>16}: small p50 {r['small_p50'] * 1e3:7.0f} ms  p99 {r['small_p99'] * 1e3:7.0f} ms "
            f"({r['small_n']} requests); worst /health {r['health_max'] * 1e3:.0f} ms"
        )
    if loaded["big"]:
        statuses = collections.Counter(s for s, _, _ in loaded["big"])
        lat = statistics.median(t for _, t, _ in loaded["big"])
        mb = loaded["big"][0][2] / 1e6
        print(
            f"big requests: {len(loaded['big'])} of {mb:.1f} MB, statuses {dict(statuses)}, median {lat:.1f} s"
        )
    print(f"slow clients: {dict(loaded['slow'])}")
    print(f"ratio small p99 with/alone: {loaded['small_p99'] / alone['small_p99']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
