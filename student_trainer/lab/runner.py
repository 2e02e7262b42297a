"""The mini-lab's experiments, run through the real service and trainer (``student-trainer lab``).

Per seed, three runs on the same shipped student (2 layers, format A, never saw a 3-digit problem):

- ``opd_A``: OPD from teacher A (same thinking pattern, format A);
- ``opd_B``: OPD from teacher B (format B: equally accurate, a different pattern), same steps;
- ``cold_B``: the cold-start rescue: teacher B samples 2-digit problems only (``generate``, no 3-digit
  knowledge), ``filter``, ``sft`` of the student on them, then OPD from B.

Each run first asks ``preflight`` for a verdict on its (teacher, student) pair; the pre-flight's probe
measures the step-0 overlap with the student's template ``{question}`` and with the teachers' own
``<bos>{question}`` on the teacher side (experiment 3, the teacher-aligned prompt). The verdict reads the
TOP-1 overlap (``Thresholds(metric="opd/overlap_top1")``): with k = 16 = the whole vocabulary the top-k
overlap is 1 by construction. The other thresholds are the documented defaults of
``student_trainer.recipe.preflight.Thresholds``.

Processes: one ``teacher-server`` per teacher (hf backend, one thread each) for the whole lab, and the runs
in ``workers`` spawned processes (one thread each). Every run writes ``<out>/seed<S>/<run>/``: its log, the
trainer's ``metrics.jsonl``, the pre-flight report and ``summary.json``; ``report.py`` aggregates them.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from student_trainer.errors import ConfigError
from student_trainer.lab import world
from student_trainer.lab.build import MODELS_DIR, eval_problems, held_out, single_thread_env

RUNS = ("opd_A", "opd_B", "cold_B")
TEACHER_OF = {"opd_A": "teacher_a", "opd_B": "teacher_b", "cold_B": "teacher_b"}


class LabError(ConfigError):
    """Bad lab settings or missing models; the message names the value and the fix."""


@dataclass(frozen=True)
class LabSettings:
    """Everything that defines a lab run (written to ``<out>/settings.json``)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    runs: tuple[str, ...] = RUNS
    steps: int = 200  # OPD steps per run
    prompts_per_step: int = 64
    micro_batch_prompts: int = 64  # one generate call per step: cheapest on CPU
    lr: float = 1e-3
    top_k: int = 16
    mix: tuple[tuple[int, float], ...] = ((2, 1.0), (3, 2.0))  # OPD prompts: 1/3 two-digit, 2/3 three-digit
    eval_every: int = 25
    eval_per_digits: int = 100  # of the fixed held-out problems (build.eval_problems), per operand length
    cold_prompts: int = 256  # 2-digit prompts teacher B samples for the cold start
    cold_samples: int = 4  # samples per prompt (temperature 0.7, the paper's)
    cold_sft_steps: int = 100
    preflight_sample: int = 64
    preflight_steps: int = 8
    success_accuracy: float = 0.5  # a run "succeeds" when its final 3-digit accuracy reaches this
    workers: int = 2

    def __post_init__(self) -> None:
        bad = [r for r in self.runs if r not in RUNS]
        checks = (
            (not bad, f"runs={list(self.runs)}: unknown {bad}; choose from {list(RUNS)}"),
            (bool(self.seeds), "seeds is empty: give at least one seed"),
            (self.steps >= 1, f"steps={self.steps} must be >= 1"),
            (self.prompts_per_step >= 1, f"prompts_per_step={self.prompts_per_step} must be >= 1"),
            (self.eval_every >= 1, f"eval_every={self.eval_every} must be >= 1"),
            (1 <= self.eval_per_digits <= 200, f"eval_per_digits={self.eval_per_digits} must be in 1..200"),
            (self.workers >= 1, f"workers={self.workers} must be >= 1"),
            (self.preflight_steps >= 0, f"preflight_steps={self.preflight_steps} must be >= 0"),
            (self.cold_sft_steps >= 1, f"cold_sft_steps={self.cold_sft_steps} must be >= 1"),
        )
        for ok, message in checks:
            if not ok:
                raise LabError(message)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> LabSettings:
        """Inverse of ``dataclasses.asdict`` (JSON turns the tuples into lists)."""
        return cls(
            **{
                **doc,
                "seeds": tuple(doc["seeds"]),
                "runs": tuple(doc["runs"]),
                "mix": tuple((int(d), float(w)) for d, w in doc["mix"]),
            }
        )


QUICK = LabSettings(
    seeds=(0,),
    runs=("opd_A", "opd_B"),
    steps=30,  # the reverse KL from A first rises for ~10 steps, then falls: 30 steps show the fall
    eval_every=15,
    eval_per_digits=20,
    preflight_sample=32,
    preflight_steps=0,
)


# ------------------------------------------------------------------------------------------- one run


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One run in a worker process: [cold start] -> accuracy before -> preflight -> OPD -> accuracy after.

    Output (stdout and stderr of the run) goes to ``<job out>/log.txt``; returns the run's summary.
    """
    import torch

    torch.set_num_threads(1)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    with (
        (out / "log.txt").open("w") as fh,
        contextlib.redirect_stdout(fh),
        contextlib.redirect_stderr(fh),
    ):
        summary = _run_job(job, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _run_job(job: dict[str, Any], out: Path) -> dict[str, Any]:
    from student_trainer.evaluate import load_model, load_problems
    from student_trainer.lab.opd import LabTrainer, accuracy_by_digits, cold_start, lab_config
    from student_trainer.tracking import read_jsonl

    s = LabSettings.from_dict(job["settings"])
    t0 = time.perf_counter()
    student, cold = job["student"], None
    if job["run"] == "cold_B":
        rng = random.Random(f"cold:{job['seed']}")
        problems = world.sample_problems(rng, 2, s.cold_prompts, exclude=held_out())
        sft_dir, cold = cold_start(
            student,
            job["teacher_url"],
            problems,
            out / "cold_start",
            samples_per_prompt=s.cold_samples,
            sft_steps=s.cold_sft_steps,
            lr=s.lr,
            seed=job["seed"],
        )
        student = str(sft_dir)
    evals = load_problems(job["eval"])
    model, tokenizer = load_model(student, dtype="float32", device="cpu")
    before = accuracy_by_digits(model, tokenizer, evals, world.STUDENT_TEMPLATE)
    del model
    verdict = _preflight(job, s, student, out / "preflight")
    cfg = lab_config(
        student,
        job["teacher_url"],
        job["prompts"],
        job["eval"],
        out / "opd",
        steps=s.steps,
        seed=job["seed"],
        lr=s.lr,
        top_k=s.top_k,
        prompts_per_step=s.prompts_per_step,
        micro_batch_prompts=s.micro_batch_prompts,
        eval_every=s.eval_every,
    )
    t_opd = time.perf_counter()
    LabTrainer(cfg).train()
    opd_seconds = time.perf_counter() - t_opd
    model, tokenizer = load_model(out / "opd", dtype="float32", device="cpu")
    after = accuracy_by_digits(model, tokenizer, evals, world.STUDENT_TEMPLATE)
    rows = read_jsonl(out / "opd" / "metrics.jsonl")
    for f in (out / "opd").glob("*.safetensors"):
        f.unlink()  # the lab keeps numbers, not 18 student copies
    return {
        "run": job["run"],
        "seed": job["seed"],
        "teacher": job["teacher"],
        "steps": s.steps,
        "before": before,
        "after": after,
        "start": _at(rows, 0),
        "end": _tail_mean(rows, 10),
        "preflight": verdict,
        "cold_start": cold,
        "opd_seconds": round(opd_seconds, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def _preflight(job: dict[str, Any], s: LabSettings, student: str, workdir: Path) -> dict[str, Any]:
    """``preflight`` on (teacher, student) with the runs' own loss settings, probing both prompt templates;
    the verdict reads the top-1 overlap (the top-16 overlap is 1 by construction here)."""
    from student_trainer.data.prompts import load_prompts
    from student_trainer.lab.opd import lab_config
    from student_trainer.recipe.preflight import Measures, Thresholds, decide, format_report, run_preflight
    from student_trainer.recipe.probe import Candidate, sample_table

    cfg = lab_config(
        student,
        job["teacher_url"],
        job["prompts"],
        None,
        workdir / "opd",
        steps=max(1, s.preflight_steps),
        seed=job["seed"],
        lr=s.lr,
        top_k=s.top_k,
        prompts_per_step=s.preflight_sample,
        micro_batch_prompts=s.micro_batch_prompts,
    )
    sample = sample_table(
        load_prompts(job["prompts"], answer_field="answer"), s.preflight_sample, job["seed"]
    )
    candidates = [
        Candidate(world.STUDENT_TEMPLATE, "same"),
        Candidate(world.STUDENT_TEMPLATE, world.TEACHER_TEMPLATE),
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    report = run_preflight(
        cfg,
        candidates,
        sample,
        steps=s.preflight_steps,
        workdir=workdir,
        thresholds=Thresholds(metric="opd/overlap_top1"),
    )
    print(format_report(report))
    # the same rules on the step-0 numbers alone (no OPD steps): what the probe by itself would say
    m = report.measures
    step0 = decide(Measures(m.overlap_ratio, m.alignment, m.reverse_kl, None), report.thresholds)
    doc = report.to_dict()
    (workdir / "preflight.json").write_text(json.dumps(doc, indent=1))
    probe = {r["teacher_prompt"]: r for r in doc["probe"]["results"]}
    return {
        "verdict": doc["verdict"],
        "reasons": doc["reasons"],
        "verdict_step0": step0.label,
        "measures": doc["measures"],
        "template": doc["template"],
        "probe_top1_student_template": probe["same"]["metrics"]["opd/overlap_top1"],
        "probe_top1_teacher_template": probe[world.TEACHER_TEMPLATE]["metrics"]["opd/overlap_top1"],
        "probe_kl_student_template": probe["same"]["reverse_kl"],
        "probe_kl_teacher_template": probe[world.TEACHER_TEMPLATE]["reverse_kl"],
    }


METRIC_KEYS = ("opd/overlap_top1", "opd/reverse_kl_topk", "opd/reverse_kl_k1", "opd/loss", "opd/entropy_gap")


def _at(rows: list[dict[str, Any]], i: int) -> dict[str, float]:
    return {k: rows[i][k] for k in METRIC_KEYS if rows and rows[i].get(k) is not None}


def _tail_mean(rows: list[dict[str, Any]], n: int) -> dict[str, float]:
    """Mean of the last ``n`` steps (one step's value is noisy: 64 fresh prompts)."""
    tail = rows[-n:]
    out = {}
    for k in METRIC_KEYS:
        vals = [r[k] for r in tail if r.get(k) is not None]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


# ------------------------------------------------------------------------------------------- the lab


def check_models(models: Path) -> None:
    for name in ("teacher_a", "teacher_b", "student"):
        if not (models / name / "config.json").exists():
            raise LabError(
                f"model {name!r} not found in {models}: run `python -m student_trainer.lab.build --out "
                f"{models}` (or pass --models to the shipped student_trainer/lab/models)"
            )


def write_inputs(out: Path, s: LabSettings) -> dict[str, Any]:
    """The eval file (held-out problems) and one OPD prompt file per seed (held-out problems excluded)."""
    evals = eval_problems()
    eval_path = world.write_jsonl(
        out / "eval.jsonl",
        world.problem_records(p for d in sorted(evals) for p in evals[d][: s.eval_per_digits]),
    )
    banned = {(p.a, p.b) for p in held_out()}
    prompts = {}
    for seed in s.seeds:
        rng = random.Random(f"opd-prompts:{seed}")
        count = max(s.steps * s.prompts_per_step, s.preflight_sample)
        problems = [p for p in world.mixed_problems(rng, dict(s.mix), count) if (p.a, p.b) not in banned]
        prompts[seed] = world.write_jsonl(
            out / f"seed{seed}" / "prompts.jsonl", world.problem_records(problems)
        )
    return {"eval": eval_path, "prompts": prompts}


def start_teachers(models: Path, names: set[str], out: Path) -> dict[str, Any]:
    """One ``teacher-server`` per teacher (hf backend, one thread), started together, waited for."""
    from devkit.teacher_process import TeacherProcess

    procs = {
        n: TeacherProcess(
            models / n,
            "--max-top-k",
            "16",
            "--max-model-len",
            "128",
            env=single_thread_env(),
            log_path=out / f"{n}.server.log",
        )
        for n in sorted(names)
    }
    try:
        for p in procs.values():
            p.start(wait=False)
        for p in procs.values():
            p.wait_ready()
    except BaseException:
        for p in procs.values():
            p.stop()
        raise
    return procs


def run_lab(
    settings: LabSettings, out_dir: str | Path, models: str | Path = MODELS_DIR, log: Any = print
) -> list[dict[str, Any]]:
    """All runs x seeds; returns the run summaries (also in ``<out>/results.json``)."""
    out, models = Path(out_dir), Path(models)
    check_models(models)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(settings), indent=1) + "\n")
    inputs = write_inputs(out, settings)
    t0 = time.perf_counter()
    teachers = start_teachers(models, {TEACHER_OF[r] for r in settings.runs}, out)
    log(
        f"lab: teacher servers ready in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{n} {p.url}" for n, p in teachers.items())
    )
    # longest runs first, so the two workers finish together
    order = sorted(settings.runs, key=lambda r: r != "cold_B")
    jobs = [
        {
            "run": run,
            "seed": seed,
            "teacher": TEACHER_OF[run],
            "teacher_url": teachers[TEACHER_OF[run]].url,
            "student": str(models / "student"),
            "prompts": str(inputs["prompts"][seed]),
            "eval": str(inputs["eval"]),
            "out": str(out / f"seed{seed}" / run),
            "settings": asdict(settings),
        }
        for run in order
        for seed in settings.seeds
    ]
    results: list[dict[str, Any]] = []
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=settings.workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_job, j): j for j in jobs}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:
                    raise RuntimeError(
                        f"lab run {job['run']} seed {job['seed']} failed: {exc}; log: {job['out']}/log.txt"
                    ) from exc
                results.append(res)
                log(_one_line(res))
    finally:
        for p in teachers.values():
            p.stop()
    results.sort(key=lambda r: (settings.runs.index(r["run"]), r["seed"]))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"lab: {len(results)} runs in {time.perf_counter() - t0:.0f} s")
    return results


def _one_line(r: dict[str, Any]) -> str:
    b, a = r["before"], r["after"]
    return (
        f"{r['run']:<7} seed {r['seed']}: acc3 {b.get('eval/acc_3digit', 0):.2f} -> "
        f"{a.get('eval/acc_3digit', 0):.2f}, acc2 {b.get('eval/acc_2digit', 0):.2f} -> "
        f"{a.get('eval/acc_2digit', 0):.2f}, top1 {r['start'].get('opd/overlap_top1', float('nan')):.2f} -> "
        f"{r['end'].get('opd/overlap_top1', float('nan')):.2f}, preflight: {r['preflight']['verdict']} "
        f"({r['wall_seconds']:.0f} s)"
    )


def with_overrides(base: LabSettings, **changes: Any) -> LabSettings:
    """``base`` with the non-None ``changes`` applied (command-line flags)."""
    return replace(base, **{k: v for k, v in changes.items() if v is not None})
