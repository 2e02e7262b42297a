"""Rollout filters: detectors against brute-force versions, each filter on constructed records, the command."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from student_trainer.cli import main as cli_main
from student_trainer.recipe.filters import (
    FilterConfig,
    check_record,
    filter_rollouts,
    find_tail_loop,
    repeated_ngram_fraction,
    tail_repeats,
)

EOS = 2


def _brute_repeated_fraction(ids: list[int], n: int) -> float:
    windows = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not windows:
        return 0.0
    seen, repeated = set(), 0
    for w in windows:
        repeated += w in seen
        seen.add(w)
    return repeated / len(windows)


def _brute_tail_repeats(ids: list[int], p: int) -> int:
    if len(ids) < p:
        return 0
    block, k = ids[len(ids) - p :], 1
    while len(ids) >= (k + 1) * p and ids[len(ids) - (k + 1) * p : len(ids) - k * p] == block:
        k += 1
    return k


@pytest.mark.parametrize("seed", range(20))
def test_detectors_match_brute_force(seed):
    rng = random.Random(seed)
    # a small alphabet plus planted loops makes both repeats and partial repeats common
    ids = [rng.randrange(4) for _ in range(rng.randrange(0, 60))]
    loop = [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
    ids += loop * rng.randrange(0, 6) + loop[: rng.randrange(len(loop) + 1)]
    arr = np.array(ids, dtype=np.int64)
    for n in (1, 2, 3, 5, 8):
        assert repeated_ngram_fraction(arr, n) == pytest.approx(_brute_repeated_fraction(ids, n))
    got = tail_repeats(arr, 12).tolist()
    assert got == [_brute_tail_repeats(ids, p) for p in range(1, 13)]


def test_detectors_known_values():
    assert repeated_ngram_fraction(np.array([1, 2, 3, 1, 2, 3]), 3) == pytest.approx(1 / 4)
    assert repeated_ngram_fraction(np.array([1, 2]), 3) == 0.0
    assert tail_repeats(np.array([9, 1, 2, 1, 2, 1, 2]), 3).tolist() == [1, 3, 1]
    assert find_tail_loop(np.array([5] + [7, 8] * 20), 4, 32, 8) == (2, 20)
    assert find_tail_loop(np.array([5] + [7, 8] * 10), 4, 32, 8) is None  # 20 tokens < span 32
    assert find_tail_loop(np.array([5] + [7, 8] * 20), 0, 32, 8) is None  # disabled


def _rec(ids, finish="stop", text=None):
    text = text if text is not None else " ".join(f"w{t}" for t in ids)
    return {"prompt": "q", "completion": text, "completion_ids": list(ids), "finish_reason": finish}


NATURAL = list(range(10, 60))  # 50 distinct tokens: nothing repeats


def test_each_filter_on_constructed_records():
    config = FilterConfig(min_tokens=5, eos_token_ids=(EOS,))
    assert check_record(_rec(NATURAL + [EOS]), config) == []
    assert check_record(_rec(NATURAL, finish="length"), config) == ["incomplete: finish_reason=length"]
    assert check_record(_rec([EOS], text="   "), config)[0] == "empty: blank completion"
    assert check_record(_rec([11, 12, EOS]), config) == [
        "too_short: 2 tokens < min_tokens 5"
    ]  # EOS not counted
    # a 3-token loop repeated 12 times (36 tokens) before EOS
    looped = check_record(_rec(NATURAL[:20] + [7, 8, 9] * 12 + [EOS]), config)
    assert looped == ["repetition: ends with a 3-token pattern repeated 12 times"]
    # a loop in the middle that recovers: caught by the repeated 16-gram fraction, not the tail detector
    middle = NATURAL[:10] + list(range(100, 120)) * 5 + NATURAL[10:20] + [EOS]
    reasons = check_record(_rec(middle), config)
    frac = _brute_repeated_fraction(middle[:-1], 16)
    assert reasons == [f"repetition: {frac:.2f} of 16-grams repeated > max 0.3"]
    # a short legitimate run ("0000" in a number) stays
    assert check_record(_rec(NATURAL + [0, 0, 0, 0, 0, 0] + [EOS]), config) == []


def test_several_reasons_and_chars():
    config = FilterConfig(min_chars=200, eos_token_ids=(EOS,))  # the text is 119 chars
    reasons = check_record(_rec([7] * 40, finish="length"), config)
    assert [r.split(":")[0] for r in reasons] == ["too_short", "incomplete", "repetition"]


def test_eos_inference_without_finish_reason():
    config = FilterConfig(eos_token_ids=(EOS,))
    no_finish = {"completion": "a b c", "completion_ids": [11, 12, 13]}
    assert check_record(no_finish, config) == ["incomplete: no EOS token at the end"]
    assert check_record({**no_finish, "completion_ids": [11, 12, EOS]}, config) == []
    with pytest.raises(ValueError, match="no 'finish_reason' field and no EOS ids"):
        check_record(no_finish, FilterConfig())
    assert check_record(no_finish, FilterConfig(drop_incomplete=False)) == []


def test_without_eos_ids_a_stop_sample_drops_its_stop_token():
    # the last id of a "stop" sample is its stop token: with it, the 3-gram tail would be broken
    ids = NATURAL[:10] + [7, 8, 9] * 12 + [EOS]
    assert check_record(_rec(ids), FilterConfig())[0].startswith("repetition: ends with a 3-token")


def test_text_only_records_use_words():
    config = FilterConfig(min_tokens=3)
    rec = {"completion": "so the answer is", "finish_reason": "stop"}
    assert check_record(rec, config) == []
    assert check_record({**rec, "completion": "yes"}, config) == ["too_short: 1 tokens < min_tokens 3"]
    loop = {"completion": "intro " + "again and " * 20, "finish_reason": "stop"}
    assert check_record(loop, config) == ["repetition: ends with a 2-token pattern repeated 20 times"]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="missing text field 'completion'"):
        check_record({"text": "x"}, FilterConfig(), where="record 3")
    with pytest.raises(ValueError, match="must be a list of token ids"):
        check_record({"completion": "x", "completion_ids": "1 2"}, FilterConfig())
    with pytest.raises(ValueError, match=r"max_repeated_ngram_fraction must be in \[0, 1\] \(got 1.5\)"):
        FilterConfig(max_repeated_ngram_fraction=1.5)
    with pytest.raises(ValueError, match="ngram_size must be >= 1"):
        FilterConfig(ngram_size=0)


def test_filter_rollouts_counts():
    config = FilterConfig(min_tokens=5, eos_token_ids=(EOS,))
    records = [
        _rec(NATURAL + [EOS]),
        _rec(NATURAL, finish="length"),
        _rec([7] * 40, finish="length"),  # incomplete AND repetitive
        _rec([EOS], text=""),
        _rec(NATURAL[:20] + [7, 8, 9] * 12 + [EOS]),
        _rec(NATURAL[5:] + [EOS]),
    ]
    result = filter_rollouts(records, config)
    assert result.kept == [records[0], records[5]]  # unchanged
    assert result.flagged == {"empty": 1, "too_short": 0, "incomplete": 2, "repetition": 2}
    assert result.first == {"empty": 1, "too_short": 0, "incomplete": 2, "repetition": 1}
    assert [r["filter_reasons"] for r in result.removed][1] == [
        "incomplete: finish_reason=length",
        "repetition: ends with a 1-token pattern repeated 40 times",
    ]
    assert "kept 2 / 6, removed 4" in result.summary()


def test_filter_command(tmp_path, capsys):
    src = tmp_path / "rollouts.jsonl"
    records = [_rec(NATURAL + [EOS]), _rec(NATURAL, finish="length"), _rec([11, EOS])]
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "kept.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["filter", str(src), "--out", str(out), "--min-tokens", "3", "--eos-id", str(EOS)])
    assert exit_info.value.code == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    removed = [json.loads(line) for line in (tmp_path / "kept.removed.jsonl").read_text().splitlines()]
    assert kept == [records[0]]
    assert [r["filter_reasons"] for r in removed] == [
        ["incomplete: finish_reason=length"],
        ["too_short: 1 tokens < min_tokens 3"],
    ]
    printed = capsys.readouterr().out
    assert "incomplete" in printed and "kept 1 / 3, removed 2" in printed
