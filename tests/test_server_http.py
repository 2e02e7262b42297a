"""The teacher server over real HTTP (a `teacher-server` subprocess): formats, forms, endpoints, batching."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared import codec
from shared.fingerprint import tokenizer_fingerprint
from shared.wire import ScoredSequence

MSGPACK_HEADERS = {"Content-Type": codec.MSGPACK, "Accept": codec.MSGPACK}


@pytest.fixture(scope="module")
def tok(tiny_pair):
    return AutoTokenizer.from_pretrained(tiny_pair[0])


@pytest.fixture(scope="module")
def ref_model(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()


def post(url, doc, fmt=codec.JSON):
    headers = MSGPACK_HEADERS if fmt == codec.MSGPACK else {"Content-Type": codec.JSON}
    r = httpx.post(url + "/v1/score", content=codec.encode(doc, fmt), headers=headers, timeout=60)
    return r


def results(r) -> list[ScoredSequence]:
    fmt = codec.media_type(r.headers["content-type"])
    return [ScoredSequence.from_wire(d) for d in codec.decode(r.content, fmt)["results"]]


def test_json_and_msgpack_agree_with_reference(hf_teacher, ref_model):
    seqs = [
        {"prompt_ids": [1, 5, 9], "completion_ids": [10, 11, 12, 13]},
        {"prompt_ids": [7], "completion_ids": [3]},
    ]
    doc = {"sequences": seqs, "top_k": 4, "return_entropy": True}
    rj, rm = post(hf_teacher.url, doc), post(hf_teacher.url, doc, codec.MSGPACK)
    assert rj.status_code == rm.status_code == 200
    assert rj.headers["content-type"].startswith(codec.JSON)
    assert rm.headers["content-type"].startswith(codec.MSGPACK)
    for seq, a, b in zip(seqs, results(rj), results(rm), strict=True):
        ids = torch.tensor([seq["prompt_ids"] + seq["completion_ids"]])
        with torch.no_grad():
            lp = ref_model(ids).logits[0].log_softmax(-1)
        p = len(seq["prompt_ids"])
        ref = lp[p - 1 : p - 1 + len(seq["completion_ids"])]
        np.testing.assert_allclose(
            a.logprobs, ref.gather(1, torch.tensor(seq["completion_ids"])[:, None])[:, 0], atol=1e-5
        )
        np.testing.assert_allclose(a.topk_logprobs, ref.topk(4).values, atol=1e-5)
        for name in ("logprobs", "topk_logprobs", "entropy"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    usage = codec.decode(rm.content)["usage"]
    assert usage == {"prompt_tokens": 4, "scored_tokens": 5}


def test_msgpack_response_carries_packed_arrays_only(hf_teacher):
    doc = {
        "sequences": [
            {"prompt_ids": np.array([1, 2, 3], np.int32), "completion_ids": np.array([4, 5], np.int32)}
        ]
    }
    r = post(hf_teacher.url, doc, codec.MSGPACK)
    assert r.status_code == 200, r.text
    res = codec.decode(r.content)["results"][0]
    for key in ("completion_ids", "logprobs", "topk_ids", "topk_logprobs"):
        assert isinstance(res[key], np.ndarray), key  # never lists of numbers
    assert res["topk_ids"].dtype == np.int32 and res["logprobs"].dtype == np.float32


def test_text_and_chat_forms_equal_token_form(hf_teacher, tok):
    prompt, completion = "What is 2 + 3?", " The answer is 5."
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": prompt}]
    chat_ids = tok(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    doc = {
        "sequences": [
            {"prompt": prompt, "completion": completion},
            {"prompt_ids": p_ids, "completion_ids": c_ids},
            {"messages": messages, "completion_ids": c_ids},
            {"prompt_ids": chat_ids, "completion_ids": c_ids},
            {"messages": messages, "completion": completion},
        ],
        "return_tokens": True,
    }
    r = post(hf_teacher.url, doc)
    assert r.status_code == 200, r.text
    text, token, chat, chat_tok, chat_text = results(r)
    np.testing.assert_array_equal(text.logprobs, token.logprobs)
    np.testing.assert_array_equal(chat.logprobs, chat_tok.logprobs)
    np.testing.assert_array_equal(chat_text.logprobs, chat.logprobs)
    assert chat.prompt_tokens == len(chat_ids) and text.prompt_tokens == len(p_ids)
    assert "".join(text.tokens) == completion


def test_model_info(hf_teacher, tok, tiny_pair):
    info = httpx.get(hf_teacher.url + "/v1/model").json()
    assert info["backend"] == "hf"
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert info["vocab_size"] == len(tok) and info["max_top_k"] == 64 and info["max_model_len"] == 256
    assert info["chat_template"] is True
    assert info["capabilities"] == {
        "candidate_ids": True,
        "entropy": True,
        "temperature": True,
        "generate": True,
    }
    assert info["eos_token_ids"] == [tok.eos_token_id]


def test_health_ready_docs_metrics(hf_teacher):
    assert httpx.get(hf_teacher.url + "/health").json()["status"] == "ok"
    assert httpx.get(hf_teacher.url + "/ready").status_code == 200
    assert httpx.get(hf_teacher.url + "/docs").status_code == 200
    spec = httpx.get(hf_teacher.url + "/openapi.json").json()
    assert "ScoreRequest" in spec["components"]["schemas"]
    assert "requestBody" in spec["paths"]["/v1/score"]["post"]
    post(hf_teacher.url, {"sequences": [{"prompt_ids": [1], "completion_ids": [2, 3]}]})
    text = httpx.get(hf_teacher.url + "/metrics").text
    for name in (
        "teacher_requests_total",
        "teacher_scored_tokens_total",
        "teacher_batch_sequences_bucket",
        "teacher_request_latency_seconds_bucket",
        "teacher_queue_tokens",
        "teacher_inflight_tokens",
    ):
        assert name in text, name


def test_many_concurrent_clients_are_batched_and_correct(hf_teacher):
    rng = np.random.default_rng(1)
    seqs = [
        {
            "prompt_ids": rng.integers(0, 1024, int(rng.integers(1, 20))).tolist(),
            "completion_ids": rng.integers(0, 1024, int(rng.integers(1, 30))).tolist(),
        }
        for _ in range(48)
    ]
    alone = [results(post(hf_teacher.url, {"sequences": [s], "top_k": 8}))[0] for s in seqs[:6]]

    def batches_seen() -> float:
        text = httpx.get(hf_teacher.url + "/metrics").text
        line = next(ln for ln in text.splitlines() if ln.startswith("teacher_batch_sequences_sum"))
        return float(line.split()[-1])

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(s):
                r = await client.post(
                    hf_teacher.url + "/v1/score",
                    content=codec.encode({"sequences": [s], "top_k": 8}),
                    headers=MSGPACK_HEADERS,
                )
                assert r.status_code == 200, r.text
                return results(r)[0]

            return await asyncio.gather(*(one(s) for s in seqs))

    before_count = _metric(hf_teacher.url, "teacher_batch_sequences_count")
    before_sum = batches_seen()
    together = asyncio.run(run())
    batches = _metric(hf_teacher.url, "teacher_batch_sequences_count") - before_count
    assert batches_seen() - before_sum == 48
    assert batches < 48  # packed into shared forwards, not one by one
    for a, b in zip(alone, together, strict=False):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[-1])


def test_generate_endpoint(hf_teacher):
    doc = {
        "prompts": [{"messages": [{"role": "user", "content": "What is 2 + 3?"}]}, {"prompt": "Compute"}],
        "n": 2,
        "max_tokens": 6,
        "seed": 3,
        "temperature": 1.0,
    }
    r1 = httpx.post(hf_teacher.url + "/v1/generate", json=doc, timeout=60)
    r2 = httpx.post(hf_teacher.url + "/v1/generate", json=doc, timeout=60)
    assert r1.status_code == 200, r1.text
    a = r1.json()
    assert [len(x["samples"]) for x in a["results"]] == [2, 2]
    assert a == r2.json()  # seeded
    for res in a["results"]:
        for s in res["samples"]:
            assert s["finish_reason"] in ("stop", "length") and len(s["completion_ids"]) <= 6
            assert s["finish_reason"] == "stop" or len(s["completion_ids"]) == 6
            assert isinstance(s["cumulative_logprob"], float) and s["cumulative_logprob"] < 0
    # cumulative_logprob = the teacher's raw log-probs of the sampled tokens, checked through /v1/score
    sample = a["results"][1]["samples"][0]
    scored = results(
        post(
            hf_teacher.url, {"sequences": [{"prompt": "Compute", "completion_ids": sample["completion_ids"]}]}
        )
    )
    assert abs(float(scored[0].logprobs.sum()) - sample["cumulative_logprob"]) < 1e-3
