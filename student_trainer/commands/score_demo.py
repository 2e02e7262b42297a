"""Score one rollout with a tiny teacher over HTTP: tiny local models, a real teacher-server, CPU.

Builds a tiny teacher and student (random weights, shared BPE tokenizer), starts `teacher-server`, and
scores a sample rollout over HTTP, printing a table of tokens, teacher log-probs and the teacher's top-k.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/score_demo", help="where models, logs and outputs go")
    p.add_argument("--top-k", type=int, default=3)


def print_table(tokens: list[str], logprobs, topk_tokens: list[list[str]], topk_logprobs) -> None:
    print(f"{'pos':>3}  {'token':<14} {'teacher logp':>12}   top-k (token: logp)")
    for t, (tok, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        top = "  ".join(f"{s!r}: {v:.2f}" for s, v in zip(topk_tokens[t], topk_logprobs[t], strict=True))
        print(f"{t:>3}  {tok!r:<14} {lp:>12.3f}   {top}")


def score_sample(url: str, top_k: int) -> None:
    from shared import codec
    from shared.wire import ScoredSequence

    info = httpx.get(url + "/v1/model").json()
    print(
        f"teacher: {info['model']} ({info['backend']} backend, vocab {info['vocab_size']}, "
        f"tokenizer {info['tokenizer_fingerprint']})"
    )
    doc = {
        "sequences": [
            {
                "messages": [{"role": "user", "content": "What is 12 + 35?"}],
                "completion": " Let us add the digits. The answer is \\boxed{47}.",
            }
        ],
        "top_k": top_k,
        "return_tokens": True,
        "return_entropy": True,
    }
    r = httpx.post(
        url + "/v1/score",
        content=codec.encode(doc),
        headers={"Content-Type": codec.MSGPACK, "Accept": codec.MSGPACK},
        timeout=60,
    )
    r.raise_for_status()
    body = codec.decode(r.content)
    res = ScoredSequence.from_wire(body["results"][0])
    tok = _tokenizer(info)
    topk_tokens = [[tok.decode([int(i)]) for i in row] for row in res.topk_ids]
    print_table(res.tokens, res.logprobs, topk_tokens, res.topk_logprobs)
    print(
        f"usage: {body['usage']}; mean teacher entropy {res.entropy.mean():.2f} nats; "
        f"response {len(r.content)} bytes (msgpack)"
    )


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(info: dict):
    from transformers import AutoTokenizer

    return _TOKENIZERS.setdefault(info["model"], AutoTokenizer.from_pretrained(info["model"]))


def run(args: argparse.Namespace) -> int:
    from devkit.teacher_process import TeacherProcess
    from devkit.tiny_models import build_tiny_pair

    work = Path(args.workdir)
    teacher, _student = build_tiny_pair(work / "models")
    print(f"built tiny models in {work / 'models'}; starting teacher-server ...")
    with TeacherProcess(teacher, log_path=work / "teacher.log") as server:
        print(f"teacher-server ready at {server.url} (log: {server.log_path})")
        score_sample(server.url, args.top_k)
    return 0
