"""Eval on the tiny local models (real from_pretrained + generate): left-padded batched greedy decoding against
a brute-force greedy loop, the scoring machinery on constructed problems whose answers are known, pass@1
over samples, summary statistics, RNG/mode restoration and the ``eval`` command."""

from __future__ import annotations

import json

import pytest
import torch

from student_trainer.cli import main as cli_main
from student_trainer.evaluate.run import (
    EvalConfig,
    Problem,
    completion_lengths,
    evaluate,
    left_pad,
    load_model,
    load_problems,
    render_prompts,
    summarize,
    write_results,
)

QUESTIONS = [
    "What is 3 + 4?",
    "Compute 12 * 7. First multiply, then check the product and write the final answer.",
    "the sum",
    "Question: if x = 5 and y = 2, find x - y.",
    "Let us add the digits of 999.",
]
WHOLE_TEXT = r"regex:(?s)(.+)"  # the whole completion is "the answer": lets a test choose a certain reference


@pytest.fixture(scope="module")
def student(tiny_pair):
    return load_model(tiny_pair[1])


def _greedy_brute_force(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding written out: full forward (no cache, no padding) and argmax, one token at a time."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new])).logits[0, -1]
            new.append(int(logits.argmax()))
            if new[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_left_pad_and_lengths():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)
    new = torch.tensor([[4, 2, 0, 0], [4, 5, 6, 7], [2, 9, 2, 0], [3, 9, 9, 9]])
    lengths, finished = completion_lengths(new, eos_ids=[2, 9])
    assert lengths.tolist() == [2, 4, 1, 2] and finished.tolist() == [True, False, True, True]


def test_render_prompts(student):
    _, tokenizer = student
    chat = render_prompts(tokenizer, ["hi"], None, system_prompt="be brief")
    assert chat == [
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ]
    # str.replace, so literal braces need no escaping
    assert render_prompts(tokenizer, ["1+1"], r"Q: {question} put it in \boxed{}") == [
        r"Q: 1+1 put it in \boxed{}"
    ]


def test_batched_greedy_matches_brute_force(student):
    model, tokenizer = student
    problems = [Problem(q, "0") for q in QUESTIONS]
    config = EvalConfig(
        greedy=True, max_new_tokens=12, batch_size=4, template="{question}", extractor=WHOLE_TEXT
    )
    report = evaluate(model, tokenizer, problems, config)
    got = [item.samples[0].text for item in report.items]
    assert got == [_greedy_brute_force(model, tokenizer, q, 12) for q in QUESTIONS]
    # the chat template path: same check on the rendered prompt
    chat = evaluate(
        model, tokenizer, problems[:2], EvalConfig(greedy=True, max_new_tokens=8, extractor=WHOLE_TEXT)
    )
    rendered = render_prompts(tokenizer, QUESTIONS[:2], None)
    assert [i.samples[0].text for i in chat.items] == [
        _greedy_brute_force(model, tokenizer, p, 8) for p in rendered
    ]


def test_scoring_with_certain_answers(student):
    """A random model scores ~0 on real problems, so the references here are what greedy decoding produces
    (computed first, independently): those items must score 1, the others 0."""
    model, tokenizer = student
    produced = [_greedy_brute_force(model, tokenizer, q, 10).strip() for q in QUESTIONS]
    assert all(produced), "the tiny model produced an empty completion; pick other questions"
    problems = [
        Problem(q, produced[i] if i % 2 == 0 else produced[i] + " not this") for i, q in enumerate(QUESTIONS)
    ]
    config = EvalConfig(
        greedy=True, max_new_tokens=10, batch_size=3, template="{question}", extractor=WHOLE_TEXT
    )
    report = evaluate(model, tokenizer, problems, config)
    assert [item.pass_at_1 for item in report.items] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert report.summary.accuracy == pytest.approx(3 / 5)
    assert [item.samples[0].answer for item in report.items] == produced
    # per-item record
    d = report.items[1].to_dict()
    assert d["reference"] == produced[1] + " not this" and d["correct"] == [False] and d["pass@1"] == 0.0


def test_sampling_pass_at_1_and_summary(student):
    model, tokenizer = student
    base = EvalConfig(n=6, temperature=1.0, max_new_tokens=6, batch_size=5, template="{question}", seed=7)
    config = EvalConfig(**{**base.__dict__, "extractor": WHOLE_TEXT})
    first = evaluate(model, tokenizer, [Problem(q, "x") for q in QUESTIONS[:2]], config)
    texts = [s.text for s in first.items[0].samples]
    target = texts[0].strip()
    # same seed -> same samples; reference = one sampled text, so pass@1 = its frequency among the samples
    problems = [Problem(QUESTIONS[0], target), Problem(QUESTIONS[1], "never produced")]
    again = evaluate(model, tokenizer, problems, config)
    assert [s.text for s in again.items[0].samples] == texts
    expected = sum(t.strip() == target for t in texts) / 6
    assert again.items[0].pass_at_1 == pytest.approx(expected) and expected >= 1 / 6
    assert again.summary.accuracy == pytest.approx(expected / 2)
    # summary statistics against the per-sample values
    samples = [s for item in again.items for s in item.samples]
    assert again.summary.n_samples == 12 and again.summary.n_items == 2
    assert again.summary.mean_length == pytest.approx(sum(s.num_tokens for s in samples) / 12)
    assert again.summary.eos_rate == pytest.approx(sum(s.finished for s in samples) / 12)
    assert all(s.num_tokens <= 6 and (s.finished or s.num_tokens == 6) for s in samples)
    assert summarize(again.items).accuracy == again.summary.accuracy


def test_rng_and_train_mode_restored(student):
    model, tokenizer = student
    model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate(
        model, tokenizer, [Problem("the sum", "1")], EvalConfig(n=2, max_new_tokens=4, template="{question}")
    )
    assert torch.equal(torch.rand(3), expected)  # the trainer's random stream is untouched
    assert model.training
    model.eval()


def test_config_errors(student):
    with pytest.raises(
        ValueError, match="greedy decoding gives one sample per problem: set n=1 \\(got n=4\\)"
    ):
        EvalConfig(greedy=True, n=4)
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling \\(got 0.0\\)"):
        EvalConfig(temperature=0.0)
    with pytest.raises(ValueError, match="template must contain '\\{question\\}'"):
        EvalConfig(template="no placeholder")
    with pytest.raises(ValueError, match="unknown kind 'maths'"):
        EvalConfig(extractor="maths")
    with pytest.raises(ValueError, match="pass the tokenizer"):
        evaluate(student[0], None, [Problem("q", "a")])


def test_load_problems(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q1", "answer": 5}\n{"prompt": "q2", "answer": "1/2"}\n')
    assert load_problems(path) == [Problem("q1", "5"), Problem("q2", "1/2")]
    assert load_problems(path, limit=1) == [Problem("q1", "5")]
    with pytest.raises(ValueError, match="record 0 has no answer field 'solution'"):
        load_problems(path, answer_field="solution")


def test_eval_command(tiny_pair, student, tmp_path, capsys):
    model, tokenizer = student
    produced = _greedy_brute_force(model, tokenizer, QUESTIONS[0], 8).strip()
    data = tmp_path / "problems.jsonl"
    rows = [{"question": QUESTIONS[0], "answer": produced}, {"question": QUESTIONS[2], "answer": "nope"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.jsonl"
    argv = ["eval", "--model", str(tiny_pair[1]), "--data", str(data), "--greedy", "--max-new-tokens", "8"]
    argv += ["--template", "{question}", "--extractor", WHOLE_TEXT, "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in results] == [[True], [False]]
    assert results[0]["answers"] == [produced]
    printed = capsys.readouterr().out
    assert "accuracy 0.5000 | items 2 | samples 2" in printed
    assert '"eval/accuracy": 0.5' in printed


def test_write_results_roundtrip(student, tmp_path):
    model, tokenizer = student
    report = evaluate(model, tokenizer, [Problem("the sum", "1")], EvalConfig(greedy=True, max_new_tokens=3))
    write_results(report, tmp_path / "r.jsonl")
    (row,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert set(row) == {
        "index",
        "question",
        "reference",
        "pass@1",
        "samples",
        "answers",
        "correct",
        "num_tokens",
        "finished",
    }
    assert row["num_tokens"][0] <= 3
