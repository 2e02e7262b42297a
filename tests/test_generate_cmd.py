"""`student-trainer generate`: teacher rollouts over real HTTP from the session's tiny `teacher-server`.

Checked against independent paths: the same samples come back from a direct /v1/generate call with the
per-prompt seed; each sample's cumulative log-prob equals the sum of the teacher's /v1/score log-probs of
its tokens after the prompt that `sft` will train on (so the prompt the server rendered is the one SFT
sees); `filter` and `sft.load_examples` read the file as written. Resuming (after a torn write) gives the
same file content as an uninterrupted run. One test uses a stub server instead of the real one, because
only a stub with a fixed delay shows how many requests are in flight (it says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from shared import codec
from shared.fingerprint import tokenizer_fingerprint
from student_trainer.data.prompts import load_prompts
from student_trainer.recipe.generate import (
    GenerateError,
    GenerateSettings,
    generate_to_file,
    load_existing,
)
from student_trainer.recipe.sft import SFTConfig, load_examples
from student_trainer.teacher.client import SyncTeacherClient

PLAIN = "Question: {question}\nAnswer:"
QUESTIONS = [f"What is {a} + {b}?" for a, b in ((3, 4), (12, 7), (25, 30), (8, 8), (1, 99), (40, 2))]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "prompts.jsonl"
    with path.open("w") as f:
        for i, q in enumerate(QUESTIONS):
            f.write(json.dumps({"id": f"q{i}", "question": q, "answer": str(eval(q[8:-1]))}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair[0])


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "student_trainer", "generate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _score_sums(url: str, prompts_ids: list[list[int]], completions: list[list[int]]) -> np.ndarray:
    with SyncTeacherClient(url) as client:
        scored = client.score(
            [{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompts_ids, completions, strict=True)],
            top_k=0,
        )
    return np.array([s.logprobs.astype(np.float64).sum() for s in scored])


def test_generate_command_output_feeds_filter_and_sft(tiny_pair, hf_teacher, prompts, tokenizer, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    proc = _cli(
        *("--teacher-url", hf_teacher.url, "--data", str(prompts), "--out", str(out), "--n", "2"),
        *("--max-tokens", "12", "--id-field", "id", "--answer-field", "answer", "--concurrency", "3"),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prompts: 6 total, 0 already done, 6 generated now | samples written 12" in proc.stdout
    records = _read(out)
    assert sorted((r["prompt_id"], r["sample_index"]) for r in records) == [
        (f"q{i}", j) for i in range(6) for j in range(2)
    ]
    by_id = {r["prompt_id"]: r for r in records}
    for r in records:
        i = int(r["prompt_id"][1:])
        assert r["question"] == QUESTIONS[i] and r["answer"] == str(eval(QUESTIONS[i][8:-1]))
        assert r["messages"] == [{"role": "user", "content": QUESTIONS[i]}]
        assert 1 <= r["num_tokens"] == len(r["completion_ids"]) <= 12
        assert r["completion"] == tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
        ends_with_eos = r["completion_ids"][-1] == tokenizer.eos_token_id
        assert r["finish_reason"] == ("stop" if ends_with_eos else "length")
        assert r["sample_seed"] == i  # base seed 0 + row
        t = r["teacher"]
        assert t["model"] == str(tiny_pair[0]) and t["backend"] == "hf" and t["urls"] == [hf_teacher.url]
        assert t["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer) and t["prompt_form"] == "chat"
        assert t["sampling"] == {
            "n": 2,
            "temperature": 0.7,
            "top_p": 1.0,
            "max_tokens": 12,
            "seed": 0,
            "stop": [],
        }

    # the same samples from a direct call with the per-prompt seed, whatever the concurrency was
    with SyncTeacherClient(hf_teacher.url) as client:
        direct = client.generate(
            [{"messages": by_id["q4"]["messages"]}], n=2, temperature=0.7, max_tokens=12, seed=4
        )
    got = sorted((r for r in records if r["prompt_id"] == "q4"), key=lambda r: r["sample_index"])
    assert [s.completion_ids.tolist() for s in direct[0]] == [r["completion_ids"] for r in got]

    # sft reads them: the student's chat rendering of the messages, the completion ids as sampled ...
    examples = load_examples(SFTConfig(model=str(tiny_pair[1]), data=str(out)), tokenizer)
    assert [c for _, c in examples] == [r["completion_ids"] for r in records]
    chat = tokenizer.apply_chat_template(records[0]["messages"], add_generation_prompt=True, tokenize=False)
    assert examples[0][0] == tokenizer(chat, add_special_tokens=False)["input_ids"]
    # ... and it is the prompt the teacher sampled from: the teacher's log-probs of the samples after it
    # add up to the cumulative log-probs /v1/generate reported
    sums = _score_sums(hf_teacher.url, [p for p, _ in examples], [c for _, c in examples])
    np.testing.assert_allclose(sums, [r["cumulative_logprob"] for r in records], rtol=1e-4, atol=1e-3)

    # filter reads finish_reason / completion_ids: exactly the length-cut samples are incomplete
    kept = tmp_path / "kept.jsonl"
    flt = subprocess.run(
        [
            sys.executable,
            "-m",
            "student_trainer",
            "filter",
            str(out),
            "--out",
            str(kept),
            "--tokenizer",
            str(tiny_pair[0]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert flt.returncode == 0, flt.stdout + flt.stderr
    removed = _read(tmp_path / "kept.removed.jsonl")
    assert len(_read(kept)) + len(removed) == 12
    cut = sum(r["finish_reason"] == "length" for r in records)
    assert sum(any(x.startswith("incomplete:") for x in r["filter_reasons"]) for r in removed) == cut


@pytest.mark.parametrize("form", ["text", "tokens"])
def test_plain_template_forms(tiny_pair, hf_teacher, prompts, tokenizer, tmp_path, form):
    """Text form (the server tokenizes) and token form (rendered here, ids sent): sft trains on the prompt the
    teacher sampled from (checked through the teacher's own log-probs)."""
    out = tmp_path / f"{form}.jsonl"
    settings = GenerateSettings(n=1, max_tokens=10, template=PLAIN, concurrency=2)
    table = load_prompts(prompts, id_field="id")
    summary = generate_to_file(
        hf_teacher.url,
        table,
        settings,
        out,
        tokenizer=tokenizer if form == "tokens" else None,
        progress=False,
    )
    assert summary.prompts_done == 6 and summary.samples_written == 6
    records = _read(out)
    rendered = [
        tokenizer(PLAIN.replace("{question}", r["question"]), add_special_tokens=False)["input_ids"]
        for r in records
    ]
    if form == "tokens":
        assert [r["prompt_ids"] for r in records] == rendered and "prompt" not in records[0]
    else:
        assert [r["prompt"] for r in records] == [PLAIN.replace("{question}", r["question"]) for r in records]
    cfg = SFTConfig(model=str(tiny_pair[1]), data=str(out), student_template=PLAIN)
    examples = load_examples(cfg, tokenizer)
    assert [p for p, _ in examples] == rendered
    sums = _score_sums(hf_teacher.url, rendered, [r["completion_ids"] for r in records])
    np.testing.assert_allclose(sums, [r["cumulative_logprob"] for r in records], rtol=1e-4, atol=1e-3)


def test_resume_after_a_torn_write_matches_an_uninterrupted_run(hf_teacher, prompts, tmp_path):
    table = load_prompts(prompts, id_field="id")
    settings = GenerateSettings(n=2, max_tokens=8, concurrency=3)
    whole = tmp_path / "whole.jsonl"
    generate_to_file(hf_teacher.url, table, settings, whole, progress=False)

    out = tmp_path / "resumed.jsonl"
    first = generate_to_file(hf_teacher.url, table, settings, out, rows=range(3), progress=False)
    assert first.prompts_done == 3
    before = out.read_text()
    with out.open("a") as f:  # an interrupted run: one complete line of a group, then a torn line
        f.write(json.dumps({"prompt_id": "q5", "sample_index": 0}) + "\n" + '{"prompt_id": "q4", "samp')
    second = generate_to_file(hf_teacher.url, table, settings, out, progress=False)
    assert (second.prompts_skipped, second.prompts_done, second.repaired_lines) == (3, 3, 2)
    assert out.read_text().startswith(before)  # the complete groups were kept as they were

    def key(r):
        return (r["prompt_id"], r["sample_index"])

    resumed, reference = sorted(_read(out), key=key), sorted(_read(whole), key=key)
    assert [(key(r), r["completion_ids"]) for r in resumed] == [
        (key(r), r["completion_ids"]) for r in reference
    ]
    again = generate_to_file(hf_teacher.url, table, settings, out, progress=False)
    assert (again.prompts_skipped, again.prompts_done) == (6, 0)

    # other settings are refused, naming the setting
    proc = _cli(
        "--teacher-url",
        hf_teacher.url,
        "--data",
        str(prompts),
        "--out",
        str(out),
        "--id-field",
        "id",
        "--n",
        "2",
        "--max-tokens",
        "8",
        "--temperature",
        "1.0",
        "--no-progress",
    )
    assert proc.returncode == 2
    assert "holds samples generated with temperature=0.7, this run has temperature=1.0" in proc.stdout


def test_load_existing_repairs_only_the_tail(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [
        {"prompt_id": "a", "sample_index": 0},
        {"prompt_id": "a", "sample_index": 1},
        {"prompt_id": "b", "sample_index": 1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = load_existing(path, n=2)
    assert state.done == {"a"} and state.dropped_lines == 1 and len(path.read_text().splitlines()) == 2
    path.write_text('{"prompt_id": "a", "sample_index": 0}\n{broken\n{"prompt_id": "a", "sample_index": 1}\n')
    with pytest.raises(GenerateError, match=r"r.jsonl:2: not a generate record"):
        load_existing(path, n=2)
    assert load_existing(tmp_path / "missing.jsonl", n=1).done == set()
    # ids with quotes, backslashes and unicode (read from the line's prefix without parsing the rest)
    ids = ['say "hi"', "back\\slash", "überprüfung"]
    rows = [{"prompt_id": i, "sample_index": 0, "completion": "x" * 1000, "teacher": {"t": 1}} for i in ids]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n")
    state = load_existing(path, n=1)
    assert state.done == set(ids) and state.meta == {"t": 1} and state.dropped_lines == 0
    assert path.read_text().count("\n") == 3  # the blank line went with the rewrite


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n=0 is invalid: must be >= 1"),
        ({"temperature": -1.0}, "temperature=-1.0 is invalid: must be >= 0"),
        ({"concurrency": 0}, "concurrency=0 is invalid"),
        ({"template": "Question:"}, "template='Question:' has no {question} placeholder"),
    ],
)
def test_settings_errors(kwargs, message):
    with pytest.raises(GenerateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        GenerateSettings(**kwargs)


def test_cli_errors(prompts, tmp_path):
    proc = _cli(
        "--teacher-url",
        "http://127.0.0.1:9",
        "--data",
        str(prompts),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--template",
        "Q:",
        timeout=120,
    )
    assert proc.returncode == 2 and "template='Q:' has no {question} placeholder" in proc.stdout
    proc = _cli(
        "--teacher-url",
        "http://127.0.0.1:9",
        "--data",
        str(tmp_path / "none.jsonl"),
        "--out",
        "o.jsonl",
        timeout=120,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stdout


# ------------------------------------------------------------------------------------------- concurrency


class _SlowTeacher(BaseHTTPRequestHandler):
    """A stub (not the real server, whose hf backend generates one request at a time): answers /v1/generate
    after DELAY seconds and records how many requests were in flight at once."""

    DELAY = 0.3
    lock = threading.Lock()
    inflight = 0
    peak = 0

    def log_message(self, *args) -> None:
        pass

    def _send(self, doc) -> None:
        body = codec.encode(doc, codec.MSGPACK)
        self.send_response(200)
        self.send_header("content-type", codec.MSGPACK)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        caps = {"candidate_ids": True, "entropy": True, "temperature": True, "generate": True}
        self._send(
            {
                "model": "stub",
                "backend": "stub",
                "max_model_len": 64,
                "max_top_k": 16,
                "vocab_size": 100,
                "model_vocab_size": 100,
                "tokenizer_fingerprint": "sha256:stub",
                "chat_template": True,
                "eos_token_ids": [2],
                "capabilities": caps,
                "limits": {},
            }
        )

    def do_POST(self) -> None:
        req = codec.decode(self.rfile.read(int(self.headers["content-length"])), codec.MSGPACK)
        cls = type(self)
        with cls.lock:
            cls.inflight += 1
            cls.peak = max(cls.peak, cls.inflight)
        time.sleep(self.DELAY)
        with cls.lock:
            cls.inflight -= 1
        sample = {
            "completion_ids": np.array([5, 2], np.int32),
            "text": "x",
            "finish_reason": "stop",
            "cumulative_logprob": -1.0,
        }
        self._send(
            {
                "model": "stub",
                "results": [{"prompt_tokens": 3, "samples": [sample] * req["n"]} for _ in req["prompts"]],
                "usage": {},
            }
        )


def test_requests_are_in_flight_concurrently(prompts, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowTeacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        table = load_prompts(prompts, id_field="id")
        t0 = time.perf_counter()
        summary = generate_to_file(
            url, table, GenerateSettings(max_tokens=8, concurrency=3), tmp_path / "o.jsonl", progress=False
        )
        elapsed = time.perf_counter() - t0
    finally:
        server.shutdown()
    assert summary.prompts_done == 6 and _SlowTeacher.peak == 3
    assert elapsed < 6 * _SlowTeacher.DELAY  # 2 rounds of 3, not 6 one after another
