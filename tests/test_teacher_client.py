"""Teacher client against real ``teacher-server`` subprocesses (tiny models, real HTTP, msgpack both ways).

Servers: ``hf_teacher`` (conftest, session) and, for this module, ``B`` (same tiny teacher: load sharing, kill
and restart) and ``C`` (a teacher whose tokenizer has another vocabulary, with an API key, a tiny admission
queue and a long batching window, so that concurrent requests really get 503 + Retry-After). Scores are
checked against a plain transformers forward + fp32 log_softmax in this process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from devkit.teacher_process import TeacherProcess, free_port
from devkit.tiny_models import TEACHER_SPEC, build_tokenizer, save_tiny
from shared.fingerprint import tokenizer_fingerprint
from student_trainer.teacher.client import SequenceInput, SyncTeacherClient, TeacherClient
from student_trainer.teacher.compat import check_compatibility
from student_trainer.teacher.errors import (
    TeacherIncompatible,
    TeacherInputError,
    TeacherRequestError,
    TeacherServerError,
    TeacherUnavailable,
)
from student_trainer.teacher.pool import RetryPolicy, backoff_delay, parse_retry_after, split_contiguous

API_KEY = "test-secret"
FAST = RetryPolicy(max_wait_s=60.0, base_delay_s=0.02, max_delay_s=0.2)


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A tiny teacher whose tokenizer has 900 entries instead of 1024: a different fingerprint."""
    return save_tiny(
        tmp_path_factory.mktemp("other") / "teacher", TEACHER_SPEC, seed=7, tokenizer=build_tokenizer(900)
    )


@pytest.fixture(scope="module")
def servers(tiny_pair, hf_teacher, other_teacher):
    b = TeacherProcess(tiny_pair[0], "--max-model-len", "256")
    c = TeacherProcess(
        other_teacher,
        *("--api-key", API_KEY, "--max-queue-tokens", "250", "--batch-window-ms", "300"),
    )
    try:
        with ThreadPoolExecutor(2) as pool:  # the two starts overlap
            list(pool.map(lambda p: p.start(), (b, c)))
        yield SimpleNamespace(a=hf_teacher, b=b, c=c)
    finally:
        b.stop()
        c.stop()


@pytest.fixture(scope="module")
def ref(tiny_pair):
    """The tiny teacher loaded in this process: the independent reference for every score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()
    return SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_pair[0]))


@torch.inference_mode()
def reference_logprobs(model, prompt_ids, completion_ids, temperature: float = 1.0) -> torch.Tensor:
    """(T, V) fp32 log-probs of the positions predicting each completion token (no batching, no padding)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(input_ids=ids).logits[0].float() / temperature
    p = len(prompt_ids)
    return torch.log_softmax(logits[p - 1 : p - 1 + len(completion_ids)], dim=-1)


def assert_matches_reference(res, lp_T_V: torch.Tensor, completion_ids, top_k, cand=None, atol=2e-5):
    comp = torch.as_tensor(np.asarray(completion_ids), dtype=torch.long)
    np.testing.assert_array_equal(res.completion_ids, np.asarray(completion_ids))
    np.testing.assert_allclose(res.logprobs, lp_T_V.gather(1, comp[:, None])[:, 0].numpy(), atol=atol)
    ref_top = lp_T_V.topk(top_k, dim=-1).values.numpy()
    np.testing.assert_allclose(res.topk_logprobs, ref_top, atol=atol)
    # ties could order ids differently: check that the returned ids carry the returned log-probs
    got_at_ids = lp_T_V.gather(1, torch.tensor(res.topk_ids, dtype=torch.long)).numpy()
    np.testing.assert_allclose(got_at_ids, res.topk_logprobs, atol=atol)
    if cand is not None:
        want = lp_T_V.gather(1, torch.as_tensor(cand, dtype=torch.long)).numpy()
        np.testing.assert_allclose(res.candidate_logprobs, want, atol=atol)
    if res.entropy is not None:
        ent = -(lp_T_V.exp() * lp_T_V).sum(-1).numpy()
        np.testing.assert_allclose(res.entropy, ent, atol=atol)


def random_sequences(seed: int, n: int, prompt_len=(1, 20), completion_len=(1, 30), vocab=1024):
    rng = np.random.default_rng(seed)
    return [
        SequenceInput(
            prompt_ids=rng.integers(3, vocab, rng.integers(*prompt_len, endpoint=True)),
            completion_ids=rng.integers(3, vocab, rng.integers(*completion_len, endpoint=True)),
        )
        for _ in range(n)
    ]


# ------------------------------------------------------------------------------------------ pure helpers


def test_split_contiguous_covers_in_order_within_limits():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        w = rng.integers(1, 50, n).tolist()
        parts, max_items = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        max_weight = int(rng.integers(20, 200))
        ranges = split_contiguous(w, parts, max_items, max_weight)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
        for a, b in ranges:
            assert b - a <= max_items
            assert sum(w[a:b]) <= max_weight or b - a == 1  # an oversized item travels alone
        assert len(ranges) >= min(parts, n)
    assert split_contiguous([], 3, 4) == []
    # equal weights split evenly over the endpoints
    assert split_contiguous([1] * 8, 2, 64) == [(0, 4), (4, 8)]


def test_backoff_full_jitter_and_retry_after_parsing():
    assert backoff_delay(0, 0.5, 8.0, 0.9) == 0.0
    assert backoff_delay(1, 0.5, 8.0, 0.999) == pytest.approx(0.4995)
    assert backoff_delay(3, 0.5, 8.0, 0.5) == pytest.approx(1.0)  # 0.5 * 2**2 * 0.5
    assert backoff_delay(50, 0.5, 8.0, 0.999) == pytest.approx(7.992)  # capped
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now_epoch=1445412470.0) == pytest.approx(10.0)


def test_bad_client_arguments_are_refused_before_sending():
    with pytest.raises(TeacherInputError, match="urls"):
        TeacherClient([])
    with pytest.raises(TeacherInputError, match="ftp://x"):
        TeacherClient(["ftp://x"])
    with pytest.raises(TeacherInputError, match="twice"):
        TeacherClient(["http://a:1", "http://a:1/"])
    with pytest.raises(TeacherInputError, match="max_wait_s"):
        RetryPolicy(max_wait_s=-1)

    async def main():
        async with TeacherClient("http://127.0.0.1:9") as client:
            seq = SequenceInput(prompt_ids=[1, 2], completion_ids=[3, 4, 5])
            with pytest.raises(TeacherInputError, match=r"sequences\[0\]\.candidate_ids.*\(3, K\)"):
                await client.score([seq], candidate_ids=[np.zeros((2, 4), np.int32)])
            with pytest.raises(TeacherInputError, match=r"sequences\[1\].*exactly one"):
                await client.score([seq, {"completion_ids": [1]}])
            with pytest.raises(TeacherInputError, match="temperature"):
                await client.score([seq], temperature=float("nan"))
            with pytest.raises(TeacherInputError, match=r"sequences\[0\]\.completion_ids"):
                await client.score([SequenceInput(prompt_ids=[1], completion_ids=[0.5, 1.5])])
            assert await client.score([]) == []
            assert client.take_stats().requests == 0

    asyncio.run(main())


class _BrokenTeacher(BaseHTTPRequestHandler):
    """500 with the teacher's JSON error body on /v1/score; 502 with an HTML page (a proxy) elsewhere."""

    hits: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.hits.append(self.path)
        if self.path == "/v1/score":
            err = {"type": "internal", "message": "CUDA error: device-side assert", "field": None}
            body, status, ctype = json.dumps({"error": err}).encode(), 500, "application/json"
        else:
            body, status, ctype = b"<html>502 Bad Gateway</html>", 502, "text/html"
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_server_errors_500_end_the_call_502_is_retried():
    """A stdlib HTTP server stands in for a broken teacher: the real one answers 500 only on its own bugs,
    so it cannot be made to on purpose. 500 is retried max_internal_errors times, 502 until the budget."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BrokenTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    policy = RetryPolicy(max_wait_s=0.5, base_delay_s=0.01, max_delay_s=0.05, max_internal_errors=3)

    async def main():
        async with TeacherClient(url, retry=policy) as client:
            with pytest.raises(TeacherServerError) as internal:
                await client.score([SequenceInput(prompt_ids=[1], completion_ids=[2])])
            with pytest.raises(TeacherUnavailable) as gateway:
                await client.generate([[1, 2]])
        return internal.value, gateway.value

    try:
        internal, gateway = asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()
    assert internal.attempts == 3 and url in str(internal) and "device-side assert" in str(internal)
    assert _BrokenTeacher.hits.count("/v1/score") == 3
    assert gateway.attempts == _BrokenTeacher.hits.count("/v1/generate") > 3
    assert "HTTP 502" in str(gateway) and "Bad Gateway" in str(gateway) and url in str(gateway)


# ---------------------------------------------------------------------------------------- real servers


def test_scores_equal_in_process_forward(servers, ref):
    seqs = random_sequences(1, 7)
    rng = np.random.default_rng(2)
    cands = [rng.integers(0, 1024, (len(s.completion_ids), 5)) for s in seqs]
    messages = [{"role": "user", "content": "What is 12 + 30? Think step by step."}]
    chat = SequenceInput(messages=messages, completion_ids=[40, 41, 42, 2])

    async def main():
        async with TeacherClient(servers.a.url, retry=FAST) as client:
            scored = await client.score(
                seqs + [chat], top_k=8, return_entropy=True, candidate_ids=cands + [None]
            )
            hot = await client.score(seqs[:2], top_k=3, temperature=0.7)
            return scored, hot, client.take_stats()

    scored, hot, stats = asyncio.run(main())
    for s, c, res in zip(seqs, cands, scored, strict=False):
        lp = reference_logprobs(ref.model, s.prompt_ids, s.completion_ids)
        assert_matches_reference(res, lp, s.completion_ids, 8, c)
    # chat form: the server renders the TEACHER's template with add_generation_prompt
    text = ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = ref.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert scored[-1].prompt_tokens == len(prompt) and scored[-1].candidate_logprobs is None
    assert_matches_reference(
        scored[-1], reference_logprobs(ref.model, prompt, chat.completion_ids), [40, 41, 42, 2], 8
    )
    for s, res in zip(seqs, hot, strict=False):
        lp = reference_logprobs(ref.model, s.prompt_ids, s.completion_ids, temperature=0.7)
        assert_matches_reference(res, lp, s.completion_ids, 3)
        assert res.entropy is None
    assert stats.requests == 2 and stats.retries == 0 and stats.bytes_sent > 0


def test_two_endpoints_share_load_and_keep_order(servers, ref):
    seqs = random_sequences(3, 40)

    async def main():
        urls = [servers.a.url, servers.b.url]
        async with TeacherClient(urls, retry=FAST, max_sequences_per_request=5) as client:
            infos = await client.model_info()
            client.take_stats()  # count the scoring requests only
            results = await client.score(seqs, top_k=16)
            return infos, results, client.take_stats()

    infos, results, stats = asyncio.run(main())
    assert len({i.tokenizer_fingerprint for i in infos.values()}) == 1
    assert len(results) == 40
    chunks = split_contiguous([len(s.prompt_ids) + len(s.completion_ids) for s in seqs], 2, 5)
    for s, res in zip(seqs, results, strict=True):
        assert_matches_reference(
            res, reference_logprobs(ref.model, s.prompt_ids, s.completion_ids), s.completion_ids, 16
        )
    assert stats.requests == len(chunks) >= 8  # 40 sequences in chunks of at most 5, each sent once
    assert stats.requests_per_url[servers.a.url] >= 2 and stats.requests_per_url[servers.b.url] >= 2
    positions = sum(len(s.completion_ids) for s in seqs)
    assert stats.bytes_received / positions < 150  # msgpack packed arrays: ~136 bytes per position at k=16
    assert len(stats.latencies_s) == len(chunks)


def test_model_info_and_compatibility(servers, tiny_pair):
    from transformers import AutoTokenizer

    student_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_pair[1]))

    async def main():
        async with TeacherClient([servers.a.url, servers.c.url], api_key=API_KEY, retry=FAST) as client:
            with pytest.raises(TeacherIncompatible) as mixed:
                await client.model_info()
        async with TeacherClient(servers.a.url, retry=FAST) as client:
            good = await client.model_info()
        async with TeacherClient(servers.c.url, api_key=API_KEY, retry=FAST) as client:
            other = await client.model_info()
        return mixed.value, good, other

    mixed, good, other = asyncio.run(main())
    assert servers.a.url in str(mixed) and servers.c.url in str(mixed)
    assert good[servers.a.url].tokenizer_fingerprint == student_fp
    assert check_compatibility(good, student_fp, needs_candidate_ids=True, needs_entropy=True, top_k=16) == []
    with pytest.raises(TeacherIncompatible, match=f"{servers.c.url}.*tokenizer"):
        check_compatibility(other, student_fp)
    warnings = check_compatibility(other, student_fp, allow_mismatch=True)
    assert len(warnings) == 1 and servers.c.url in warnings[0]
    info = good[servers.a.url]
    no_cands = info.model_copy(
        update={"capabilities": info.capabilities.model_copy(update={"candidate_ids": False})}
    )
    with pytest.raises(TeacherIncompatible, match="candidate ids"):
        check_compatibility({servers.a.url: no_cands}, student_fp, needs_candidate_ids=True)
    check_compatibility({servers.a.url: no_cands}, student_fp, needs_candidate_ids=False)  # loss needs no ids
    with pytest.raises(TeacherIncompatible, match="--max-top-k 100"):
        check_compatibility(good, student_fp, top_k=100)


def test_client_errors_are_typed_and_not_retried(servers):
    seq = SequenceInput(prompt_ids=[5, 6], completion_ids=[7, 5000, 9])

    async def main():
        async with TeacherClient(servers.a.url, retry=FAST) as client:
            with pytest.raises(TeacherRequestError) as vocab:
                await client.score([seq])
            with pytest.raises(TeacherRequestError) as topk:
                await client.score([SequenceInput(prompt_ids=[5], completion_ids=[6])], top_k=65)
            stats = client.take_stats()
        async with TeacherClient(servers.c.url, retry=FAST) as client:  # no API key
            with pytest.raises(TeacherRequestError) as auth:
                await client.model_info()
        return vocab.value, topk.value, auth.value, stats

    vocab, topk, auth, stats = asyncio.run(main())
    assert vocab.status == 422 and vocab.field == "sequences[0].completion_ids[1]" and vocab.value == 5000
    assert "outside the vocabulary" in str(vocab) and servers.a.url in str(vocab)
    assert topk.status == 422 and topk.field == "top_k" and "max_top_k 64" in topk.message
    assert stats.retries == 0 and stats.failures == 0  # one attempt each
    assert auth.status == 401 and "API key" in auth.message and servers.c.url in str(auth)


def test_all_endpoints_dead_raises_unavailable_after_budget():
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    seqs = random_sequences(4, 3)

    async def main(policy):
        async with TeacherClient(dead, retry=policy) as client:
            t0 = time.monotonic()
            with pytest.raises(TeacherUnavailable) as exc:
                await client.score(seqs)
            return exc.value, time.monotonic() - t0

    err, elapsed = asyncio.run(main(RetryPolicy(max_wait_s=1.0, base_delay_s=0.05, max_delay_s=0.2)))
    assert 1.0 <= elapsed < 5.0
    assert dead[0] in str(err) and dead[1] in str(err) and "max_wait_s=1" in str(err)
    assert err.attempts > 2
    err, elapsed = asyncio.run(main(RetryPolicy(max_wait_s=60, max_attempts=2, base_delay_s=0.05)))
    assert err.attempts == 2 and elapsed < 5.0


def test_dead_endpoint_load_moves_to_live_one(servers, ref):
    dead = f"http://127.0.0.1:{free_port()}"
    seqs = random_sequences(5, 6)

    async def main():
        async with TeacherClient([dead, servers.a.url], retry=FAST, max_sequences_per_request=1) as client:
            return await client.score(seqs, top_k=4), client.take_stats()

    results, stats = asyncio.run(main())
    for s, res in zip(seqs, results, strict=True):
        assert_matches_reference(
            res, reference_logprobs(ref.model, s.prompt_ids, s.completion_ids), s.completion_ids, 4
        )
    assert stats.requests_per_url == {servers.a.url: 6}
    assert stats.failures >= 1 and stats.retries == stats.failures


def test_overloaded_teacher_503_retry_after_is_honoured(servers):
    """C admits 250 queued tokens and collects for 300 ms: of 4 concurrent 110-token requests, two get 503
    with Retry-After: 1. With backoff capped at 50 ms, only honouring Retry-After makes the call last >= 1 s."""
    seqs = random_sequences(6, 4, prompt_len=(50, 50), completion_len=(60, 60), vocab=900)
    policy = RetryPolicy(max_wait_s=60, base_delay_s=0.01, max_delay_s=0.05)

    async def main():
        async with TeacherClient(servers.c.url, api_key=API_KEY, retry=policy) as client:
            whole = await client.score(seqs, top_k=4)  # one request into an empty queue: admitted
        async with TeacherClient(
            servers.c.url, api_key=API_KEY, retry=policy, max_sequences_per_request=1
        ) as client:
            t0 = time.monotonic()
            flooded = await client.score(seqs, top_k=4)
            return whole, flooded, time.monotonic() - t0, client.take_stats()

    whole, flooded, elapsed, stats = asyncio.run(main())
    assert stats.status_failures.get(503, 0) >= 1, stats
    assert elapsed >= 1.0
    assert stats.requests == 4 and stats.backoff_s >= 0.9
    for a, b in zip(whole, flooded, strict=True):
        np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=2e-5)


def test_generate_greedy_follows_teacher_argmax(servers):
    prompts = [[5, 6, 7], "What is 3 + 4?", [{"role": "user", "content": "Compute 2 * 8."}]]

    async def main():
        async with TeacherClient([servers.a.url, servers.b.url], retry=FAST) as client:
            out = await client.generate(prompts, temperature=0.0, max_tokens=6)
            sampled = await client.generate(prompts[:1], n=3, temperature=1.0, max_tokens=4, seed=1)
            # greedy: every generated token is the teacher's top-1 at its position
            ids = [SequenceInput(prompt_ids=[5, 6, 7], completion_ids=out[0][0].completion_ids)]
            return out, sampled, await client.score(ids, top_k=1)

    out, sampled, scored = asyncio.run(main())
    assert [len(r) for r in out] == [1, 1, 1] and len(sampled) == 1 and len(sampled[0]) == 3
    first = out[0][0]
    assert 1 <= len(first.completion_ids) <= 6 and first.finish_reason in ("stop", "length")
    np.testing.assert_array_equal(scored[0].topk_ids[:, 0], first.completion_ids)
    assert all(len(s.completion_ids) <= 4 for s in sampled[0])


def test_sync_client_future(servers, ref):
    seqs = random_sequences(8, 3)
    with SyncTeacherClient(servers.a.url, retry=FAST) as client:
        future = client.score_future(seqs, top_k=2)
        results = future.result(timeout=60)
        assert client.take_stats().requests == 1
    for s, res in zip(seqs, results, strict=True):
        assert_matches_reference(
            res, reference_logprobs(ref.model, s.prompt_ids, s.completion_ids), s.completion_ids, 2
        )


def test_teacher_killed_mid_call_and_restarted(servers, ref, caplog):
    """Kill B (SIGKILL) after 2 of 24 chunks came back, restart it on the same port: the same call completes
    with every result once (exactly one successful request per chunk) and equal to the reference."""
    seqs = random_sequences(9, 48, prompt_len=(20, 60), completion_len=(60, 120))
    policy = RetryPolicy(max_wait_s=240, base_delay_s=0.05, max_delay_s=0.5)

    async def main():
        async with TeacherClient(
            servers.b.url, retry=policy, max_sequences_per_request=2, max_inflight_per_endpoint=1
        ) as client:
            task = asyncio.ensure_future(client.score(seqs, top_k=4))
            while client.pool.stats.requests < 2:
                assert not task.done()
                await asyncio.sleep(0.001)
            done_at_kill = client.pool.stats.requests
            servers.b.stop(kill=True)
            restart = asyncio.ensure_future(asyncio.to_thread(servers.b.start))
            try:
                results = await task
            finally:
                await restart
            return results, done_at_kill, client.take_stats()

    results, done_at_kill, stats = asyncio.run(main())
    assert done_at_kill < 24  # the kill happened mid-call
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(servers.b.url in m and "attempt" in m for m in warned), warned
    assert stats.failures >= 1 and stats.requests == 24
    assert len(results) == 48
    for s, res in zip(seqs, results, strict=True):
        assert_matches_reference(
            res, reference_logprobs(ref.model, s.prompt_ids, s.completion_ids), s.completion_ids, 4
        )
