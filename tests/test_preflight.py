"""`student-trainer preflight` on constructed pairs (real `teacher-server` subprocesses, real OPD steps), and
the verdict rules as a pure function.

Pairs, all from the tiny student's init and its tokenizer, built here in seconds with `run_sft` (seeded,
constant lr, one thread): a teacher SFT'd 60 steps on format A ("a + b = s. The answer is s."), a student
SFT'd 40 steps on format B ("sum <s reversed> reversed ; done"), and a less-trained copy of the teacher
(the first 15 of its 60 steps: same data order and lr). Expected verdicts:

- format-B student vs format-A teacher: needs cold start (shared mass ~0.01, flat at lr 1e-4);
- the 15-step copy vs the 60-step teacher: compatible (shared mass ~0.7);
- a model against itself served as the teacher: teacher brings nothing new (overlap 1, KL 0).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from devkit.teacher_process import TeacherProcess
from student_trainer.config import load_config
from student_trainer.data.prompts import load_prompts
from student_trainer.recipe.preflight import (
    COMPATIBLE,
    NEEDS_COLD_START,
    NOTHING_NEW,
    Measures,
    PreflightError,
    Thresholds,
    decide,
    run_preflight,
    slope_per_step,
)
from student_trainer.recipe.probe import make_candidates, sample_table

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: one thread is several times faster on a busy machine


# ---------------------------------------------------------------------------------- verdict (pure function)


T = Thresholds()


@pytest.mark.parametrize(
    "measures, label",
    [
        (Measures(overlap_ratio=1.0, alignment=0.99, reverse_kl=0.0, slope=0.0), NOTHING_NEW),
        (Measures(overlap_ratio=0.9, alignment=0.6, reverse_kl=0.05, slope=None), NOTHING_NEW),  # both bounds
        (Measures(overlap_ratio=0.95, alignment=0.95, reverse_kl=0.3, slope=0.0), COMPATIBLE),  # KL not tiny
        (Measures(overlap_ratio=0.89, alignment=0.95, reverse_kl=0.01, slope=0.0), COMPATIBLE),  # not near 1
        (Measures(overlap_ratio=0.1, alignment=0.01, reverse_kl=12.0, slope=0.0002), NEEDS_COLD_START),
        (Measures(overlap_ratio=0.1, alignment=0.01, reverse_kl=12.0, slope=None), NEEDS_COLD_START),
        (Measures(overlap_ratio=0.1, alignment=0.3, reverse_kl=2.0, slope=0.0099), NEEDS_COLD_START),
        (Measures(overlap_ratio=0.1, alignment=0.3, reverse_kl=2.0, slope=0.01), COMPATIBLE),  # rising
        (
            Measures(overlap_ratio=0.1, alignment=0.3, reverse_kl=2.0, slope=0.03, final=0.55),
            COMPATIBLE,
        ),  # crossed
        (
            Measures(overlap_ratio=0.1, alignment=0.3, reverse_kl=2.0, slope=0.03, final=0.45),
            NEEDS_COLD_START,
        ),
        (
            Measures(overlap_ratio=0.4, alignment=0.5, reverse_kl=0.7, slope=-0.05),
            COMPATIBLE,
        ),  # bound: not low
    ],
)
def test_decide_rules_and_boundaries(measures, label):
    verdict = decide(measures, T)
    assert verdict.label == label
    assert verdict.reasons and all(isinstance(r, str) and r for r in verdict.reasons)


def test_decide_uses_the_given_thresholds():
    m = Measures(overlap_ratio=0.3, alignment=0.3, reverse_kl=1.0, slope=0.0)
    assert decide(m, T).label == NEEDS_COLD_START
    assert decide(m, Thresholds(low_alignment=0.2)).label == COMPATIBLE
    assert decide(m, Thresholds(min_slope=-0.1)).label == COMPATIBLE
    assert decide(m, Thresholds(nothing_new_overlap=0.3, nothing_new_kl=1.0)).label == NOTHING_NEW
    reason = decide(m, Thresholds(metric="opd/overlap_ratio")).reasons[0]
    assert "overlap_ratio 0.300 < 0.5" in reason and "slope +0.0000/step < 0.01" in reason


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"low_alignment": 1.5}, "low_alignment=1.5 must be in [0, 1]"),
        ({"nothing_new_overlap": -0.1}, "nothing_new_overlap=-0.1 must be in [0, 1]"),
        ({"nothing_new_kl": -1.0}, "nothing_new_kl=-1.0 must be >= 0"),
        ({"min_slope": float("nan")}, "min_slope=nan must be finite"),
        ({"metric": "opd/loss"}, "metric='opd/loss' is not one of"),
    ],
)
def test_threshold_errors_name_the_value(kwargs, message):
    with pytest.raises(PreflightError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Thresholds(**kwargs)


def test_slope_matches_the_least_squares_formula():
    rng = np.random.default_rng(0)
    for n in (2, 3, 8):
        y = rng.normal(size=n)
        x = np.arange(n, dtype=float)
        expected = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        assert slope_per_step(y.tolist()) == pytest.approx(expected, abs=1e-12)
    assert slope_per_step([0.2, 0.3, 0.4, 0.5]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least 2 steps"):
        slope_per_step([0.5])


# ------------------------------------------------------------------------------------ constructed pairs


def _format_a(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}. The answer is {a + b}."


def _format_b(a: int, b: int) -> str:
    return f"sum {str(a + b)[::-1]} reversed ; done"


def _write_sft_data(path: Path, fmt, seed: int, n: int = 256) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 30), rng.randint(0, 30)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "completion": fmt(a, b)}) + "\n")
    return path


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, one_thread):
    """teacher_a (60 SFT steps on format A), student_a_less (its first 15 steps), student_b (40 on B)."""
    from devkit.tiny_models import build_tiny_pair
    from student_trainer.recipe.sft import SFTConfig, run_sft

    root = tmp_path_factory.mktemp("preflight_pairs")
    _, init = build_tiny_pair(root / "tiny", seed=0)
    data_a = _write_sft_data(root / "a.jsonl", _format_a, seed=1)
    data_b = _write_sft_data(root / "b.jsonl", _format_b, seed=2)
    out = {}
    for name, data, steps in (
        ("teacher_a", data_a, 60),
        ("student_a_less", data_a, 15),
        ("student_b", data_b, 40),
    ):
        out[name] = run_sft(
            SFTConfig(
                model=str(init),
                data=str(data),
                output_dir=str(root / name),
                steps=steps,
                batch_size=16,
                micro_batch=16,
                lr=5e-3,
                schedule="constant",
                plot=False,
                log_every=1000,
                seed=0,
            )
        )
    prompts = root / "prompts.jsonl"
    rng = random.Random(3)
    with prompts.open("w") as f:
        for _ in range(48):
            a, b = rng.randint(0, 30), rng.randint(0, 30)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    out["prompts"] = prompts
    return out


@pytest.fixture(scope="module")
def servers(pairs):
    """teacher_a and student_b (the latter for the student-against-itself case), started together."""
    from concurrent.futures import ThreadPoolExecutor

    procs = {
        n: TeacherProcess(pairs[n], "--max-top-k", "32", env=ONE_THREAD) for n in ("teacher_a", "student_b")
    }
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: p.start(), procs.values()))
        yield {n: p.url for n, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()


def _config(student: Path, url: str, prompts: Path):
    return load_config(
        None,
        [
            f"model.student={student}",
            f"teacher.urls=[{url}]",
            f"data.path={prompts}",
            "rollout.max_new_tokens=24",
            "optim.lr=1e-4",
            "train.micro_batch_prompts=8",
            "logging.progress_bar=false",
            "logging.plot=false",
            "train.sample_every=0",
        ],
    )


@pytest.mark.parametrize(
    "student, teacher, expected",
    [
        ("student_b", "teacher_a", NEEDS_COLD_START),
        ("student_a_less", "teacher_a", COMPATIBLE),
        ("student_b", "student_b", NOTHING_NEW),
    ],
)
def test_verdicts_on_constructed_pairs(pairs, servers, tmp_path, student, teacher, expected):
    cfg = _config(pairs[student], servers[teacher], pairs["prompts"])
    sample = sample_table(load_prompts(cfg.data.path), 16, seed=0)
    report = run_preflight(
        cfg, make_candidates(["chat"], ["same"]), sample, steps=4, workdir=tmp_path, log=lambda *a: None
    )
    m = report.measures
    assert report.verdict.label == expected, (report.verdict, m)
    # step 1 of the OPD run is measured on exactly the probe's rollouts: the same numbers
    probe, step1 = report.probe.chosen.metrics, report.steps[0]
    for key in ("opd/overlap_ratio", "opd/student_shared_mass", "opd/reverse_kl_topk", "opd/reverse_kl_k1"):
        assert step1[key] == pytest.approx(probe[key], rel=1e-4, abs=1e-5), key
    assert [r["step"] for r in report.steps] == [1, 2, 3, 4]
    assert m.slope == pytest.approx(slope_per_step([r["opd/student_shared_mass"] for r in report.steps]))
    if expected == NOTHING_NEW:
        assert m.overlap_ratio == pytest.approx(1.0) and m.reverse_kl == pytest.approx(0.0, abs=1e-4)
    elif expected == NEEDS_COLD_START:
        assert m.alignment < 0.1 and abs(m.slope) < T.min_slope
    else:
        assert m.alignment > 0.5
    doc = report.to_dict()
    assert doc["verdict"] == expected and doc["thresholds"] == vars(T) and len(doc["opd_steps"]) == 4
    run_dir = Path(report.run_dir)
    assert (run_dir / "metrics.jsonl").exists() and not list(run_dir.glob("*.safetensors"))  # weights dropped


def test_preflight_command(pairs, servers, tmp_path):
    """The CLI: custom thresholds reach the verdict, the JSON report and the template fragment are written."""
    cmd = [
        sys.executable,
        "-m",
        "student_trainer",
        "preflight",
        "--student",
        str(pairs["student_b"]),
        "--teacher-url",
        servers["teacher_a"],
        "--data",
        str(pairs["prompts"]),
        "--max-new-tokens",
        "24",
        "--sample",
        "8",
        "--template",
        "chat",
        "--teacher-prompt",
        "same",
        "--steps",
        "2",
        "--lr",
        "1e-4",
        "train.micro_batch_prompts=8",
        "logging.progress_bar=false",
        "logging.plot=false",
        "--workdir",
        str(tmp_path),
        "--low-alignment",
        "0.005",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "preflight.json").read_text())
    assert doc["thresholds"]["low_alignment"] == 0.005
    assert doc["verdict"] == COMPATIBLE  # shared mass ~0.013 is above this (unusually low) bar
    assert "verdict:               COMPATIBLE" in proc.stdout
    assert doc["fragment"] == {"data": {"student_template": "chat", "teacher_prompt": "same"}}
    assert (tmp_path / "template.yaml").exists() and len(doc["opd_steps"]) == 2

    bad = subprocess.run(
        [
            *cmd[:4],
            "--student",
            "x",
            "--teacher-url",
            "http://127.0.0.1:9",
            "--data",
            "y.jsonl",
            "--low-alignment",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "low_alignment=2.0 must be in [0, 1]" in bad.stdout
