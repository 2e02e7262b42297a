"""The mini-lab's glue to the real trainer: OPD configs, accuracy per operand length, the cold start.

    cfg = lab_config(student_dir, teacher_url, "prompts.jsonl", "eval.jsonl", "runs/lab/opd_A", steps=300)
    LabTrainer(cfg).train()          # OPDTrainer; its periodic eval reports accuracy per digit count

Everything runs through the project's own code: ``OPDTrainer`` against a ``teacher-server`` over HTTP,
``student_trainer.evaluate`` for accuracy (extractor ``last:;``), ``recipe.generate.generate_to_file``,
``filters.filter_rollouts`` and ``sft.run_sft`` for the off-policy cold start. ``LabTrainer`` only changes
what the periodic eval reports: ``eval/acc_<d>digit`` for every operand length d in the eval set, and
``eval/accuracy`` = the accuracy on the longest (the new skill).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from student_trainer.config import Config, from_dict
from student_trainer.lab import world
from student_trainer.opd.trainer import OPDTrainer

EXTRACTOR = "last:;"
MAX_NEW_TOKENS = 40  # the longest lab completion: 3 columns x 9 + a 4-digit answer + EOS = 32 tokens


def lab_config(
    student: str | Path,
    teacher_url: str,
    prompts: str | Path,
    eval_data: str | Path | None,
    out_dir: str | Path,
    *,
    steps: int,
    seed: int = 0,
    lr: float = 1e-3,
    top_k: int = 16,
    prompts_per_step: int = 64,
    micro_batch_prompts: int = 64,
    eval_every: int = 25,
    teacher_prompt: str = world.TEACHER_TEMPLATE,
    log_every: int = 1,
    progress_bar: bool = False,
    engine: str = "hf",
) -> Config:
    """The ``train`` config of a lab run (the same dict ``student-trainer train --config`` would read).

    Student top-k loss (k = 16 = the whole vocabulary: the exact reverse KL at every visited state), lr
    1e-3 constant, temperature 1, one response per prompt; the student reads ``{question}``, the teacher its
    own ``<bos>{question}`` (teacher-aligned prompt).
    """
    doc: dict[str, Any] = {
        "model": {"student": str(student), "dtype": "float32"},
        "teacher": {"urls": [teacher_url], "timeout_s": 120.0, "max_retry_wait_s": 120.0},
        "data": {
            "path": str(prompts),
            "answer_field": "answer",
            "student_template": world.STUDENT_TEMPLATE,
            "teacher_prompt": teacher_prompt,
            "seed": seed,
        },
        "rollout": {
            "n": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": MAX_NEW_TOKENS,
            "engine": engine,
        },
        "loss": {"type": "student_topk", "top_k": top_k},
        "optim": {"lr": lr, "schedule": "constant", "grad_clip": 1.0, "weight_decay": 0.01},
        "train": {
            "steps": steps,
            "prompts_per_step": prompts_per_step,
            "micro_batch_prompts": micro_batch_prompts,
            "seed": seed,
            "output_dir": str(out_dir),
            "save_every": 0,
            "log_every": log_every,
            "sample_every": 0,
        },
        "eval": {
            "data": None if eval_data is None else str(eval_data),
            "every": eval_every if eval_data is not None else 0,
            "extractor": EXTRACTOR,
            "max_new_tokens": MAX_NEW_TOKENS,
        },
        "logging": {"trackers": [], "plot": False, "progress_bar": progress_bar},
    }
    if engine == "vllm":  # a small fixed KV cache: these prompts + completions are < 64 tokens
        doc["rollout"].update(vllm_kv_cache_gib=0.125, vllm_max_model_len=128)
    return from_dict(doc)


def operand_digits(question: str) -> int:
    """3 for "345+278=": the length of the first operand."""
    return len(question.split("+", 1)[0])


def accuracy_by_digits(model: Any, tokenizer: Any, problems: list, template: str) -> dict[str, float]:
    """Greedy accuracy per operand length: ``{"eval/acc_2digit": .., "eval/acc_3digit": ..}``.

    problems: ``student_trainer.evaluate.Problem`` items (question "a+b=", reference a+b). One batched
    ``evaluate`` call; the per-item results are grouped by the operand length of their question.
    """
    from student_trainer.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(
        greedy=True,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=max(1, len(problems)),
        template=template,
        extractor=EXTRACTOR,
    )
    report = evaluate(model, tokenizer, problems, cfg)
    groups: dict[int, list[float]] = defaultdict(list)
    for item in report.items:
        groups[operand_digits(item.question)].append(item.pass_at_1)
    return {f"eval/acc_{d}digit": sum(v) / len(v) for d, v in sorted(groups.items())}


class LabTrainer(OPDTrainer):
    """``OPDTrainer`` whose periodic eval reports accuracy per operand length (same eval data and config)."""

    def evaluate(self) -> dict[str, float]:
        model = self.acc.unwrap_model(self.policy).causal_lm
        with self.acc.autocast():
            out = accuracy_by_digits(
                model, self.tokenizer, self.eval_problems, self.cfg.data.student_template
            )
        out["eval/accuracy"] = out[max(out, key=lambda k: int(k.split("_")[1].removesuffix("digit")))]
        return out


# ------------------------------------------------------------------------------------------- cold start


def cold_start(
    student: str | Path,
    teacher_url: str,
    problems: list[world.Problem],
    out_dir: str | Path,
    *,
    samples_per_prompt: int = 4,
    temperature: float = 0.7,
    sft_steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    log: Any = print,
) -> tuple[Path, dict[str, Any]]:
    """The paper's off-policy cold start: teacher samples (``generate``, the teacher's own template),
    ``filter``, then ``sft`` of the student on them with the student's template. Returns (model dir, stats).
    """
    from student_trainer.data.prompts import PromptTable
    from student_trainer.recipe.filters import FilterConfig, filter_rollouts
    from student_trainer.recipe.generate import GenerateSettings, generate_to_file
    from student_trainer.recipe.sft import SFTConfig, run_sft
    from student_trainer.tracking import read_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = PromptTable(
        [p.question for p in problems],
        [p.answer for p in problems],
        [str(i) for i in range(len(problems))],
        "",
    )
    settings = GenerateSettings(
        n=samples_per_prompt,
        temperature=temperature,
        max_tokens=MAX_NEW_TOKENS,
        seed=seed,
        template=world.TEACHER_TEMPLATE,  # text form: the teacher tokenizes its own template
        concurrency=4,
    )
    rollouts = out / "teacher_rollouts.jsonl"
    if rollouts.exists():
        rollouts.unlink()  # a fresh run, not a resume: the lab's numbers must come from this one
    gen = generate_to_file(teacher_url, table, settings, rollouts, progress=False)
    log(f"cold start: generate: {gen}")
    result = filter_rollouts(read_jsonl(rollouts), FilterConfig())
    log(f"cold start: filter:\n{result.summary()}")
    kept = world.write_jsonl(out / "kept.jsonl", result.kept)
    sft_dir = out / "sft"
    run_sft(
        SFTConfig(
            model=str(student),
            data=str(kept),
            output_dir=str(sft_dir),
            steps=sft_steps,
            batch_size=64,
            micro_batch=64,
            lr=lr,
            schedule="constant",
            student_template=world.STUDENT_TEMPLATE,
            seed=seed,
            log_every=max(1, sft_steps // 5),
            plot=False,
        )
    )
    right = sum(world.answer_of(r["completion"]) == r["answer"] for r in result.kept)
    stats = {
        "generated": gen.samples_written,
        "kept": len(result.kept),
        "kept_correct": right,
        "seconds": round(gen.seconds, 1),
    }
    return sft_dir, stats
