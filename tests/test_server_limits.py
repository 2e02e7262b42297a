"""Bad input over real HTTP: every case is a 4xx whose JSON error names the field, the value and the limit."""

from __future__ import annotations

import httpx
import msgpack
import pytest

from shared import codec

OK_SEQ = {"prompt_ids": [1, 2], "completion_ids": [3, 4]}


def _post(url, body: bytes, ctype: str | None = codec.JSON) -> httpx.Response:
    headers = {"Content-Type": ctype} if ctype else {}
    return httpx.post(url + "/v1/score", content=body, headers=headers, timeout=30)


def _json(doc) -> bytes:
    return codec.encode(doc, codec.JSON)


CASES = [
    # (name, body, content-type, status, field, text in message)
    (
        "too long",
        _json({"sequences": [{"prompt_ids": [1] * 200, "completion_ids": [2] * 100}]}),
        codec.JSON,
        422,
        "sequences[0]",
        "max_model_len 256",
    ),
    (
        "empty completion",
        _json({"sequences": [{"prompt_ids": [1], "completion_ids": []}]}),
        codec.JSON,
        422,
        "sequences[0].completion_ids",
        "empty",
    ),
    (
        "empty completion text",
        _json({"sequences": [{"prompt": "hi", "completion": ""}]}),
        codec.JSON,
        422,
        "sequences[0].completion",
        "empty",
    ),
    (
        "empty prompt",
        _json({"sequences": [{"prompt_ids": [], "completion_ids": [1]}]}),
        codec.JSON,
        422,
        "sequences[0].prompt_ids",
        "at least 1 token",
    ),
    (
        "id above vocab",
        _json({"sequences": [{"prompt_ids": [1], "completion_ids": [3, 99999]}]}),
        codec.JSON,
        422,
        "sequences[0].completion_ids[1]",
        "0 <= id < 1024",
    ),
    (
        "negative id",
        _json({"sequences": [{"prompt_ids": [-1], "completion_ids": [3]}]}),
        codec.JSON,
        422,
        "sequences[0].prompt_ids[0]",
        "outside the vocabulary",
    ),
    (
        "top_k above max",
        _json({"sequences": [OK_SEQ], "top_k": 65}),
        codec.JSON,
        422,
        "top_k",
        "max_top_k 64",
    ),
    (
        "negative top_k",
        _json({"sequences": [OK_SEQ], "top_k": -1}),
        codec.JSON,
        422,
        "top_k",
        "greater than or equal",
    ),
    (
        "candidates wrong rows",
        _json({"sequences": [{**OK_SEQ, "candidate_ids": [[1, 2]]}]}),
        codec.JSON,
        422,
        "sequences[0].candidate_ids",
        "expected 2 rows",
    ),
    (
        "candidates ragged",
        _json({"sequences": [{**OK_SEQ, "candidate_ids": [[1, 2], [3]]}]}),
        codec.JSON,
        422,
        "sequences[0].candidate_ids",
        "same number of ids",
    ),
    (
        "candidate out of vocab",
        _json({"sequences": [{**OK_SEQ, "candidate_ids": [[1], [5000]]}]}),
        codec.JSON,
        422,
        "sequences[0].candidate_ids[1][0]",
        "outside the vocabulary",
    ),
    (
        "NaN temperature",
        b'{"sequences":[{"prompt_ids":[1],"completion_ids":[2]}],"temperature":NaN}',
        codec.JSON,
        422,
        "temperature",
        "finite",
    ),
    (
        "negative temperature",
        _json({"sequences": [OK_SEQ], "temperature": -1.0}),
        codec.JSON,
        422,
        "temperature",
        "greater than 0",
    ),
    ("too many sequences", _json({"sequences": [OK_SEQ] * 9}), codec.JSON, 413, "sequences", "limit 8"),
    (
        "too many tokens",
        _json({"sequences": [{"prompt_ids": [1] * 100, "completion_ids": [2] * 100}] * 2}),
        codec.JSON,
        413,
        "sequences",
        "limit 300",
    ),
    ("malformed JSON", b'{"sequences": [', codec.JSON, 400, "body", "malformed JSON"),
    ("malformed msgpack", b"\xc1\xff", codec.MSGPACK, 400, "body", "malformed msgpack"),
    (
        "bad packed array",
        msgpack.packb(
            {
                "sequences": [
                    {
                        "prompt_ids": msgpack.ExtType(codec.NDARRAY_EXT, b"\x00\x01\x05\x00\x00\x00"),
                        "completion_ids": [1],
                    }
                ]
            }
        ),
        codec.MSGPACK,
        400,
        "body",
        "needs 20 bytes",
    ),
    (
        "float packed ids",
        codec.encode(
            {"sequences": [{"prompt_ids": __import__("numpy").ones(2, "float32"), "completion_ids": [1]}]}
        ),
        codec.MSGPACK,
        422,
        "sequences[0].prompt_ids",
        "integer dtype",
    ),
    ("wrong content type", b"sequences=1", "application/x-www-form-urlencoded", 415, "Content-Type", "curl"),
    (
        "unknown field typo",
        _json({"sequences": [OK_SEQ], "topk": 3}),
        codec.JSON,
        422,
        "topk",
        "unknown field",
    ),
    (
        "unknown seq field",
        _json({"sequences": [{**OK_SEQ, "completion_id": [1]}]}),
        codec.JSON,
        422,
        "sequences[0].completion_id",
        "unknown field",
    ),
    ("no sequences", _json({"sequences": []}), codec.JSON, 422, "sequences", "at least 1"),
    (
        "mixed forms",
        _json({"sequences": [{"prompt_ids": [1], "completion": "x"}]}),
        codec.JSON,
        422,
        "sequences[0]",
        "does not take",
    ),
    (
        "no prompt",
        _json({"sequences": [{"completion_ids": [1]}]}),
        codec.JSON,
        422,
        "sequences[0]",
        "exactly one prompt",
    ),
    ("body not object", _json([1, 2]), codec.JSON, 422, "body", "object"),
    (
        "ids not ints",
        _json({"sequences": [{"prompt_ids": ["a"], "completion_ids": [1]}]}),
        codec.JSON,
        422,
        "sequences[0].prompt_ids[0]",
        "integer",
    ),
    ("body too big", b"{" + b" " * 5000 + b"}", codec.JSON, 413, "body", "over the limit"),
]


@pytest.fixture(scope="module")
def strict_teacher(tiny_pair):
    """A server with small limits so each limit can be hit cheaply."""
    from devkit.teacher_process import TeacherProcess

    args = [
        "--max-top-k",
        "64",
        "--max-model-len",
        "256",
        "--max-request-sequences",
        "8",
        "--max-request-tokens",
        "300",
        "--max-body-bytes",
        "4096",
    ]
    with TeacherProcess(tiny_pair[0], *args) as proc:
        yield proc


@pytest.mark.parametrize("name, body, ctype, status, field, text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx(strict_teacher, name, body, ctype, status, field, text):
    r = _post(strict_teacher.url, body, ctype)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert text in err["message"], err
    assert err["message"] and "Traceback" not in r.text


def test_chat_form_without_template(tiny_pair, tmp_path):
    """A teacher whose tokenizer has no chat template: messages -> 422 naming the field."""
    import shutil

    from devkit.teacher_process import TeacherProcess

    model = tmp_path / "no_template"
    shutil.copytree(tiny_pair[0], model)
    cfg = model / "tokenizer_config.json"
    import json

    doc = json.loads(cfg.read_text())
    doc.pop("chat_template", None)
    cfg.write_text(json.dumps(doc))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    with TeacherProcess(model) as proc:
        assert httpx.get(proc.url + "/v1/model").json()["chat_template"] is False
        r = _post(
            proc.url,
            _json({"sequences": [{"messages": [{"role": "user", "content": "hi"}], "completion": "x"}]}),
        )
        assert r.status_code == 422
        assert r.json()["error"]["field"] == "sequences[0].messages"
        assert "no chat template" in r.json()["error"]["message"]


def test_generate_bad_input(strict_teacher):
    cases = [
        ({"prompts": [{"prompt_ids": [1]}], "max_tokens": 0}, "max_tokens"),
        ({"prompts": [{"prompt_ids": [1]}], "top_p": 1.5}, "top_p"),
        ({"prompts": [{"prompt_ids": [5000]}]}, "prompts[0].prompt_ids[0]"),
        ({"prompts": [{"prompt_ids": [1]}], "n": 0}, "n"),
        ({"prompts": [{"prompt_ids": [1]}], "max_tokens": 10_000}, "max_tokens"),
        ({"prompts": [{"prompt_ids": [1]}], "temprature": 1.0}, "temprature"),
    ]
    for doc, field in cases:
        r = httpx.post(strict_teacher.url + "/v1/generate", json=doc, timeout=30)
        assert 400 <= r.status_code < 500, (doc, r.text)
        assert r.json()["error"]["field"] == field, r.text
