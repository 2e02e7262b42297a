"""The wire contract: what the trainer's client sends is what the server validates, in every form, and what
the server answers is what the client reads back.

The client's bytes are captured by an httpx transport that answers in-process with documents built by
``shared.wire`` (the server's own builders): this test is about the contract's bytes, so no server process is
needed; tests/test_teacher_client.py and tests/test_server_http.py run the same paths over real HTTP.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from shared import codec, wire
from shared.protocol import (
    GenerateRequest,
    GenerateResponseDoc,
    ScoreRequest,
    ScoreResponseDoc,
    SequenceScoresDoc,
)
from student_trainer.teacher.client import SequenceInput, TeacherClient
from student_trainer.teacher.errors import TeacherInputError, TeacherProtocolError

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"}]
# every sequence form the protocol has: (client input, candidate ids or None)
FORMS = {
    "tokens": SequenceInput(prompt_ids=[1, 2, 3], completion_ids=[4, 5]),
    "tokens_pair": ([1, 2], np.array([7, 8, 9], dtype=np.int64)),
    "text_completion_text": SequenceInput(prompt="What is 2 + 3?", completion=" 5."),
    "text_completion_ids": {"prompt": "What is 2 + 3?", "completion_ids": [9, 10]},
    "chat_completion_ids": SequenceInput(messages=MESSAGES, completion_ids=np.array([3, 4, 5])),
    "chat_completion_text": {"messages": MESSAGES, "completion": "5"},
}


class Recorder:
    """An httpx transport: decodes each request body, keeps it, answers with ``shared.wire`` documents."""

    def __init__(self, fmt: str = codec.MSGPACK) -> None:
        self.bodies: list[dict] = []
        self.fmt = fmt

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = codec.decode(request.content, codec.media_type(request.headers["content-type"]))
        self.bodies.append(body)
        if request.url.path == "/v1/score":
            doc = wire.score_response("m", [self._scored(s, body) for s in body["sequences"]])
        elif request.url.path == "/v1/generate":
            groups = [[self._sample(i, j) for j in range(body["n"])] for i in range(len(body["prompts"]))]
            doc = wire.generate_response("m", [3] * len(groups), groups)
        else:
            return httpx.Response(404)
        return httpx.Response(200, content=codec.encode(doc, self.fmt), headers={"content-type": self.fmt})

    @staticmethod
    def _scored(seq: dict, body: dict) -> wire.ScoredSequence:
        ids = np.asarray(seq.get("completion_ids", [11, 12]), dtype=np.int64)  # text: the "tokenized" text
        t, k = len(ids), body["top_k"]
        cand = seq.get("candidate_ids")
        return wire.ScoredSequence(
            completion_ids=ids,
            logprobs=-np.arange(1, t + 1, dtype=np.float32),
            topk_ids=np.tile(np.arange(k, dtype=np.int32), (t, 1)),
            topk_logprobs=np.full((t, k), -2.0, dtype=np.float32),
            prompt_tokens=3,
            candidate_logprobs=None if cand is None else np.full(np.shape(cand), -3.0, dtype=np.float32),
            entropy=np.ones(t, dtype=np.float32) if body["return_entropy"] else None,
        )

    @staticmethod
    def _sample(i: int, j: int) -> wire.GeneratedSample:
        return wire.GeneratedSample(np.array([i, j, 2]), f"sample {i}.{j}", "stop", -1.5)


def _client(recorder: Recorder) -> TeacherClient:
    client = TeacherClient("http://teacher.test:8000", max_attempts=1)
    client.pool.http = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    return client


def _score(recorder: Recorder, sequences, **kwargs):
    async def run():
        client = _client(recorder)
        try:
            return await client.score(sequences, **kwargs)
        finally:
            await client.pool.http.aclose()
            await client.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("form", sorted(FORMS))
def test_client_score_body_validates_as_score_request(form):
    rec = Recorder()
    item = FORMS[form]
    cand = None
    if form.startswith(("tokens", "chat_completion_ids", "text_completion_ids")):
        t = len(item[1]) if isinstance(item, tuple) else len(np.asarray(_field(item, "completion_ids")))
        cand = [np.arange(3 * t, dtype=np.int64).reshape(t, 3)]
    results = _score(rec, [item], top_k=2, return_entropy=True, candidate_ids=cand, temperature=0.5)
    (body,) = rec.bodies
    req = ScoreRequest.model_validate(body)  # exactly what the server does with a decoded body
    seq = req.sequences[0]
    assert seq.form == form.split("_")[0]
    assert (req.top_k, req.return_entropy, req.temperature, req.return_tokens) == (2, True, 0.5, False)
    if isinstance(item, tuple):
        assert seq.prompt_ids == [1, 2] and seq.completion_ids == [7, 8, 9]
    else:
        for key in ("prompt_ids", "completion_ids", "prompt", "completion"):
            if _field(item, key) is not None:
                assert np.array_equal(np.asarray(getattr(seq, key)), np.asarray(_field(item, key))), key
        if _field(item, "messages") is not None:
            assert [m.model_dump() for m in seq.messages] == MESSAGES
    if cand is not None:
        assert seq.candidate_ids == cand[0].tolist()
        assert results[0].candidate_logprobs.shape == cand[0].shape
    assert results[0].entropy is not None and results[0].topk_ids.shape[1] == 2


def _field(item, key):
    return item.get(key) if isinstance(item, dict) else getattr(item, key)


def test_client_msgpack_body_carries_packed_int32_ids():
    rec = Recorder()
    _score(rec, [FORMS["tokens"]], top_k=1)
    seq = rec.bodies[0]["sequences"][0]
    assert isinstance(seq["prompt_ids"], np.ndarray) and seq["prompt_ids"].dtype == np.int32


def test_json_answers_read_back_like_msgpack():
    for fmt in (codec.MSGPACK, codec.JSON):
        (res,) = _score(Recorder(fmt), [FORMS["tokens"]], top_k=3)
        np.testing.assert_array_equal(res.completion_ids, [4, 5])
        np.testing.assert_array_equal(res.logprobs, [-1.0, -2.0])
        assert res.topk_ids.shape == (2, 3) and res.topk_ids.dtype == np.int32


def test_client_generate_body_validates_for_every_prompt_form():
    rec = Recorder()
    prompts = [[1, 2, 3], "plain text", MESSAGES, {"prompt_ids": np.array([4, 5])}, {"messages": MESSAGES}]

    async def run():
        client = _client(rec)
        try:
            return await client.generate(prompts, n=2, temperature=0.7, max_tokens=9, seed=5, stop=["\n"])
        finally:
            await client.pool.http.aclose()
            await client.aclose()

    groups = asyncio.run(run())
    (body,) = rec.bodies
    req = GenerateRequest.model_validate(body)
    forms = [
        next(k for k in ("prompt_ids", "prompt", "messages") if getattr(p, k) is not None)
        for p in req.prompts
    ]
    assert forms == ["prompt_ids", "prompt", "messages", "prompt_ids", "messages"]
    assert (req.n, req.temperature, req.max_tokens, req.seed, req.stop) == (2, 0.7, 9, 5, ["\n"])
    assert [len(g) for g in groups] == [2] * 5
    assert groups[3][1].text == "sample 3.1" and groups[3][1].completion_ids.dtype == np.int32


def test_result_documents_match_the_documented_shapes():
    scored = Recorder._scored(
        {"completion_ids": [1, 2, 3], "candidate_ids": [[1]] * 3}, {"top_k": 2, "return_entropy": True}
    )
    scored.tokens = ["a", "b", "c"]
    doc = codec.decode(codec.encode(wire.score_response("m", [scored]), codec.JSON), codec.JSON)
    ScoreResponseDoc.model_validate(doc)
    assert doc["usage"] == {"prompt_tokens": 3, "scored_tokens": 3}
    back = wire.ScoredSequence.from_wire(SequenceScoresDoc.model_validate(doc["results"][0]).model_dump())
    np.testing.assert_array_equal(back.candidate_logprobs, scored.candidate_logprobs)
    assert back.tokens == ["a", "b", "c"]
    gen = wire.generate_response("m", [4], [[Recorder._sample(0, 0)]])
    GenerateResponseDoc.model_validate(codec.decode(codec.encode(gen, codec.JSON), codec.JSON))
    assert gen["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}


def test_bad_inputs_are_refused_before_sending():
    rec = Recorder()
    cases = [
        ({"prompt_ids": [1], "prompt": "x", "completion_ids": [2]}, "exactly one of prompt_ids"),
        ({"prompt_ids": [1]}, "exactly one of completion_ids or completion"),
        ({"prompt_ids": [1], "completion": "text"}, "token form needs completion_ids"),
        ({"prompt_ids": [1], "completion_ids": [2**31]}, "does not fit int32"),
        ({"prompt_ids": [1.5], "completion_ids": [2]}, "integer token ids"),
        ({"messages": [{"content": "no role"}], "completion_ids": [2]}, "needs 'role' and 'content'"),
    ]
    for item, message in cases:
        with pytest.raises(TeacherInputError, match=message):
            _score(rec, [item])
    with pytest.raises(
        TeacherInputError, match=r"shape \[1, 1\] does not fit the completion; expected \(2, K\)"
    ):
        _score(rec, [FORMS["tokens"]], candidate_ids=[np.zeros((1, 1), dtype=np.int64)])
    with pytest.raises(TeacherInputError, match="top_kk: Extra inputs are not permitted"):
        _score(rec, [FORMS["tokens"]], top_kk=3)  # options are checked with the server's own model
    assert rec.bodies == []


def test_malformed_answers_are_protocol_errors():
    def bad(request: httpx.Request) -> httpx.Response:
        doc = {"model": "m", "results": [{"completion_ids": [4, 5]}], "usage": {}}  # no logprobs
        return httpx.Response(200, content=codec.encode(doc), headers={"content-type": codec.MSGPACK})

    async def run():
        client = TeacherClient("http://teacher.test:8000", max_attempts=1)
        client.pool.http = httpx.AsyncClient(transport=httpx.MockTransport(bad))
        try:
            return await client.score([FORMS["tokens"]], top_k=1)
        finally:
            await client.pool.http.aclose()
            await client.aclose()

    with pytest.raises(TeacherProtocolError, match="malformed score result"):
        asyncio.run(run())
