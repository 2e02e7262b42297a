"""Fuzz every route of a real ``teacher-server`` from its own ``/openapi.json`` with schemathesis.

Target: 0 x 5xx for any client input. Each operation gets ``--examples`` generated requests, half positive
(schema-valid) and half negative (schema-violating) in schemathesis' terms. Most positive requests are then
*repaired* (ids folded into the vocabulary, top-k within the server's limit) so the happy path is fuzzed too,
not only the validation layer; every request with a body goes out as JSON or as msgpack (half and half, id
lists packed as int32 arrays in msgpack as the trainer sends them). Any 5xx is written to the report with
its request, to replay by hand.

Runs in its own small venv (schemathesis is not a dependency of the project, and its pytest plugin has no
business in our test suite); the server runs from the project's venv:

    python3 -m venv .venv-bench && .venv-bench/bin/pip install schemathesis msgpack numpy pydantic psutil httpx
    .venv-bench/bin/python bench/reliability_fuzz.py --backend hf --examples 2000
    .venv-bench/bin/python bench/reliability_fuzz.py --backend vllm --examples 2000

(``make bench-fuzz`` does both.) The figures go to docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit.teacher_process import TeacherProcess  # noqa: E402  (stdlib + httpx only)
from shared import codec  # noqa: E402


class ServerOf(TeacherProcess):
    """:class:`TeacherProcess` run with another interpreter (the project's venv, not this script's)."""

    def __init__(self, python: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.python = python

    def command(self) -> list[str]:
        return [self.python, *super().command()[1:]]


# A valid body per route; a repaired case is one of these with the generated case's options laid over it.
TEMPLATES: dict[str, tuple[str, dict[str, Any]]] = {
    "/v1/score": ("sequences", {"sequences": [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5, 6, 7]}]}),
    "/v1/generate": ("prompts", {"prompts": [{"prompt_ids": [1, 2, 3]}], "max_tokens": 4}),
    "/v1/completions": ("prompt", {"prompt": "1 + 1 =", "max_tokens": 4}),
    "/tokenize": ("prompt", {"prompt": "1 + 1 ="}),
    "/detokenize": ("tokens", {"tokens": [1, 2, 3]}),
    "/get_sequence_logprobs/": ("sequences", {"sequences": [[1, 2, 3, 4, 5]], "prompt_lengths": [2]}),
}


def overlay(path: str, generated: Any, rng: random.Random) -> Any:
    """The route's valid template with a random subset of the generated body's option fields laid over
    it (the structural field, e.g. ``sequences``, stays the template's); the generated body itself when the
    route has no template or the body is not an object."""
    if path not in TEMPLATES or not isinstance(generated, dict):
        return generated
    structural, template = TEMPLATES[path]
    doc = json.loads(json.dumps(template))
    for key, value in generated.items():
        if key not in (structural, "prompt_lengths", "model") and rng.random() < 0.6:
            doc[key] = value
    return doc


def repair(doc: Any, vocab: int, max_top_k: int) -> Any:
    """A generated body made mostly valid: every int in an ``*_ids`` list folded into [0, vocab), ``top_k``
    and ``candidates``-style counts into range. Leaves everything else as generated."""
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k.endswith("_ids") and isinstance(v, list):
                out[k] = [abs(i) % vocab if isinstance(i, int) and not isinstance(i, bool) else i for i in v]
            elif k == "top_k" and isinstance(v, int) and not isinstance(v, bool):
                out[k] = abs(v) % (max_top_k + 1)
            else:
                out[k] = repair(v, vocab, max_top_k)
        return out
    if isinstance(doc, list):
        return [repair(v, vocab, max_top_k) for v in doc]
    return doc


def pack_ids(doc: Any) -> Any:
    """Id lists as int32 packed arrays where they fit (the trainer's own msgpack form)."""
    if isinstance(doc, dict):
        return {k: _packed(v) if k.endswith("_ids") else pack_ids(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [pack_ids(v) for v in doc]
    return doc


def _packed(v: Any) -> Any:
    if isinstance(v, list) and v and all(type(i) is int and -(2**31) <= i < 2**31 for i in v):
        return np.asarray(v, dtype=np.int32)
    return v


class Fuzzer:
    """Sends cases and counts statuses per (operation, mode, format); keeps every 5xx."""

    def __init__(self, base: str, vocab: int, max_top_k: int, seed: int) -> None:
        self.base, self.vocab, self.max_top_k = base, vocab, max_top_k
        self.rng = random.Random(seed)
        self.client = httpx.Client(base_url=base, timeout=120.0)
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.server_errors: list[dict[str, Any]] = []
        self.transport_errors = 0

    def send(self, case: Any, mode: str) -> None:
        body = case.body
        has_body = body is not None and not type(body).__name__ == "NotSet"
        if has_body and mode == "positive" and self.rng.random() < 0.7:
            if self.rng.random() < 0.6:  # the happy path: a valid body with generated options
                body = overlay(case.path, body, self.rng)
            body = repair(body, self.vocab, self.max_top_k)
        fmt = codec.MSGPACK if has_body and self.rng.random() < 0.5 else codec.JSON
        headers = {k: str(v) for k, v in (case.headers or {}).items()}
        content = None
        if has_body:
            try:
                content = codec.encode(pack_ids(body) if fmt == codec.MSGPACK else body, fmt)
            except (ValueError, TypeError, OverflowError):  # a generated value JSON/msgpack cannot carry
                fmt, content = codec.JSON, json.dumps(body, default=str).encode()
            headers.setdefault("content-type", fmt)
            headers["accept"] = fmt
        label = f"{case.method} {case.path}"
        try:
            r = self.client.request(
                case.method, case.formatted_path, params=case.query, headers=headers, content=content
            )
        except httpx.HTTPError as exc:
            self.transport_errors += 1
            self.counts[label][f"{mode}/{_short_fmt(fmt)}/transport:{type(exc).__name__}"] += 1
            return
        self.counts[label][f"{mode}/{_short_fmt(fmt)}/{r.status_code}"] += 1
        if r.status_code >= 500 and r.status_code != 503:
            self.server_errors.append(
                {
                    "operation": label,
                    "mode": mode,
                    "format": fmt,
                    "status": r.status_code,
                    "response": r.text[:500],
                    "body": repr(body)[:2000],
                }
            )


def _short_fmt(fmt: str) -> str:
    return "msgpack" if fmt == codec.MSGPACK else "json"


def fuzz(base: str, examples: int, seed: int) -> Fuzzer:
    import schemathesis

    info = httpx.get(base + "/v1/model", timeout=10).json()
    fz = Fuzzer(base, int(info["vocab_size"]), int(info["max_top_k"]), seed)
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            run = _hypothesis_run(fz, op.as_strategy(generation_mode=mode), mode.value, examples // 2)
            t0 = time.perf_counter()
            try:
                run()
            except Exception as exc:  # no negative case exists for a route without parameters or body
                print(f"  {op.label:<40} {mode.value:<8} no cases ({type(exc).__name__})")
                continue
            n = sum(v for k, v in fz.counts[op.label].items() if k.startswith(mode.value))
            print(f"  {op.label:<40} {mode.value:<8} {n:>5} requests  {time.perf_counter() - t0:6.1f}s")
    return fz


def _hypothesis_run(fz: Fuzzer, strategy: Any, mode: str, examples: int) -> Any:
    """A hypothesis-driven function that sends ``examples`` cases drawn from ``strategy``."""
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=max(1, examples),
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        fz.send(case, mode)

    return run


def report(fz: Fuzzer, backend: str, wall: float, out: Path) -> dict[str, Any]:
    total = sum(sum(c.values()) for c in fz.counts.values())
    statuses: collections.Counter = collections.Counter()
    for c in fz.counts.values():
        for key, n in c.items():
            statuses[key.rsplit("/", 1)[-1]] += n
    doc = {
        "backend": backend,
        "requests": total,
        "wall_s": round(wall, 1),
        "statuses": dict(sorted(statuses.items())),
        "server_errors_5xx": len(fz.server_errors),
        "transport_errors": fz.transport_errors,
        "per_operation": {k: dict(sorted(v.items())) for k, v in sorted(fz.counts.items())},
        "first_5xx": fz.server_errors[:20],
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"\n{backend}: {total} requests in {wall:.0f}s; statuses {dict(sorted(statuses.items()))}")
    print(f"5xx (other than 503): {len(fz.server_errors)}; transport errors: {fz.transport_errors}")
    print(f"report: {out}")
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--examples", type=int, default=2000, help="requests per operation (positive + negative)")
    p.add_argument("--server-python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--url", default=None, help="fuzz a running server instead of starting one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report (default docs/bench_results/fuzz_<backend>.json)")
    a = p.parse_args()
    out = Path(a.out or ROOT / "docs" / "bench_results" / f"fuzz_{a.backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.url:
        fz = fuzz(a.url.rstrip("/"), a.examples, a.seed)
        report(fz, a.backend, time.perf_counter() - t0, out)
        return 1 if fz.server_errors else 0
    tiny = Path(tempfile.mkdtemp(prefix="fuzz-"))
    subprocess.run([a.server_python, "-m", "student_trainer", "tiny", str(tiny)], check=True, cwd=ROOT)
    args = ["--backend", a.backend, "--max-model-len", "256", "--max-top-k", "32"]
    env = {"OMP_NUM_THREADS": "1"}
    with ServerOf(a.server_python, tiny / "teacher", *args, env=env, ready_timeout=600) as server:
        print(f"{a.backend} teacher-server on {server.url} (log {server.log_path})")
        fz = fuzz(server.url, a.examples, a.seed)
        alive = server.proc is not None and server.proc.poll() is None
    report(fz, a.backend, time.perf_counter() - t0, out)
    print(f"server still alive at the end: {alive}")
    return 1 if fz.server_errors or not alive else 0


if __name__ == "__main__":
    raise SystemExit(main())
