"""Train the mini-lab's three models with the project's own ``sft`` on generated data (seeded).

    python -m student_trainer.lab.build --out student_trainer/lab/models        # ~4 min on 2 CPU cores

teacher_a, teacher_b: Qwen3, 4 layers x 128 (head_dim 32), trained on 2- and 3-digit problems in format A
(resp. B) with the teachers' template ``<bos>{question}``. student: 2 layers x 128, format A, 1- and 2-digit
problems only, plain ``{question}`` template: it has never seen a 3-digit problem. Each model starts from
random weights (seeded) saved with ``save_pretrained`` and is trained by ``student-trainer sft`` in its own
process (one thread each, two at a time; data and initialisations are prepared first, one model at a time,
so the weights do not depend on how the processes interleave: two builds give bit-identical weights on one
machine). The fixed held-out eval problems (``eval_problems``) are kept out of every training set; the
accuracies are measured on them and written to ``<model>/lab_card.json`` with the settings and the weights'
sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from student_trainer.errors import ConfigError
from student_trainer.lab import world

MODELS_DIR = Path(__file__).parent / "models"
EVAL_SEED = 1234  # fixed: the held-out problems are the same in the build, the lab and the tests
EVAL_COUNTS = {2: 200, 3: 200}
KEPT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class ModelRecipe:
    """What one shipped model is: shape, thinking pattern, problem mix, prompt template, SFT settings."""

    name: str
    layers: int
    fmt: str
    mix: dict[int, float]  # {operand digits: weight} of the training problems
    template: str
    hidden: int = 128
    heads: int = 4
    intermediate: int = 256
    steps: int = 750
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    examples: int = 48_000  # generated SFT records (steps * batch_size: about one epoch)


RECIPES = {
    "teacher_a": ModelRecipe("teacher_a", 4, "A", {2: 1.0, 3: 2.0}, world.TEACHER_TEMPLATE),
    "teacher_b": ModelRecipe("teacher_b", 4, "B", {2: 1.0, 3: 2.0}, world.TEACHER_TEMPLATE),
    "student": ModelRecipe("student", 2, "A", {1: 1.0, 2: 3.0}, world.STUDENT_TEMPLATE),
}


def eval_problems() -> dict[int, list[world.Problem]]:
    """The fixed held-out problems per digit count (never trained on, by any model or OPD run)."""
    rng = random.Random(EVAL_SEED)
    return {d: world.sample_problems(rng, d, n) for d, n in EVAL_COUNTS.items()}


def held_out() -> list[world.Problem]:
    return [p for ps in eval_problems().values() for p in ps]


def training_problems(recipe: ModelRecipe, seed: int) -> list[world.Problem]:
    """``recipe.examples`` problems drawn from the recipe's mix, held-out problems removed."""
    banned = {(p.a, p.b) for p in held_out()}
    rng = random.Random(f"{recipe.name}:{seed}")
    out: list[world.Problem] = []
    while len(out) < recipe.examples:
        out.extend(
            p
            for p in world.mixed_problems(rng, recipe.mix, recipe.examples - len(out))
            if (p.a, p.b) not in banned
        )
    return out


def init_model(recipe: ModelRecipe, out_dir: Path, seed: int) -> Path:
    """Random-weight Qwen3 of the recipe's shape + the character tokenizer, saved with save_pretrained."""
    from devkit.tiny_models import TinySpec, save_tiny

    spec = TinySpec(
        hidden_size=recipe.hidden,
        num_layers=recipe.layers,
        num_heads=recipe.heads,
        num_kv_heads=recipe.heads,
        head_dim=recipe.hidden // recipe.heads,
        intermediate_size=recipe.intermediate,
        max_position_embeddings=128,
        initializer_range=0.02,  # transformers' default: this one is trained, not a random scorer
    )
    return save_tiny(out_dir, spec, seed=seed, tokenizer=world.build_tokenizer())


def sft_command(recipe: ModelRecipe, init: Path, data: Path, out: Path, seed: int) -> list[str]:
    """The ``student-trainer sft`` invocation that trains one model."""
    return [
        sys.executable,
        "-m",
        "student_trainer",
        "sft",
        "--model",
        str(init),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--steps",
        str(recipe.steps),
        "--batch-size",
        str(recipe.batch_size),
        "--micro-batch",
        str(recipe.batch_size),
        "--lr",
        str(recipe.lr),
        "--schedule",
        "cosine",
        "--warmup-steps",
        str(recipe.warmup_steps),
        "--student-template",
        recipe.template,
        "--seed",
        str(seed),
        "--no-plot",
    ]


def single_thread_env() -> dict[str, str]:
    """Environment for a worker process that must use one core (several run side by side)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def card_accuracy(
    model_dir: Path, template: str, problems: dict[int, list[world.Problem]]
) -> dict[str, float]:
    """Greedy held-out accuracy per operand length, ``{"acc_2digit": .., "acc_3digit": ..}`` (through
    ``student_trainer.evaluate``, extractor ``last:;``)."""
    from student_trainer.evaluate import Problem, load_model
    from student_trainer.lab.opd import accuracy_by_digits

    model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
    items = [Problem(p.question, p.answer) for d in sorted(problems) for p in problems[d]]
    acc = accuracy_by_digits(model, tokenizer, items, template)
    return {k.removeprefix("eval/"): round(v, 4) for k, v in acc.items()}


def prepare(recipe: ModelRecipe, work: Path, seed: int) -> tuple[Path, Path]:
    """The SFT data and the seeded random initialisation of one model: (data file, init dir).

    Runs in the main thread, one model after the other: torch's global RNG seeds the initialisation, and two
    threads seeding and drawing from it at once would make the weights depend on the interleaving.
    """
    data = world.write_jsonl(
        work / f"{recipe.name}.jsonl", world.sft_records(training_problems(recipe, seed), recipe.fmt)
    )
    return data, init_model(recipe, work / f"{recipe.name}_init", seed=seed + len(recipe.name))


def run_sft_process(recipe: ModelRecipe, data: Path, init: Path, work: Path, seed: int) -> Path:
    """``student-trainer sft`` in its own single-thread process; returns its output directory."""
    sft_out = work / f"{recipe.name}_sft"
    log = work / f"{recipe.name}_sft.log"
    with log.open("w") as fh:
        rc = subprocess.call(
            sft_command(recipe, init, data, sft_out, seed),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=single_thread_env(),
        )
    if rc != 0:
        raise RuntimeError(f"sft of {recipe.name} failed (exit {rc}); log: {log}\n{log.read_text()[-2000:]}")
    return sft_out


def finish(recipe: ModelRecipe, sft_out: Path, out_dir: Path, seed: int, seconds: float) -> dict[str, Any]:
    """Copy the model files to ``out_dir/<name>``, measure its accuracy, write its ``lab_card.json``."""
    target = out_dir / recipe.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in KEPT_FILES:
        if (sft_out / name).exists():
            shutil.copy(sft_out / name, target / name)
    card = {
        "recipe": asdict(recipe),
        "seed": seed,
        "sft_seconds": round(seconds, 1),
        "final_sft_loss": _last_loss(sft_out / "metrics.jsonl"),
        "eval": card_accuracy(target, recipe.template, eval_problems()),
        "eval_problems": {str(d): n for d, n in EVAL_COUNTS.items()} | {"seed": EVAL_SEED},
        "weights_sha256": hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest(),
    }
    (target / "lab_card.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def _last_loss(path: Path) -> float | None:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return round(json.loads(lines[-1])["sft/loss"], 5) if lines else None


def build_all(
    out_dir: str | Path = MODELS_DIR,
    work_dir: str | Path | None = None,
    seed: int = 0,
    names: tuple[str, ...] = tuple(RECIPES),
    steps: int | None = None,
    parallel: int = 2,
) -> dict[str, dict[str, Any]]:
    """Train ``names`` (two at a time by default) into ``out_dir``; returns each model's card."""
    import tempfile

    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown}; choose from {sorted(RECIPES)}")
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="lab-build-"))
    work.mkdir(parents=True, exist_ok=True)
    recipes = [RECIPES[n] if steps is None else _with_steps(RECIPES[n], steps) for n in names]
    inputs = [prepare(r, work, seed) for r in recipes]

    def sft(i: int) -> tuple[Path, float]:
        t0 = time.perf_counter()
        return run_sft_process(recipes[i], *inputs[i], work, seed), time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:  # threads only wait on subprocesses
        outputs = list(pool.map(sft, range(len(recipes))))
    return {
        r.name: finish(r, sft_out, out, seed, seconds)
        for r, (sft_out, seconds) in zip(recipes, outputs, strict=True)
    }


def _with_steps(recipe: ModelRecipe, steps: int) -> ModelRecipe:
    from dataclasses import replace

    return replace(recipe, steps=steps, examples=max(steps * recipe.batch_size, recipe.batch_size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(MODELS_DIR), help="where the models go (one folder per model)")
    p.add_argument("--work", default=None, help="scratch folder for data, logs and SFT outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=None, help="override every recipe's SFT steps (quick checks)")
    p.add_argument("--parallel", type=int, default=2, help="SFT processes at a time (one thread each)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cards = build_all(args.out, args.work, args.seed, tuple(args.models), args.steps, args.parallel)
    for name, card in cards.items():
        print(f"{name}: {card['eval']} (sft loss {card['final_sft_loss']}, sft {card['sft_seconds']} s)")
    print(f"built {len(cards)} model(s) into {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
