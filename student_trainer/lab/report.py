"""The mini-lab's results: mean and spread over seeds, the markdown tables of docs/LAB.md, one figure.

    results = json.loads(Path("runs/lab/results.json").read_text())
    print(markdown(results, success=0.5))
    plot(results, "runs/lab", "runs/lab/lab.png")

"start" is the first OPD step (the untouched student's rollouts), "end" the mean of the last 10 steps (a
single step's value is noisy: 64 fresh prompts). Spread: the sample standard deviation over seeds and the
[min, max]. A pre-flight verdict AGREES with its run when "compatible" goes with a run whose final 3-digit
accuracy reaches ``success`` and any other verdict with one that does not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from student_trainer.lab.runner import RUNS

LABELS = {
    "opd_A": "OPD from teacher A (same pattern)",
    "opd_B": "OPD from teacher B (other pattern)",
    "cold_B": "cold start on B's 2-digit samples, then OPD from B",
}
COLORS = {"opd_A": "tab:blue", "opd_B": "tab:red", "cold_B": "tab:green"}


def spread(values: list[float]) -> dict[str, float]:
    """mean, sample std (0 for one value), min, max, n."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt(s: dict[str, float], digits: int = 2) -> str:
    if s["n"] == 0:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _by_run(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["run"], []).append(r)
    return {k: out[k] for k in RUNS if k in out}


def _col(rows: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> dict[str, float]:
    return spread([get(r) for r in rows])


def succeeded(r: dict[str, Any], success: float) -> bool:
    return r["after"].get("eval/acc_3digit", 0.0) >= success


def agrees(r: dict[str, Any], success: float, key: str = "verdict") -> bool:
    """Does the pre-flight verdict ``key`` ("verdict": with OPD steps; "verdict_step0": step-0 numbers
    only) match the run: "compatible" for a run that succeeded, anything else for one that did not."""
    return (r["preflight"][key] == "compatible") == succeeded(r, success)


def main_table(results: list[dict[str, Any]]) -> str:
    """One row per run type: accuracy before -> after, top-1 overlap and reverse KL start -> end, time."""
    head = (
        "| run | seeds | 2-digit acc before | 2-digit acc after | 3-digit acc before | 3-digit acc after | "
        "top-1 overlap start | top-1 overlap end | reverse KL start | reverse KL end | OPD steps | "
        "run wall time (s) |\n|" + "---|" * 12
    )
    lines = [head]
    for run, rows in _by_run(results).items():
        cells = [
            _col(rows, lambda r: r["before"].get("eval/acc_2digit")),
            _col(rows, lambda r: r["after"].get("eval/acc_2digit")),
            _col(rows, lambda r: r["before"].get("eval/acc_3digit")),
            _col(rows, lambda r: r["after"].get("eval/acc_3digit")),
            _col(rows, lambda r: r["start"].get("opd/overlap_top1")),
            _col(rows, lambda r: r["end"].get("opd/overlap_top1")),
            _col(rows, lambda r: r["start"].get("opd/reverse_kl_topk")),
            _col(rows, lambda r: r["end"].get("opd/reverse_kl_topk")),
        ]
        wall = _col(rows, lambda r: r["wall_seconds"])
        lines.append(
            f"| {run} | {len(rows)} | "
            + " | ".join(fmt(c, 3 if i >= 6 else 2) for i, c in enumerate(cells))
            + f" | {rows[0]['steps']} | {fmt(wall, 0)} |"
        )
    return "\n".join(lines)


def template_table(results: list[dict[str, Any]]) -> str:
    """Experiment 3: step-0 top-1 overlap and reverse KL with each prompt on the teacher side."""
    lines = [
        "| (teacher, student) | top-1 overlap, teacher reads `{question}` | top-1 overlap, teacher reads "
        "`<bos>{question}` | reverse KL, `{question}` | reverse KL, `<bos>{question}` | probe's choice |",
        "|---|---|---|---|---|---|",
    ]
    names = {"opd_A": "(A, student)", "opd_B": "(B, student)", "cold_B": "(B, cold-started student)"}
    for run, rows in _by_run(results).items():
        p = [r["preflight"] for r in rows]
        chosen = sorted({x["template"] for x in p})
        lines.append(
            f"| {names[run]} | {fmt(spread([x['probe_top1_student_template'] for x in p]), 3)} | "
            f"{fmt(spread([x['probe_top1_teacher_template'] for x in p]), 3)} | "
            f"{fmt(spread([x['probe_kl_student_template'] for x in p]), 3)} | "
            f"{fmt(spread([x['probe_kl_teacher_template'] for x in p]), 3)} | {', '.join(chosen)} |"
        )
    return "\n".join(lines)


def verdict_table(results: list[dict[str, Any]], success: float) -> str:
    """Pre-flight verdicts per run and seed (with its OPD steps, and from the step-0 numbers alone) next to
    what the run showed."""
    lines = [
        "| run | seed | step-0 top-1 overlap | top-1 slope / step | verdict (probe + OPD steps) | agrees | "
        "verdict (step 0 only) | agrees | 3-digit acc after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, rows in _by_run(results).items():
        for r in rows:
            m, p = r["preflight"]["measures"], r["preflight"]
            slope = "n/a" if m.get("slope") is None else f"{m['slope']:+.4f}"
            lines.append(
                f"| {run} | {r['seed']} | {m['alignment']:.3f} | {slope} | {p['verdict']} | "
                f"{_yes(agrees(r, success))} | {p['verdict_step0']} | "
                f"{_yes(agrees(r, success, 'verdict_step0'))} | {r['after'].get('eval/acc_3digit', 0):.2f} |"
            )
    return "\n".join(lines)


def agreement_counts(results: list[dict[str, Any]], success: float) -> dict[str, str]:
    """ "k/n" runs where each kind of verdict agrees with the outcome."""
    n = len(results)
    return {
        key: f"{sum(agrees(r, success, key) for r in results)}/{n}" for key in ("verdict", "verdict_step0")
    }


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def quick_checks(results: list[dict[str, Any]], lab_dir: str | Path) -> list[tuple[str, bool]]:
    """The directions ``lab --quick`` can show in a few steps: (description with the numbers, holds?).

    1. initial top-1 overlap with teacher A > with teacher B (OPD step 1, the untouched student);
    2. OPD from A lowers the reverse KL: mean of the last 5 steps < 0.8 x the mean of the first 5 (it does
       not fall in the first ~10 steps, so a single early step proves nothing).
    """
    from student_trainer.tracking import read_jsonl

    runs = {r["run"]: r for r in results if r["seed"] == results[0]["seed"]}
    out = []
    if {"opd_A", "opd_B"} <= set(runs):
        a, b = (runs[k]["start"]["opd/overlap_top1"] for k in ("opd_A", "opd_B"))
        out.append((f"initial top-1 overlap A {a:.3f} > B {b:.3f}", a > b))
    if "opd_A" in runs:
        rows = read_jsonl(Path(lab_dir) / f"seed{runs['opd_A']['seed']}" / "opd_A" / "opd" / "metrics.jsonl")
        kl = [r["opd/reverse_kl_topk"] for r in rows]
        first, last = statistics.fmean(kl[:5]), statistics.fmean(kl[-5:])
        out.append(
            (
                f"reverse KL from A, first 5 steps {first:.3f} -> last 5 {last:.3f} (< 0.8x)",
                last < 0.8 * first,
            )
        )
    return out


def markdown(results: list[dict[str, Any]], success: float) -> str:
    return "\n\n".join([main_table(results), template_table(results), verdict_table(results, success)])


# ---------------------------------------------------------------------------------------------- figure


def _curve(rows: list[dict[str, Any]], key: str, window: int) -> dict[int, float]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if window <= 1:
        return dict(pts)
    out = {}
    for i, (step, _) in enumerate(pts):
        chunk = [v for _, v in pts[max(0, i - window + 1) : i + 1]]
        out[step] = sum(chunk) / len(chunk)
    return out


def plot(results: list[dict[str, Any]], lab_dir: str | Path, png: str | Path) -> Path | None:
    """3-digit accuracy, 2-digit accuracy, top-1 overlap and reverse KL over OPD steps for every run on one
    figure: the mean over seeds as a line, min..max over seeds as a band; accuracy at step 0 is the student
    before OPD (after the cold start for cold_B)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install 'opd-distill[plot]'); no lab figure written")
        return None
    from student_trainer.tracking import read_jsonl

    panels = (
        ("eval/acc_3digit", "3-digit accuracy (held out)", 1),
        ("eval/acc_2digit", "2-digit accuracy (held out)", 1),
        ("opd/overlap_top1", "top-1 overlap (10-step mean)", 10),
        ("opd/reverse_kl_topk", "reverse KL, nats/token (10-step mean)", 10),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for run, rows in _by_run(results).items():
        logs = [read_jsonl(Path(lab_dir) / f"seed{r['seed']}" / run / "opd" / "metrics.jsonl") for r in rows]
        for ax, (key, title, window) in zip(axes, panels, strict=True):
            curves = [_curve(log, key, window) for log in logs]
            if key.startswith("eval/"):
                for c, r in zip(curves, rows, strict=True):
                    c[0] = r["before"].get(key, math.nan)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            vals = [[c[s] for c in curves] for s in steps]
            mean = [statistics.fmean(v) for v in vals]
            ax.plot(steps, mean, color=COLORS[run], label=f"{run} ({len(rows)} seeds)")
            if len(rows) > 1:
                ax.fill_between(
                    steps, [min(v) for v in vals], [max(v) for v in vals], color=COLORS[run], alpha=0.2
                )
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("OPD step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
