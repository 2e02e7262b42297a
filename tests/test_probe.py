"""`student-trainer probe`: step-0 metrics per prompt template against a real `teacher-server` subprocess.

- The probe's numbers for each (student side, teacher side) pair equal a brute-force recomputation in this
  process: a plain transformers forward of both tiny models over the same prompt + completion ids (the
  teacher's chat rendering done here with its tokenizer), full-vocabulary log_softmax, top-k sets by sort.
- Teacher-aligned prompt: a teacher SFT'd on chat-rendered prompts and a student SFT'd on a plain
  'Q: {question}\\nA:' prompt (both format A, from the tiny student's init, seconds of SFT): the probe must
  pick the plain student side with the teacher's chat template on the teacher side, and `train` must accept
  the fragment it writes.
- The choice rule, candidate parsing, sampling and the table as pure functions.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from student_trainer.config import load_config
from student_trainer.data.prompts import PromptTable, load_prompts
from student_trainer.recipe.probe import (
    Candidate,
    ProbeError,
    ProbeReport,
    TemplateProbe,
    applicable,
    choose,
    format_table,
    make_candidates,
    run_probe,
    sample_table,
    write_fragment,
)

PLAIN = "Question: {question}\nAnswer:"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------- pure functions


def test_candidates_are_the_cross_product_in_order():
    got = make_candidates(["chat", PLAIN], ["same", "teacher-chat"])
    assert got == [
        Candidate("chat", "same"),
        Candidate("chat", "chat"),
        Candidate(PLAIN, "same"),
        Candidate(PLAIN, "chat"),
    ]
    assert [c.name for c in got] == ["chat", "chat / teacher-chat", repr(PLAIN), f"{PLAIN!r} / teacher-chat"]
    assert make_candidates(["chat", "chat"], ["chat", "teacher-chat"]) == [
        Candidate("chat", "chat")
    ]  # deduped
    assert Candidate("chat", "T: {question}").name == "chat / teacher 'T: {question}'"
    assert Candidate(PLAIN, "chat").data_section() == {"student_template": PLAIN, "teacher_prompt": "chat"}


@pytest.mark.parametrize(
    "templates, teacher, message",
    [
        (["Question:"], ["same"], "template 'Question:': use 'chat' or a string containing {question}"),
        (["chat"], ["teacher"], "teacher prompt 'teacher': use 'same', 'chat'"),
        ([], ["same"], "no candidate templates"),
        (
            ["teacher-chat"],
            ["same"],
            "template 'teacher-chat' is a teacher side: pass --teacher-prompt teacher-chat",
        ),
    ],
)
def test_bad_candidates_are_named(templates, teacher, message):
    with pytest.raises(ProbeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_candidates(templates, teacher)


def _result(name: str, overlap: float, kl: float, mass: float = 0.5) -> TemplateProbe:
    metrics = {"opd/overlap_ratio": overlap, "opd/reverse_kl_topk": kl, "opd/student_shared_mass": mass}
    metrics["opd/reverse_kl_k1"] = kl + 1.0
    return TemplateProbe(Candidate(name), metrics, samples=4, tokens=40, eos_rate=1.0, seconds=0.1)


def test_choose_highest_overlap_ties_by_kl():
    a, b, c = (
        _result("A {question}", 0.70, 0.9),
        _result("B {question}", 0.695, 0.4),
        _result("C {question}", 0.5, 0.1),
    )
    assert choose([a, b, c]) is b  # within 0.01 of the best overlap: lower KL wins
    assert choose([a, b, c], tie_tolerance=0.0) is a
    assert choose([a, b, c], tie_tolerance=1.0) is c
    d = _result("D {question}", 0.70, 0.9)
    assert choose([a, d], tie_tolerance=0.0) is a  # equal everything: the first listed
    e = _result("E {question}", 0.1, 0.9, mass=0.99)
    assert choose([a, e], 0.0, "opd/student_shared_mass") is e
    no_topk = TemplateProbe(
        Candidate("chat"), {"opd/overlap_ratio": 0.3, "opd/reverse_kl_k1": 0.2}, 1, 1, 1.0, 0.0
    )
    assert no_topk.reverse_kl == 0.2  # falls back to the sampled-token estimate
    with pytest.raises(ProbeError, match="tie_tolerance=-0.1 must be >= 0"):
        choose([a], tie_tolerance=-0.1)
    with pytest.raises(ProbeError, match="choose-by metric 'opd/loss'"):
        choose([a], 0.01, "opd/loss")
    with pytest.raises(ProbeError, match="opd/overlap_top1 was not measured for 'A {question}'"):
        choose([a], 0.01, "opd/overlap_top1")


def test_sample_table_is_seeded_and_keeps_source_order():
    table = PromptTable(
        [f"q{i}" for i in range(50)], [str(i) for i in range(50)], [f"id{i}" for i in range(50)], "x"
    )
    s1, s2, s3 = sample_table(table, 10, 0), sample_table(table, 10, 0), sample_table(table, 10, 1)
    assert s1.ids == s2.ids and s1.ids != s3.ids and len(s1) == 10
    rows = [int(i[2:]) for i in s1.ids]
    assert (
        rows == sorted(rows)
        and s1.questions == [f"q{r}" for r in rows]
        and s1.answers == [str(r) for r in rows]
    )
    assert sample_table(table, 80, 0) is table
    with pytest.raises(ProbeError, match="sample size 0 must be >= 1"):
        sample_table(table, 0, 0)


def test_applicable_skips_what_a_side_cannot_render():
    cands = make_candidates(["chat", PLAIN], ["same", "chat"])
    kept, notes = applicable(cands, student_has_chat=False, teacher_has_chat=True)
    assert kept == [Candidate(PLAIN, "same"), Candidate(PLAIN, "chat")] and len(notes) == 2
    kept, notes = applicable(cands, student_has_chat=True, teacher_has_chat=False)
    assert kept == [Candidate("chat", "same"), Candidate(PLAIN, "same")]
    assert all("the teacher has no chat template" in n for n in notes)


def test_table_and_fragment(tmp_path):
    a, b = _result("A {question}", 0.70, 0.9), _result("B {question}", 0.5, 0.4)
    del b.metrics["opd/reverse_kl_topk"]
    table = format_table([a, b], a).splitlines()
    assert table[1].startswith("* 'A {question}'") and table[2].startswith("  'B {question}'")
    assert "n/a" in table[2] and "0.700" in table[1]
    report = ProbeReport([a, b], a, 16, 0.01, {"urls": []})
    path = write_fragment(tmp_path / "probe.yaml", report)
    assert path.read_text().startswith("# student-trainer probe: chose 'A {question}' (overlap 0.700")
    cfg = load_config(path, ["model.student=s", "teacher.urls=[http://t:1]", "data.path=p.jsonl"])
    assert cfg.data.student_template == "A {question}" and cfg.data.teacher_prompt == "same"
    tricky = 'Frage: "{question}"\n\\boxed{} – über: #1'  # quotes, newline, backslash, unicode, '#'
    report = ProbeReport([_result(tricky, 0.7, 0.9)], _result(tricky, 0.7, 0.9), 16, 0.01, {})
    report.chosen = report.results[0]
    text = write_fragment(tmp_path / "tricky.yaml", report).read_text()
    assert yaml.safe_load(text) == {"data": {"student_template": tricky, "teacher_prompt": "same"}}
    assert text.count("\n") == 4  # the comment, "data:", one line per key


# ------------------------------------------------------------------------ brute force against the server


def _write_prompts(path, n, seed=0):
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 30), rng.randint(0, 30)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


def _log_softmax_at_completion(model, prompt_ids, completion_ids):
    """(T, V) float64 log-probs of the positions that predict each completion token (plain forward)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    p = len(prompt_ids)
    return torch.log_softmax(logits[p - 1 : p - 1 + len(completion_ids)], dim=-1)


def brute_force(kept, student, teacher, teacher_tok, k: int) -> dict[str, float]:
    """The probe's metrics from scratch: per token, both top-k sets by sort, then plain means."""
    from student_trainer.opd.losses import TEACHER_LOGPROB_FLOOR

    rows = {n: [] for n in ("overlap", "mass_s", "mass_t", "kl_topk", "k1", "h_gap")}
    for prompt, sample in kept:
        completion = sample.completion_ids.tolist()
        if prompt.teacher_messages is not None:  # teacher side rendered as the server does it
            text = teacher_tok.apply_chat_template(
                prompt.teacher_messages, add_generation_prompt=True, tokenize=False
            )
            t_prompt = teacher_tok(text, add_special_tokens=False)["input_ids"]
        else:
            t_prompt = prompt.teacher_ids
        lp = _log_softmax_at_completion(student, prompt.student_ids, completion)
        lq = _log_softmax_at_completion(teacher, t_prompt, completion)
        for t, y in enumerate(completion):
            s_top = set(torch.argsort(lp[t], descending=True)[:k].tolist())
            t_top = set(torch.argsort(lq[t], descending=True)[:k].tolist())
            shared = list(s_top & t_top)
            rows["overlap"].append(len(shared) / k)
            rows["mass_s"].append(lp[t, shared].exp().sum().item())
            rows["mass_t"].append(lq[t, shared].exp().sum().item())
            s = list(s_top)
            rows["kl_topk"].append(
                (lp[t, s].exp() * (lp[t, s] - lq[t, s].clamp_min(TEACHER_LOGPROB_FLOOR))).sum().item()
            )
            rows["k1"].append((lp[t, y] - lq[t, y]).item())
            rows["h_gap"].append((-(lp[t].exp() * lp[t]).sum() + (lq[t].exp() * lq[t]).sum()).item())
    return {n: sum(v) / len(v) for n, v in rows.items()}


KEYS = {
    "overlap": "opd/overlap_ratio",
    "mass_s": "opd/student_shared_mass",
    "mass_t": "opd/teacher_shared_mass",
    "kl_topk": "opd/reverse_kl_topk",
    "k1": "opd/reverse_kl_k1",
    "h_gap": "opd/entropy_gap",
}


def test_probe_numbers_equal_a_brute_force_recomputation(tiny_pair, hf_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, student_dir = tiny_pair
    prompts = _write_prompts(tmp_path / "prompts.jsonl", 20)
    cfg = load_config(
        None,
        [
            f"model.student={student_dir}",
            f"teacher.urls=[{hf_teacher.url}]",
            f"data.path={prompts}",
            "rollout.max_new_tokens=10",
            "rollout.n=2",
            "train.micro_batch_prompts=3",
            "loss.top_k=8",
        ],
    )
    sample = sample_table(load_prompts(prompts), 6, seed=0)
    report = run_probe(
        cfg,
        make_candidates(["chat", PLAIN], ["same", "chat"]),
        sample,
        keep_rollouts=True,
        log=lambda *a: None,
    )
    assert [r.candidate for r in report.results] == make_candidates(["chat", PLAIN], ["same", "chat"])
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
    for res in report.results:
        assert res.samples == 12 and len(res.rollouts) == 12  # 6 prompts x n=2, over 2 micro-batches
        expected = brute_force(res.rollouts, student, teacher, teacher_tok, k=8)
        for name, key in KEYS.items():
            assert res.metrics[key] == pytest.approx(expected[name], rel=1e-3, abs=1e-4), (
                res.candidate.name,
                key,
            )
    by_name = {r.candidate.name: r for r in report.results}
    # one tokenizer and one ChatML template on both sides: teacher-chat renders exactly the student's ids
    assert by_name["chat / teacher-chat"].metrics == pytest.approx(by_name["chat"].metrics, abs=1e-6)
    # a plain student prompt vs the teacher's chat rendering: same completions, another teacher context
    plain, aligned = by_name[repr(PLAIN)], by_name[f"{PLAIN!r} / teacher-chat"]
    assert plain.metrics["opd/reverse_kl_k1"] != pytest.approx(aligned.metrics["opd/reverse_kl_k1"], abs=1e-3)
    assert report.chosen is choose(report.results, 0.01)


# --------------------------------------------------------------------------- teacher-aligned prompt choice


@pytest.fixture(scope="module")
def aligned_pair(tmp_path_factory):
    """teacher: SFT'd on chat-rendered prompts; student: SFT'd on a plain prompt; both on format A."""
    from devkit.tiny_models import build_tiny_pair
    from student_trainer.recipe.sft import SFTConfig, run_sft

    root = tmp_path_factory.mktemp("aligned")
    _, init = build_tiny_pair(root / "tiny", seed=0)
    rng = random.Random(1)
    data = root / "a.jsonl"
    with data.open("w") as f:
        for _ in range(256):
            a, b = rng.randint(0, 30), rng.randint(0, 30)
            f.write(
                json.dumps(
                    {
                        "question": f"What is {a} + {b}?",
                        "completion": f"{a} + {b} = {a + b}. The answer is {a + b}.",
                    }
                )
                + "\n"
            )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = dict(
            batch_size=16, micro_batch=16, lr=5e-3, schedule="constant", plot=False, log_every=1000, seed=0
        )
        teacher = run_sft(
            SFTConfig(model=str(init), data=str(data), output_dir=str(root / "teacher"), steps=60, **common)
        )
        student = run_sft(
            SFTConfig(
                model=str(init),
                data=str(data),
                output_dir=str(root / "student"),
                steps=30,
                student_template="Q: {question}\nA:",
                **common,
            )
        )
    finally:
        torch.set_num_threads(threads)
    return teacher, student, _write_prompts(root / "prompts.jsonl", 40, seed=5)


def test_probe_command_picks_the_teacher_aligned_prompt(aligned_pair, tmp_path):
    from devkit.teacher_process import TeacherProcess

    teacher, student, prompts = aligned_pair
    env = {**os.environ, **ONE_THREAD}
    plain = "Q: {question}\nA:"
    with TeacherProcess(teacher, env=ONE_THREAD) as server:
        cmd = [
            sys.executable,
            "-m",
            "student_trainer",
            "probe",
            "--student",
            str(student),
            "--teacher-url",
            server.url,
            "--data",
            str(prompts),
            "--template",
            "chat",
            "--template",
            plain,
            "--max-new-tokens",
            "24",
            "--sample",
            "16",
            "--out",
            str(tmp_path / "probe.yaml"),
            "--report",
            str(tmp_path / "probe.json"),
            "--write-config",
            str(tmp_path / "full.yaml"),
            "train.micro_batch_prompts=16",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "probe.json").read_text())
    results = {r["name"]: r for r in doc["results"]}
    aligned = f"{plain!r} / teacher-chat"
    assert doc["chosen"] == aligned, {n: (r["overlap_ratio"], r["reverse_kl"]) for n, r in results.items()}
    # measured: overlap 0.465 vs 0.353 (plain prompt on both sides) and 0.313 (chat on both sides)
    others = [results[repr(plain)], results["chat"], results["chat / teacher-chat"]]
    assert all(results[aligned]["overlap_ratio"] > r["overlap_ratio"] + 0.05 for r in others)
    assert all(results[aligned]["reverse_kl"] < r["reverse_kl"] for r in others)
    assert f"* {aligned}" in proc.stdout and "train with: student-trainer train --config" in proc.stdout
    assert yaml.safe_load((tmp_path / "probe.yaml").read_text()) == {
        "data": {"student_template": plain, "teacher_prompt": "chat"}
    }
    # train accepts both forms: the fragment plus overrides, and the full config
    for argv in (
        [
            "--config",
            str(tmp_path / "probe.yaml"),
            f"model.student={student}",
            "teacher.urls=[http://x:1]",
            f"data.path={prompts}",
        ],
        ["--config", str(tmp_path / "full.yaml")],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "student_trainer", "train", *argv, "--print-config"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        data = json.loads(out.stdout)["data"]
        assert data["student_template"] == plain and data["teacher_prompt"] == "chat"


def test_probe_command_errors(tmp_path):
    base = [sys.executable, "-m", "student_trainer", "probe"]
    proc = subprocess.run(
        [*base, "--student", "s", "--data", "d.jsonl"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "no teacher: set teacher.urls" in proc.stdout
    proc = subprocess.run(
        [
            *base,
            "--student",
            "s",
            "--data",
            "d.jsonl",
            "--teacher-url",
            "http://127.0.0.1:9",
            "--template",
            "Q:",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2 and "template 'Q:': use 'chat' or a string containing {question}" in proc.stdout
    )
