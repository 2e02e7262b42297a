"""`sft` reads TRL's dataset formats (prompt-completion, conversational, conversational prompt-completion) and
`generate`'s rollouts, detected per dataset; the loss falls on the assistant turn only, checked against a mask
computed here independently (character offsets of the rendered conversation) and against the logged loss."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.recipe.sft import SFT_FORMATS, SFTConfig, SFTDataError, detect_format, load_examples

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8. The answer is 8."},
]
TURN_START = "<|im_start|>assistant\n"  # the tiny tokenizer's ChatML generation prompt


@pytest.fixture(scope="module")
def student(tiny_pair):
    return tiny_pair[1]


@pytest.fixture(scope="module")
def tok(student):
    return AutoTokenizer.from_pretrained(student)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples_of(tmp_path, tok, rows, **cfg):
    data = write(tmp_path / "d.jsonl", rows)
    return load_examples(SFTConfig(model="unused", data=str(data), **cfg), tok)


def loss_mask(tok, messages) -> tuple[list[int], list[bool]]:
    """Independently of sft.py: the conversation's ids and, per token, whether it lies in the LAST assistant
    turn (by character offsets of the rendered text, found by searching the text for the last turn start)."""
    text = tok.apply_chat_template(messages, tokenize=False)
    boundary = text.rfind(TURN_START) + len(TURN_START)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [start >= boundary for start, _ in enc["offset_mapping"]]


def test_conversational_last_assistant_turn_is_the_target(tmp_path, tok):
    ((prompt, completion),) = examples_of(tmp_path, tok, [{"messages": CONVERSATION}])
    ids, mask = loss_mask(tok, CONVERSATION)
    assert prompt + completion == ids
    assert [i for i, m in zip(ids, mask, strict=True) if m] == completion
    assert not any(mask[: len(prompt)]) and all(mask[len(prompt) :])
    assert tok.decode(completion) == "4 + 4 = 8. The answer is 8.<|im_end|>\n"
    # the earlier assistant turn is context, not target
    assert "2 + 3 = 5." in tok.decode(prompt) and tok.decode(prompt).endswith(TURN_START)


def test_conversational_prompt_completion_equals_the_conversation(tmp_path, tok):
    record = {"prompt": CONVERSATION[:-1], "completion": CONVERSATION[-1:]}
    assert examples_of(tmp_path, tok, [record]) == examples_of(tmp_path, tok, [{"messages": CONVERSATION}])


def test_standard_prompt_completion_is_tokenized_as_is_with_eos(tmp_path, tok):
    rows = [
        {"prompt": "Question: 1 + 1?\nAnswer:", "completion": " 2"},
        {"prompt": "Q: 3 + 3?", "completion": " 6"},
    ]
    examples = examples_of(tmp_path, tok, rows)
    for (prompt, completion), row in zip(examples, rows, strict=True):
        assert prompt == tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert completion == tok(row["completion"], add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]


def test_rollouts_stay_as_they_were(tmp_path, tok):
    rows = [
        {"question": "What is 1 + 2?", "completion": "3", "finish_reason": "length"},  # cut: no EOS added
        {"question": "What is 2 + 2?", "completion": "4", "finish_reason": "stop"},
        {"prompt_ids": [5, 6], "completion_ids": [7, 8]},  # same format (prompt_ids + completion_ids)
    ]
    (p0, c0), (_, c1), (p2, c2) = examples_of(tmp_path, tok, rows)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True, tokenize=False
    )
    assert p0 == tok(chat, add_special_tokens=False)["input_ids"]
    assert c0 == tok("3", add_special_tokens=False)["input_ids"] and c1[-1] == tok.eos_token_id
    assert (p2, c2) == ([5, 6], [7, 8])
    assert detect_format(rows[0], SFTConfig(model="", data="x")).name == "rollouts"


def test_detection_errors_list_the_formats(tmp_path, tok):
    with pytest.raises(SFTDataError) as err:
        examples_of(tmp_path, tok, [{"text": "just text"}])
    assert "fits none of the SFT formats" in str(err.value) and "['text']" in str(err.value)
    for fmt in SFT_FORMATS:
        assert fmt.name in str(err.value)
    mixed = [{"prompt": "a", "completion": "b"}, {"messages": CONVERSATION}]
    with pytest.raises(SFTDataError, match=r"record 1 does not fit the format 'prompt_completion'"):
        examples_of(tmp_path, tok, mixed)
    with pytest.raises(SFTDataError, match=r"must end with the assistant turn.*'user'\]"):
        examples_of(tmp_path, tok, [{"messages": CONVERSATION[:-1]}])
    with pytest.raises(SFTDataError, match="'completion' must start with an assistant message"):
        examples_of(tmp_path, tok, [{"prompt": CONVERSATION[:2], "completion": [CONVERSATION[1]]}])


def test_chat_template_kwargs_and_system_prompt_reach_the_rendering(tmp_path, student):
    tok = AutoTokenizer.from_pretrained(student)
    tok.chat_template = (
        "{% if persona is defined %}{{ 'You are ' + persona + '.\\n' }}{% endif %}" + tok.chat_template
    )
    rows = [{"messages": CONVERSATION[1:3]}]
    ((plain_p, plain_c),) = examples_of(tmp_path, tok, rows)
    kwargs = {"chat_template_kwargs": {"persona": "a calculator"}, "system_prompt": "Be exact."}
    ((p, c),) = examples_of(tmp_path, tok, rows, **kwargs)
    assert tok.decode(p).startswith("You are a calculator.\n<|im_start|>system\nBe exact.<|im_end|>")
    assert c == plain_c and len(p) > len(plain_p)  # the variable changed the prompt, the target is the turn


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(tmp_path, student):
    """A generation prompt the conversation does not contain (a think block added only there) would put the
    loss on the wrong tokens: refused with both texts shown."""
    tok = AutoTokenizer.from_pretrained(student)
    tok.chat_template = tok.chat_template.replace(
        "{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_start|>assistant\\n<think></think>' }}"
    )
    assert "<think>" in tok.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True, tokenize=False)
    with pytest.raises(
        SFTDataError, match="does not render the prompt .* as the start of the whole conversation"
    ):
        examples_of(tmp_path, tok, [{"messages": CONVERSATION[1:3]}])


def test_datasets_directory_and_split(tmp_path, tok):
    import datasets

    train = [{"messages": CONVERSATION[1:3]}]
    test = [{"messages": CONVERSATION}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(tmp_path / "ds"))
    cfg = SFTConfig(model="", data=str(tmp_path / "ds"), split="test")
    assert load_examples(cfg, tok) == examples_of(tmp_path, tok, test)
    with pytest.raises(ValueError, match=r"no split 'validation'; available splits: \['train', 'test'\]"):
        load_examples(SFTConfig(model="", data=str(tmp_path / "ds"), split="validation"), tok)


def test_the_logged_loss_is_the_cross_entropy_of_the_assistant_tokens_only(tmp_path, student, tok):
    """One step of run_sft logs its loss before the update: it must equal the token-mean cross-entropy of the
    base model over exactly the tokens of the independent mask."""
    from student_trainer.recipe.sft import run_sft

    conversations = [
        CONVERSATION,
        CONVERSATION[1:3],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    ]
    data = write(tmp_path / "c.jsonl", [{"messages": m} for m in conversations])
    out = tmp_path / "sft"
    cfg = SFTConfig(
        model=str(student),
        data=str(data),
        output_dir=str(out),
        steps=1,
        batch_size=3,
        micro_batch=2,
        plot=False,
    )
    run_sft(cfg)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["sft/loss"]
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for messages in conversations:
        ids, mask = loss_mask(tok, messages)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        for t in range(1, len(ids)):
            if mask[t]:
                nll -= float(logp[t - 1, ids[t]])
                count += 1
    assert count > 0
    assert logged == pytest.approx(nll / count, rel=1e-5)
