"""Prompt loading, rendering and the resumable seeded stream, with the tiny models' real tokenizer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from devkit.tiny_models import build_tiny_pair
from shared.protocol import ChatMessage, ScoreSequence
from student_trainer.data.prompts import (
    DataPosition,
    Prompt,
    PromptDataError,
    PromptRenderer,
    PromptStream,
    PromptTable,
    PromptTemplates,
    load_prompts,
)
from teacher_server.prepare import render_chat

ROWS = [
    {"uid": f"q{i}", "problem": f"What is {i} + {i + 1}?", "answer": 2 * i + 1, "level": i % 3}
    for i in range(7)
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    _, student = build_tiny_pair(tmp_path_factory.mktemp("tiny"))
    return AutoTokenizer.from_pretrained(student)


@pytest.fixture()
def jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")  # a trailing blank line is fine
    return path


def table_of(questions: list) -> PromptTable:
    return PromptTable(questions, None, [str(i) for i in range(len(questions))], "memory")


def test_jsonl_and_parquet_load_the_same_table(jsonl, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    kwargs = dict(question_field="problem", answer_field="answer", id_field="uid")
    a, b = load_prompts(jsonl, **kwargs), load_prompts(parquet, **kwargs)
    assert a.questions == b.questions == [r["problem"] for r in ROWS]
    assert a.answers == b.answers == [str(r["answer"]) for r in ROWS]
    assert a.ids == b.ids == [r["uid"] for r in ROWS]
    assert load_prompts(jsonl, question_field="problem").ids == [str(i) for i in range(7)]  # row index


def test_chat_message_questions_from_parquet(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    pq.write_table(pa.Table.from_pylist([{"prompt": msgs}]), tmp_path / "m.parquet")
    table = load_prompts(tmp_path / "m.parquet", question_field="prompt")
    assert table.questions == [msgs]
    p = PromptRenderer(
        tokenizer, PromptTemplates(student="Q: {question}\nA:", system_prompt="ignored")
    ).render(table.questions[0])
    assert p.question == "What is 2 + 2?"
    assert tokenizer.decode(p.student_ids) == "Q: What is 2 + 2?\nA:"
    chat = PromptRenderer(tokenizer, PromptTemplates(system_prompt="not added twice")).render(
        table.questions[0]
    )
    assert tokenizer.decode(chat.student_ids).count("system") == 1


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "empty"),
        ('{"q": 1}\nnot json\n', r"p.jsonl:2: not valid JSON"),
        ('{"q": "a"}\n[1, 2]\n', r"p.jsonl:2: expected a JSON object"),
        (
            '{"q": "a"}\n{"question": "b", "other": 1}\n',
            r"p.jsonl:2: no field 'q'; available fields: \['other', 'question'\]",
        ),
        ('{"q": "  "}\n', "row 0 field 'q': the question is empty"),
        ('{"q": 3}\n', "expected a string or a list of chat messages, got int"),
        ('{"q": [{"role": "system", "content": "x"}]}\n', "no 'user' message"),
    ],
)
def test_bad_jsonl_is_named(tmp_path, content, match):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(PromptDataError, match=match):
        load_prompts(path, question_field="q")


def test_bad_sources_and_fields(jsonl, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    with pytest.raises(PromptDataError, match=r"no field 'question'; available fields: \['answer', 'level'"):
        load_prompts(tmp_path / "p.parquet")
    with pytest.raises(PromptDataError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(PromptDataError, match="cannot tell the format"):
        load_prompts(tmp_path / "p.csv")
    with pytest.raises(PromptDataError, match="data_format='csv'"):
        load_prompts(jsonl, data_format="csv")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"q": "a", "id": 1}\n{"q": "b", "id": 1}\n')
    with pytest.raises(PromptDataError, match="not unique"):
        load_prompts(dup, question_field="q", id_field="id")


def test_datasets_source(tmp_path):
    try:
        import datasets
    except ImportError:
        with pytest.raises(PromptDataError, match="needs the 'datasets' package"):
            load_prompts(tmp_path / "a_dataset_dir")
        return
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    table = load_prompts(tmp_path / "ds", question_field="problem", answer_field="answer")
    assert table.questions == [r["problem"] for r in ROWS] and table.answers[1] == "3"
    with pytest.raises(PromptDataError, match="available fields"):
        load_prompts(tmp_path / "ds", question_field="nope")


def test_student_chat_and_teacher_sides(tokenizer):
    q = "What is 3 + 4? Put it in \\boxed{}."
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": f"{q}\nThink."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    expected = tokenizer(chat, add_special_tokens=False)["input_ids"]
    base = dict(user_template="{question}\nThink.", system_prompt="S")

    same = PromptRenderer(tokenizer, PromptTemplates(**base)).render(q, "7", "id7")
    assert same == Prompt("id7", q, "7", expected, teacher_ids=expected)
    assert same.teacher_fields() == {"prompt_ids": expected}

    plain = PromptRenderer(
        tokenizer, PromptTemplates(**base, teacher="Problem: {question}\nSolution:")
    ).render(q)
    assert plain.student_ids == expected
    assert tokenizer.decode(plain.teacher_ids) == f"Problem: {q}\nSolution:"

    t = PromptTemplates(**base, teacher="chat", teacher_system_prompt="T")
    p = PromptRenderer(tokenizer, t).render(q)
    assert p.teacher_ids is None
    assert p.teacher_messages == [
        {"role": "system", "content": "T"},
        {"role": "user", "content": f"{q}\nThink."},
    ]
    seq = ScoreSequence(**p.teacher_fields(), completion_ids=[5, 6])  # valid chat form on the wire
    assert seq.form == "chat"
    # the teacher server renders the chat form exactly like the student side with the same template
    same_system = PromptRenderer(tokenizer, PromptTemplates(**base, teacher="chat")).render(q)
    server_ids = render_chat(tokenizer, [ChatMessage(**m) for m in same_system.teacher_messages], "x", True)
    assert server_ids == expected


def test_template_validation(tokenizer):
    with pytest.raises(PromptDataError, match=r"student='Answer:' has no \{question\} placeholder"):
        PromptTemplates(student="Answer:")
    with pytest.raises(PromptDataError, match=r"teacher='chatml' has no \{question\}.*'same' or 'chat'"):
        PromptTemplates(teacher="chatml")
    with pytest.raises(PromptDataError, match="user_template"):
        PromptTemplates(user_template="Solve it")
    no_template = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_template.chat_template = None
    with pytest.raises(PromptDataError, match="has no chat template; set student to a plain template"):
        PromptRenderer(no_template, PromptTemplates(student="chat"))
    PromptRenderer(no_template, PromptTemplates(student="Q: {question}"))  # fine without one


def _ids(prompts: list[Prompt]) -> list[str]:
    return [p.prompt_id for p in prompts]


def test_stream_is_seeded_epoch_complete_and_resumes_exactly(tokenizer):
    table = table_of([f"question {i}" for i in range(10)])
    renderer = PromptRenderer(tokenizer, PromptTemplates(student="{question}"))
    full = PromptStream(table, renderer, seed=4)
    seq = _ids(full.take(3)) + _ids(full.take(4)) + _ids(full.take(6)) + _ids(full.take(9))
    assert (
        sorted(seq[:10]) == sorted(seq[10:20]) == [str(i) for i in range(10)]
    )  # each epoch is a permutation
    assert seq[:10] != seq[10:20] and seq[:10] != [str(i) for i in range(10)]
    assert full.position == DataPosition(epoch=2, index=2)
    assert _ids(PromptStream(table, renderer, seed=4).take(22)) == seq  # batch sizes do not matter
    assert _ids(PromptStream(table, renderer, seed=5).take(10)) != seq[:10]

    first = PromptStream(table, renderer, seed=4)
    first.take(3)
    first.take(4)
    saved = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptStream(table, renderer, seed=4)
    resumed.load_state_dict(saved)
    assert _ids(resumed.take(6)) + _ids(resumed.take(9)) == seq[7:]
    assert _ids(PromptStream(table, renderer, seed=4, position=DataPosition(1, 0)).take(10)) == seq[10:20]

    with pytest.raises(PromptDataError, match="checkpoint has seed=4 but this run has seed=9"):
        PromptStream(table, renderer, seed=9).load_state_dict(saved)
    with pytest.raises(PromptDataError, match="size=10 but this run has size=3"):
        PromptStream(table_of(["a", "b", "c"]), renderer, seed=4).load_state_dict(saved)
    with pytest.raises(PromptDataError, match="outside the data"):
        PromptStream(table, renderer, position=DataPosition(0, 11))
    with pytest.raises(PromptDataError, match="n must be at least 1"):
        full.take(0)


def test_unshuffled_stream_keeps_source_order_and_answers(tokenizer):
    table = PromptTable(["a?", "b?", "c?"], ["1", None, "3"], ["x", "y", "z"], "memory")
    stream = PromptStream(
        table, PromptRenderer(tokenizer, PromptTemplates(student="{question}")), shuffle=False
    )
    got = stream.take(4)
    assert [(p.prompt_id, p.question, p.answer) for p in got] == [
        ("x", "a?", "1"),
        ("y", "b?", None),
        ("z", "c?", "3"),
        ("x", "a?", "1"),
    ]
