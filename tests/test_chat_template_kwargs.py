"""``chat_template_kwargs`` end to end: the student's rendering, ``Prompt.teacher_fields()``, and the
teacher server over real HTTP (/v1/score, /v1/generate, vLLM's /tokenize) with a chat template that reads
a variable."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from devkit.teacher_process import free_port, serve_in_thread
from shared.protocol import ScoreSequence
from shared.wire import ScoredSequence
from student_trainer.data.prompts import PromptDataError, PromptRenderer, PromptTemplates

# ChatML plus Qwen3's switch: enable_thinking=false pre-fills an empty think block; a non-boolean is refused
THINK_TEMPLATE = (
    "{% if enable_thinking is defined and enable_thinking is not boolean %}"
    "{{ raise_exception('enable_thinking must be true or false') }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% if persona is defined %}{{ 'As ' + persona + ': ' }}{% endif %}"
    "{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
OFF = {"enable_thinking": False}


@pytest.fixture(scope="module")
def think_model(tiny_pair, tmp_path_factory):
    """The tiny teacher with THINK_TEMPLATE as its chat template, saved and reloaded via from_pretrained."""
    out = tmp_path_factory.mktemp("think") / "teacher"
    shutil.copytree(tiny_pair[0], out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = THINK_TEMPLATE
    tok.save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template == THINK_TEMPLATE
    return out


@pytest.fixture(scope="module")
def tok(think_model):
    return AutoTokenizer.from_pretrained(think_model)


@pytest.fixture(scope="module")
def url(think_model):
    from teacher_server.app import create_app
    from teacher_server.config import ServerConfig

    config = ServerConfig(model=str(think_model), port=free_port(), device="cpu", max_model_len=256)
    with serve_in_thread(create_app(config), config.port) as base:
        deadline = time.monotonic() + 120
        while httpx.get(base + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the teacher did not get ready"
            time.sleep(0.1)
        yield base


def expected_ids(tok, messages=MESSAGES, **kwargs) -> list[int]:
    """What the server must produce: the template rendered here, tokenized without special tokens."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return tok(text, add_special_tokens=False)["input_ids"]


def score(url: str, *sequences: dict, **options) -> httpx.Response:
    return httpx.post(
        url + "/v1/score", json={"sequences": list(sequences), "top_k": 4, **options}, timeout=60
    )


def results(r: httpx.Response) -> list[ScoredSequence]:
    assert r.status_code == 200, r.text
    return [ScoredSequence.from_wire(d) for d in r.json()["results"]]


def test_the_template_really_reads_the_variable(tok):
    plain, off = expected_ids(tok), expected_ids(tok, **OFF)
    assert len(off) > len(plain) and off[: len(plain)] == plain
    assert tok.decode(off).endswith("<think>\n\n</think>\n\n")


def test_score_chat_form_renders_with_the_kwargs(url, tok):
    completion = tok("5.", add_special_tokens=False)["input_ids"]
    off_ids = expected_ids(tok, **OFF)
    chat_off, chat_plain, tokens_off = results(
        score(
            url,
            {"messages": MESSAGES, "chat_template_kwargs": OFF, "completion_ids": completion},
            {"messages": MESSAGES, "completion_ids": completion},
            {"prompt_ids": off_ids, "completion_ids": completion},
        )
    )
    assert chat_off.prompt_tokens == len(off_ids) and chat_plain.prompt_tokens == len(expected_ids(tok))
    # the server rendered exactly the ids rendered here: same scores as sending those ids
    np.testing.assert_array_equal(chat_off.logprobs, tokens_off.logprobs)
    np.testing.assert_array_equal(chat_off.topk_ids, tokens_off.topk_ids)
    assert not np.array_equal(chat_off.logprobs, chat_plain.logprobs)


def test_a_string_variable_and_the_generate_route(url, tok):
    kwargs = {"persona": "a tutor", "enable_thinking": False}
    body = {"prompts": [{"messages": MESSAGES, "chat_template_kwargs": kwargs}], "max_tokens": 2, "seed": 0}
    r = httpx.post(url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["prompt_tokens"] == len(expected_ids(tok, **kwargs))


def test_tokenize_route_takes_vllms_field(url, tok):
    body = {"messages": MESSAGES, "add_special_tokens": False, "chat_template_kwargs": OFF}
    r = httpx.post(url + "/tokenize", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == expected_ids(tok, **OFF)
    plain = httpx.post(
        url + "/tokenize", json={"messages": MESSAGES, "add_special_tokens": False}, timeout=60
    )
    assert plain.json()["tokens"] == expected_ids(tok)
    bad = httpx.post(url + "/tokenize", json={"prompt": "hi", "chat_template_kwargs": OFF}, timeout=60)
    assert 400 <= bad.status_code < 500 and "chat_template_kwargs" in bad.text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"enable_thinking": {"nested": 1}}, "enable_thinking: expected a string, number, boolean or null"),
        ({"enable_thinking": [True]}, "got list"),
        ({"tokenize": True}, "'tokenize' is an argument of apply_chat_template"),
        ({"add_generation_prompt": False}, "reserved"),
        ({"not a name": 1}, "not a valid template variable name"),
        ("enable_thinking=false", "expected an object"),
    ],
)
def test_bad_kwargs_are_a_422_naming_the_field(url, tok, kwargs, match):
    seq = {"messages": MESSAGES, "chat_template_kwargs": kwargs, "completion_ids": [5]}
    r = score(url, {"prompt_ids": [1], "completion_ids": [5]}, seq)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "sequences[1].chat_template_kwargs"
    assert match in err["message"]


def test_kwargs_outside_the_chat_form_and_template_refusals_are_422(url, tok):
    r = score(url, {"prompt_ids": [1], "chat_template_kwargs": OFF, "completion_ids": [5]})
    assert r.status_code == 422 and "tokens form does not take ['chat_template_kwargs']" in r.text
    r = score(
        url, {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": "no"}, "completion_ids": [5]}
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "sequences[0].messages"
    assert (
        "enable_thinking must be true or false" in err["message"] and "chat_template_kwargs" in err["message"]
    )
    body = {"prompts": [{"prompt": "x", "chat_template_kwargs": OFF}], "max_tokens": 1}
    r = httpx.post(url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == 422 and "chat form (messages) only" in r.text


def test_student_rendering_and_teacher_fields_reach_the_server(url, tok):
    templates = PromptTemplates(student="chat", teacher="chat", chat_template_kwargs=OFF)
    prompt = PromptRenderer(tok, templates).render("What is 2 + 3?")
    assert prompt.student_ids == expected_ids(tok, **OFF)
    fields = prompt.teacher_fields()
    assert fields == {"messages": MESSAGES, "chat_template_kwargs": OFF}
    completion = tok("5.", add_special_tokens=False)["input_ids"]
    ScoreSequence(**fields, completion_ids=completion)  # a valid chat-form sequence of the wire contract
    (chat,) = results(score(url, {**fields, "completion_ids": completion}))
    assert chat.prompt_tokens == len(prompt.student_ids)  # the teacher rendered what the student sees
    # no kwargs: the field is not sent at all (older servers keep working)
    assert (
        "chat_template_kwargs"
        not in PromptRenderer(tok, PromptTemplates(teacher="chat")).render("q").teacher_fields()
    )


def test_reserved_or_nested_kwargs_are_refused_before_training(tok):
    with pytest.raises(PromptDataError, match="'tokenize' is an argument of apply_chat_template"):
        PromptTemplates(chat_template_kwargs={"tokenize": True})
    with pytest.raises(PromptDataError, match="x: expected a string, number, boolean or null, got dict"):
        PromptTemplates(chat_template_kwargs={"x": {}})


def test_generate_renders_locally_with_the_kwargs_and_records_them(url, tok, tmp_path):
    from student_trainer.data.prompts import PromptTable
    from student_trainer.recipe.generate import (
        GenerateError,
        GenerateSettings,
        generate_to_file,
        prompt_request,
    )

    table = PromptTable(["What is 2 + 3?"], None, ["q0"], "memory")
    settings = GenerateSettings(max_tokens=2, chat_template_kwargs=OFF)
    assert prompt_request("What is 2 + 3?", settings) == {"messages": MESSAGES, "chat_template_kwargs": OFF}
    out = tmp_path / "rollouts.jsonl"
    generate_to_file(url, table, settings, out, tokenizer=tok, progress=False)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt_ids"] == expected_ids(tok, **OFF)
    assert record["teacher"]["chat_template_kwargs"] == OFF
    resumed = r"holds samples generated with chat_template_kwargs=\{.enable_thinking.: False\}"
    with pytest.raises(GenerateError, match=resumed):
        generate_to_file(url, table, GenerateSettings(max_tokens=2), out, tokenizer=tok, progress=False)
    with pytest.raises(GenerateError, match="'messages' is an argument of apply_chat_template"):
        GenerateSettings(chat_template_kwargs={"messages": []})


def test_every_client_path_sends_the_kwargs(url, tok, think_model):
    """TeacherClient (/v1/score and /v1/generate), the in-process LocalTeacher and the OpenAI-protocol client
    (/tokenize) all render the chat form with the prompt's chat_template_kwargs."""
    import torch

    from student_trainer.teacher.client import SyncTeacherClient
    from student_trainer.teacher.local import LocalTeacher
    from student_trainer.teacher.openai_client import SyncOpenAIClient

    templates = PromptTemplates(teacher="chat", chat_template_kwargs=OFF)
    prompt = PromptRenderer(tok, templates).render("What is 2 + 3?")
    completion = tok("5.", add_special_tokens=False)["input_ids"]
    seqs = [
        {**prompt.teacher_fields(), "completion_ids": completion},
        {"prompt_ids": prompt.student_ids, "completion_ids": completion},
    ]
    with SyncTeacherClient(url) as client:
        chat, tokens = client.score(seqs, top_k=4)
        (samples,) = client.generate([{"messages": MESSAGES, "chat_template_kwargs": OFF}], max_tokens=2)
    assert chat.prompt_tokens == tokens.prompt_tokens == len(expected_ids(tok, **OFF))
    np.testing.assert_array_equal(chat.logprobs, tokens.logprobs)
    assert samples
    local = LocalTeacher(str(think_model), torch.device("cpu"), torch.float32)
    assert local.prompt_ids(prompt.teacher_fields()) == expected_ids(tok, **OFF)
    openai = SyncOpenAIClient(url)
    try:
        openai.servers()
        got = openai.score(seqs, top_k=4)
        assert got[0].prompt_tokens == got[1].prompt_tokens
        np.testing.assert_allclose(got[0].logprobs, chat.logprobs, atol=1e-5)
        plain = [
            {"messages": MESSAGES, "completion_ids": completion}
        ]  # its render cache is keyed by kwargs too
        assert openai.score(plain, top_k=4)[0].prompt_tokens == len(expected_ids(tok))
    finally:
        openai.close()
