"""Step metrics: JSONL (always), accelerate trackers (TensorBoard / W&B when installed), a one-line summary
per step on rank 0, and a PNG of the curves at the end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from student_trainer.errors import ConfigError

SUMMARY_KEYS = (
    ("loss", "opd/loss", "{:.4f}"),
    ("kl", "opd/reverse_kl", "{:.4f}"),
    ("overlap", "opd/overlap_ratio", "{:.3f}"),
    ("top1", "opd/overlap_top1", "{:.3f}"),
    ("ent_gap", "opd/entropy_gap", "{:+.3f}"),
    ("len", "rollout/response_length", "{:.0f}"),
    ("wait", "time/teacher_wait_share", "{:.0%}"),
    ("tok/s", "time/tokens_per_s", "{:.0f}"),
    ("acc", "eval/accuracy", "{:.3f}"),  # on the steps that ran the held-out eval
)
PLOT_KEYS = (
    "opd/loss",
    "opd/reverse_kl",
    "opd/overlap_ratio",
    "opd/entropy_gap",
    "opd/shared_mass_student",
    "opd/overlap_advantage",
    "rollout/response_length",
    "eval/accuracy",
)


def available_trackers(requested: list[str]) -> list[str]:
    """The accelerate trackers among ``requested`` whose packages are installed (jsonl is ours, always on)."""
    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    out = []
    for name in requested:
        if name == "jsonl":
            continue
        if name not in packages:
            raise ConfigError(f"logging.trackers: unknown tracker {name!r}; use jsonl, tensorboard or wandb")
        if importlib.util.find_spec(packages[name]) is not None:
            out.append(name)
        else:
            print(f"note: tracker {name!r} requested but {packages[name]} is not installed; skipping it")
    return out


class JsonlLog:
    """Append-only metrics file. On resume, lines for steps >= the resume step are dropped first, so the
    file holds each step exactly once."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [
                ln
                for ln in path.read_text().splitlines()
                if ln and json.loads(ln).get("step", -1) < resume_step
            ]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def summary_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step:>{len(str(total))}}/{total}"]
    for label, key, fmt in SUMMARY_KEYS:
        if key in metrics and metrics[key] is not None and not math.isnan(metrics[key]):
            parts.append(f"{label} {fmt.format(metrics[key])}")
    if "memory/peak_gib" in metrics:
        parts.append(f"mem {metrics['memory/peak_gib']:.1f}G")
    return " | ".join(parts)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_metrics(
    jsonl_path: Path, png_path: Path, keys: tuple[str, ...] = PLOT_KEYS, title: str = ""
) -> Path | None:
    """Curves of ``keys`` over steps in one PNG; None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install 'opd-distill[plot]'); no plot written")
        return None
    rows = read_jsonl(jsonl_path)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    cols = min(4, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, present, strict=False):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
