"""Compatibility pre-flight (``student-trainer preflight``): probe + a few OPD steps -> a verdict.

The paper's findings (docs/OPD.md, sections 5 and 6): OPD works when student and teacher share a thinking pattern, and
its failure shows early as a LOW, STAGNANT overlap between the two sides' top-k; and a teacher that the
student cannot tell apart from itself (tiny KL, overlap near 1) brings nothing to distil. So:

1. probe the candidate templates at step 0 (:mod:`student_trainer.recipe.probe`) and keep the best;
2. run ``steps`` real OPD steps (``OPDTrainer``, the user's config) on the probe's prompt sample, each step
   over the whole sample, so step 1 is measured on exactly the probe's rollouts;
3. :func:`decide` from the numbers and :class:`Thresholds` (pure, unit-testable).

Rules, in order (defaults in :class:`Thresholds`; each is a command-line flag):

- "teacher brings nothing new": step-0 top-k overlap ratio >= ``nothing_new_overlap`` (0.9) AND step-0
  per-token reverse KL <= ``nothing_new_kl`` (0.05 nats). Both sides already agree on what matters.
- "needs cold start": step-0 alignment < ``low_alignment`` (0.5) AND it does not rise past it: its
  least-squares slope over the OPD steps is < ``min_slope`` (0.01 per step), or its mean over the last 3 OPD
  steps is still below ``low_alignment``, or no step was run. Do the off-policy cold start
  (generate -> filter -> sft) first, then OPD from the SFT'd student. (Why "past it": in the mini-lab the
  mismatched teacher's overlap rises steadily while the student's accuracy collapses; a low-but-rising
  alignment was not evidence of compatibility there — docs/LAB.md.)
- "compatible": otherwise (a moderate or high alignment, or a low one that OPD raises past the threshold).

Alignment is ``metric``, by default the student's shared-token mass ``opd/student_shared_mass`` (the
student's probability on the tokens in both top-k sets; docs/OPD.md: 97-99% in successful OPD). The top-k overlap
ratio ``opd/overlap_ratio`` can be chosen instead, but it counts a tail token the student gives 1e-6 like
its top-1: on peaked students (small models, narrow tasks) most of the top-k is tail noise, so the ratio's
level says little and one fixed threshold does not carry over. Measured on tiny models
(tests/test_preflight.py): a same-format pair had ratio 0.45 and mass 0.69, a different-format pair ratio
0.11 and mass 0.013, the student against itself ratio 1.0 and KL 0.

Read the slope with its learning rate in mind: a few steps at the paper's lr 1e-6 move a large student very
little, so the slope is then ~0 for every pair and the verdict rests on the step-0 level; run more steps, or
a larger lr for the pre-flight only (``--lr``), to see the trend; too large an lr rewrites any small student
within a few steps and makes every pair look "rising". The reverse KL is the top-k estimate
``opd/reverse_kl_topk`` when the teacher returns log-probs at the student's ids, else ``opd/reverse_kl_k1``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from student_trainer.config import Config
from student_trainer.data.prompts import PromptTable
from student_trainer.errors import ConfigError
from student_trainer.recipe.probe import Candidate, ProbeReport, format_table, run_probe, with_choice

COMPATIBLE = "compatible"
NEEDS_COLD_START = "needs cold start"
NOTHING_NEW = "teacher brings nothing new"
VERDICTS = (COMPATIBLE, NEEDS_COLD_START, NOTHING_NEW)


class PreflightError(ConfigError):
    """Bad pre-flight settings; the message names the value and the limit."""


ALIGNMENT_METRICS = ("opd/student_shared_mass", "opd/overlap_ratio", "opd/overlap_top1")
STEP_COLUMNS = (
    ("mass s", "opd/student_shared_mass"),
    ("overlap", "opd/overlap_ratio"),
    ("top1", "opd/overlap_top1"),
    ("KL top-k", "opd/reverse_kl_topk"),
    ("KL k1", "opd/reverse_kl_k1"),
    ("loss", "opd/loss"),
)


@dataclass(frozen=True)
class Thresholds:
    """The verdict's rules (module docstring). ``metric`` is the alignment metric the level and slope read."""

    nothing_new_overlap: float = 0.9  # step-0 overlap ratio at or above: "near 1"
    nothing_new_kl: float = 0.05  # step-0 reverse KL (nats/token) at or below: "tiny"
    low_alignment: float = 0.5  # step-0 alignment metric below: "low"
    min_slope: float = 0.01  # alignment gain per OPD step below: "stagnant"
    metric: str = "opd/student_shared_mass"

    def __post_init__(self) -> None:
        for name in ("nothing_new_overlap", "low_alignment"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise PreflightError(f"{name}={value} must be in [0, 1] (a ratio or a probability mass)")
        if not self.nothing_new_kl >= 0:
            raise PreflightError(f"nothing_new_kl={self.nothing_new_kl} must be >= 0 (nats per token)")
        if not math.isfinite(self.min_slope):
            raise PreflightError(f"min_slope={self.min_slope} must be finite")
        if self.metric not in ALIGNMENT_METRICS:
            raise PreflightError(f"metric={self.metric!r} is not one of {', '.join(ALIGNMENT_METRICS)}")


@dataclass(frozen=True)
class Measures:
    """What the verdict reads, at step 0 unless said: the top-k overlap ratio, the alignment metric (the
    thresholds' ``metric``), the per-token reverse KL, and the alignment metric's slope per OPD step (None
    when no step was run)."""

    overlap_ratio: float
    alignment: float
    reverse_kl: float
    slope: float | None = None
    final: float | None = None  # the alignment metric's mean over the last (up to 3) OPD steps


@dataclass(frozen=True)
class Verdict:
    label: str  # one of VERDICTS
    reasons: tuple[str, ...]


def decide(m: Measures, t: Thresholds) -> Verdict:
    """The verdict as a pure function of the measured numbers and the thresholds (rules: module docstring)."""
    name = t.metric.removeprefix("opd/")
    if m.overlap_ratio >= t.nothing_new_overlap and m.reverse_kl <= t.nothing_new_kl:
        return Verdict(
            NOTHING_NEW,
            (
                f"step-0 overlap ratio {m.overlap_ratio:.3f} >= {t.nothing_new_overlap} and reverse KL "
                f"{m.reverse_kl:.4f} <= {t.nothing_new_kl} nats/token: the student already agrees with the "
                "teacher; use a stronger teacher or data the student has not mastered",
            ),
        )
    if m.alignment < t.low_alignment:
        low = f"step-0 {name} {m.alignment:.3f} < {t.low_alignment}"
        if m.slope is None:
            return Verdict(NEEDS_COLD_START, (f"{low}, and no OPD step was run to see it rise",))
        if m.slope < t.min_slope:
            return Verdict(
                NEEDS_COLD_START,
                (
                    f"{low} and stagnant: slope {m.slope:+.4f}/step < {t.min_slope}; run the off-policy "
                    "cold start (generate -> filter -> sft) first",
                ),
            )
        if m.final is not None and m.final < t.low_alignment:
            # Rising but still low: the mini-lab's mismatched teacher does exactly this while it overwrites the
            # student's own pattern (its accuracy collapses first); only crossing the threshold counts.
            return Verdict(
                NEEDS_COLD_START,
                (
                    f"{low}; rising (slope {m.slope:+.4f}/step) but still {m.final:.3f} < {t.low_alignment} after "
                    "the OPD steps: run the off-policy cold start (generate -> filter -> sft) first",
                ),
            )
        return Verdict(COMPATIBLE, (f"{low}, but rising: slope {m.slope:+.4f}/step >= {t.min_slope}",))
    reasons = [f"step-0 {name} {m.alignment:.3f} >= {t.low_alignment}"]
    if m.overlap_ratio >= t.nothing_new_overlap:
        reasons.append(f"reverse KL {m.reverse_kl:.4f} > {t.nothing_new_kl}: the teacher still differs")
    if m.slope is not None:
        reasons.append(f"{name} slope {m.slope:+.4f}/step")
    return Verdict(COMPATIBLE, tuple(reasons))


def slope_per_step(values_S: Sequence[float]) -> float:
    """Least-squares slope of a per-step series (S >= 2 values at steps 0..S-1), per step."""
    y = np.asarray(values_S, dtype=np.float64)
    if y.size < 2:
        raise ValueError(f"a slope needs at least 2 steps, got {y.size}")
    x = np.arange(y.size, dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0])


# ------------------------------------------------------------------------------------------------- run


@dataclass
class PreflightReport:
    verdict: Verdict
    measures: Measures
    thresholds: Thresholds
    probe: ProbeReport
    steps: list[dict[str, Any]] = field(default_factory=list)  # per OPD step: step, overlap, KL, loss
    run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.label,
            "reasons": list(self.verdict.reasons),
            "measures": asdict(self.measures),
            "thresholds": asdict(self.thresholds),
            "template": self.probe.chosen.candidate.name,
            "fragment": self.probe.fragment(),
            "opd_steps": self.steps,
            "run_dir": self.run_dir,
            "probe": self.probe.to_dict(),
        }


def write_sample(sample: PromptTable, path: Path, question_field: str, answer_field: str | None) -> Path:
    """The probe sample as JSONL for the OPD steps (same questions and order as the probe read them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for i, q in enumerate(sample.questions):
            rec: dict[str, Any] = {question_field: q, "probe_id": sample.ids[i]}
            if answer_field and sample.answers is not None:
                rec[answer_field] = sample.answers[i]
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def opd_config(
    cfg: Config, candidate: Candidate, sample_path: Path, sample_size: int, steps: int, out_dir: Path
) -> Config:
    """The user's config, on the sample, with the chosen template: ``steps`` steps of the whole sample."""
    c = with_choice(cfg, candidate)  # a deep copy
    c.data.path = str(sample_path)
    c.train.steps, c.train.prompts_per_step = steps, sample_size
    c.train.output_dir, c.train.save_every = str(out_dir), 0
    c.eval = dataclasses.replace(c.eval, every=0)
    c.validate()
    return c


def run_opd_steps(cfg: Config) -> list[dict[str, Any]]:
    """Train ``cfg.train.steps`` steps with ``OPDTrainer``; the per-step metrics it logged."""
    from student_trainer.opd.trainer import OPDTrainer
    from student_trainer.tracking import read_jsonl

    out = Path(cfg.train.output_dir)
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a previous pre-flight in the same directory
    OPDTrainer(cfg).train()
    keys = (
        "step",
        *ALIGNMENT_METRICS,
        "opd/reverse_kl_topk",
        "opd/reverse_kl_k1",
        "opd/loss",
        "opd/entropy_gap",
    )
    return [{k: r[k] for k in keys if k in r} for r in read_jsonl(out / "metrics.jsonl")]


def _drop_weights(run_dir: Path) -> None:
    """The pre-flight student is a diagnostic: keep its metrics and config, not a full copy of the weights."""
    for pattern in ("*.safetensors", "*.safetensors.index.json", "*.bin"):
        for f in run_dir.glob(pattern):
            f.unlink()


def run_preflight(
    cfg: Config,
    candidates: Sequence[Candidate],
    sample: PromptTable,
    *,
    steps: int,
    workdir: str | Path,
    thresholds: Thresholds | None = None,
    tie_tolerance: float = 0.01,
    choose_by: str | None = None,
    keep_model: bool = False,
    log: Any = print,
) -> PreflightReport:
    """Probe -> ``steps`` OPD steps with the chosen template -> :func:`decide`. The template is chosen by
    ``choose_by``, by default the verdict's own alignment metric (``thresholds.metric``)."""
    thresholds = thresholds or Thresholds()
    if steps < 0:
        raise PreflightError(f"steps={steps} must be >= 0 (0 = verdict from the step-0 probe only)")
    workdir = Path(workdir)
    metric = thresholds.metric
    probe = run_probe(
        cfg, candidates, sample, tie_tolerance=tie_tolerance, choose_by=choose_by or metric, log=log
    )
    log(format_table(probe.results, probe.chosen))
    gc.collect()  # the probe's copy of the student goes before the trainer loads its own
    rows: list[dict[str, Any]] = []
    run_dir = None
    if steps:
        sample_path = write_sample(
            sample, workdir / "sample.jsonl", cfg.data.question_field, cfg.data.answer_field
        )
        run_dir = workdir / "opd"
        log(
            f"preflight: {steps} OPD steps with {probe.chosen.candidate.name} on {len(sample)} prompts -> {run_dir}"
        )
        rows = run_opd_steps(
            opd_config(cfg, probe.chosen.candidate, sample_path, len(sample), steps, run_dir)
        )
        if not keep_model:
            _drop_weights(run_dir)
    series = [r[metric] for r in rows]
    slope = slope_per_step(series) if len(rows) >= 2 else None
    final = float(np.mean(series[-3:])) if series else None
    measures = Measures(
        probe.chosen.overlap, probe.chosen.metrics[metric], probe.chosen.reverse_kl, slope, final
    )
    return PreflightReport(
        decide(measures, thresholds),
        measures,
        thresholds,
        probe,
        rows,
        None if run_dir is None else str(run_dir),
    )


def format_report(report: PreflightReport) -> str:
    """The human summary: OPD steps, the measures against their thresholds, the verdict and why."""
    m, t = report.measures, report.thresholds
    name = t.metric.removeprefix("opd/")
    lines = []
    if report.steps:
        lines.append("step " + "".join(f"{head:>10}" for head, _ in STEP_COLUMNS))
        for r in report.steps:
            cells = (f"{r[key]:>10.4f}" if key in r else f"{'n/a':>10}" for _, key in STEP_COLUMNS)
            lines.append(f"{r['step']:>4} " + "".join(cells))
    slope = "n/a (no OPD step)" if m.slope is None else f"{m.slope:+.4f}/step"
    lines += [
        f"template:              {report.probe.chosen.candidate.name}",
        f"step-0 overlap ratio:  {m.overlap_ratio:.3f}   (near 1: >= {t.nothing_new_overlap})",
        f"step-0 reverse KL:     {m.reverse_kl:.4f}  nats/token (tiny: <= {t.nothing_new_kl})",
        f"step-0 {name}: {m.alignment:.3f}   (low: < {t.low_alignment})",
        f"{name} slope: {slope}   (stagnant: < {t.min_slope})",
        f"verdict:               {report.verdict.label.upper()}",
        *(f"  - {r}" for r in report.verdict.reasons),
    ]
    return "\n".join(lines)
