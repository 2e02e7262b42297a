"""Checkpoints: model, optimizer, scheduler and RNG through ``accelerator.save_state``, plus the trainer's own
state (step, data position) in ``trainer_state.json``. ``latest_checkpoint`` finds what ``--resume`` loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"checkpoint-{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save(accelerator: Any, output_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save everything needed to continue after ``step`` completed steps; prune to the ``keep`` newest.

    The trainer state file is written last, so a checkpoint interrupted mid-write is never picked up.
    """
    path = checkpoint_dir(output_dir, step)
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path / "trainer_state.json.tmp"
        tmp.write_text(json.dumps({"step": step, **state}, indent=2))
        tmp.rename(path / "trainer_state.json")
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load(accelerator: Any, path: Path) -> dict[str, Any]:
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())
