"""Teacher-aligned prompt selection (``student-trainer probe``; docs/OPD.md, section 6 "The recipe").

For each candidate (student side, teacher side) prompt pair, the CURRENT student samples rollouts on a fixed
prompt sample, the teacher scores them, and the OPD metrics are measured at step 0 with the trainer's own
step (:mod:`student_trainer.opd.step`: ``sample`` -> ``Teacher.submit`` -> ``build_batch`` -> ``forward``),
on the prompts, micro-batches and rollout seeds of the first ``train`` step over the same sample: the numbers
are the ones ``train`` would log at step 1 with that template.

Candidates (why these pairs; the completion tokens are identical on both sides in every case):

- student ``chat`` / teacher ``same``: both read the student's chat rendering.
- student ``chat`` / teacher ``chat`` ("teacher-chat"): the paper's teacher-aligned prompt. The teacher side
  is re-rendered server-side with the TEACHER's chat template; same numbers as the previous pair when the
  two templates agree, and the right pair when they do not (a post-trained teacher's own format).
- student ``'...{question}...'`` / teacher ``same``: a base student without a chat format; the teacher then
  reads a plain prompt it may never have been trained on.
- student ``'...{question}...'`` / teacher ``chat``: the teacher-aligned prompt for such a base student (the
  paper's setting: base student, post-trained teacher).
- other teacher-side plain strings are accepted (a different framing on each side) but rarely useful.

The choice: the highest overlap ratio (or ``choose_by``: the student's shared-token mass, the top-1 agreement);
candidates within ``tie_tolerance`` of it are ties, broken by the lower
per-token reverse KL (``opd/reverse_kl_topk`` when the teacher returns log-probs at the student's ids, else
the sampled-token estimate ``opd/reverse_kl_k1``). The choice is written as a ``train`` config fragment.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from student_trainer.config import Config
from student_trainer.data.prompts import QUESTION, Prompt, PromptTable
from student_trainer.errors import ConfigError

TEACHER_CHAT = "teacher-chat"  # alias of teacher side "chat" (the teacher's template, rendered server-side)
TABLE_KEYS = (
    ("overlap", "opd/overlap_ratio", "{:.3f}"),
    ("mass s", "opd/student_shared_mass", "{:.3f}"),
    ("mass t", "opd/teacher_shared_mass", "{:.3f}"),
    ("KL top-k", "opd/reverse_kl_topk", "{:.4f}"),
    ("KL k1", "opd/reverse_kl_k1", "{:.4f}"),
    ("H gap", "opd/entropy_gap", "{:+.3f}"),
)


class ProbeError(ConfigError):
    """Settings the probe cannot run with; the message names the value and the fix."""


# ---------------------------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """One (student side, teacher side) prompt pair, in ``train``'s terms: ``data.student_template`` is "chat"
    or a ``{question}`` string; ``data.teacher_prompt`` is "same", "chat" or a ``{question}`` string."""

    student_template: str
    teacher_prompt: str = "same"

    @property
    def name(self) -> str:
        student = "chat" if self.student_template == "chat" else repr(self.student_template)
        if self.teacher_prompt == "same":
            return student
        teacher = TEACHER_CHAT if self.teacher_prompt == "chat" else f"teacher {self.teacher_prompt!r}"
        return f"{student} / {teacher}"

    def data_section(self) -> dict[str, str]:
        return {"student_template": self.student_template, "teacher_prompt": self.teacher_prompt}


def make_candidates(templates: Sequence[str], teacher_prompts: Sequence[str]) -> list[Candidate]:
    """Every (student template, teacher side) pair, in the given order, duplicates removed."""
    out: list[Candidate] = []
    for s in templates:
        if s == TEACHER_CHAT:
            raise ProbeError(
                f"template {s!r} is a teacher side: pass --teacher-prompt {TEACHER_CHAT} (the student side stays "
                "'chat' or a plain template; the server renders the teacher's template)"
            )
        if s != "chat" and QUESTION not in s:
            raise ProbeError(f"template {s!r}: use 'chat' or a string containing {QUESTION}")
        for t in teacher_prompts:
            t = "chat" if t == TEACHER_CHAT else t
            if t not in ("same", "chat") and QUESTION not in t:
                raise ProbeError(
                    f"teacher prompt {t!r}: use 'same', 'chat' ({TEACHER_CHAT}) or a string containing {QUESTION}"
                )
            if Candidate(s, t) not in out:
                out.append(Candidate(s, t))
    if not out:
        raise ProbeError("no candidate templates: give at least one --template and one --teacher-prompt")
    return out


# ------------------------------------------------------------------------------------------------- results


@dataclass
class TemplateProbe:
    """Step-0 measurements of one candidate. ``metrics`` holds the ``opd/*`` means exactly as ``train``
    logs them; ``rollouts`` (kept on request) pairs each rollout with its rendered prompt."""

    candidate: Candidate
    metrics: dict[str, float]
    samples: int
    tokens: int
    eos_rate: float
    seconds: float
    rollouts: list[tuple[Prompt, Any]] | None = None

    @property
    def overlap(self) -> float:
        return self.metrics["opd/overlap_ratio"]

    @property
    def reverse_kl(self) -> float:
        """Per-token reverse KL: the top-k estimate when available (low variance), else the k1 estimate."""
        return self.metrics.get("opd/reverse_kl_topk", self.metrics["opd/reverse_kl_k1"])

    @property
    def response_length(self) -> float:
        return self.tokens / max(1, self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.candidate.name,
            **self.candidate.data_section(),
            "overlap_ratio": self.overlap,
            "reverse_kl": self.reverse_kl,
            "samples": self.samples,
            "response_length": self.response_length,
            "eos_rate": self.eos_rate,
            "seconds": self.seconds,
            "metrics": self.metrics,
        }


CHOICE_METRICS = ("opd/overlap_ratio", "opd/student_shared_mass", "opd/overlap_top1")


def choose(
    results: Sequence[TemplateProbe], tie_tolerance: float = 0.01, metric: str = "opd/overlap_ratio"
) -> TemplateProbe:
    """The highest ``metric`` (the paper's overlap ratio by default); results within ``tie_tolerance`` of
    the best tie and the lowest reverse KL among them wins (then the earliest listed)."""
    if not results:
        raise ProbeError("no probe results to choose from")
    if tie_tolerance < 0:
        raise ProbeError(f"tie_tolerance={tie_tolerance} must be >= 0")
    if metric not in CHOICE_METRICS:
        raise ProbeError(f"choose-by metric {metric!r} is not one of {', '.join(CHOICE_METRICS)}")
    missing = [r.candidate.name for r in results if metric not in r.metrics]
    if missing:
        raise ProbeError(f"{metric} was not measured for {', '.join(missing)}; choose by another metric")
    best = max(r.metrics[metric] for r in results)
    tied = [r for r in results if r.metrics[metric] >= best - tie_tolerance]
    return min(tied, key=lambda r: r.reverse_kl)  # min keeps the first of equal keys


@dataclass
class ProbeReport:
    results: list[TemplateProbe]
    chosen: TemplateProbe
    sample_size: int
    tie_tolerance: float
    teacher: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    choose_by: str = "opd/overlap_ratio"

    def fragment(self) -> dict[str, Any]:
        """The ``train`` config fragment of the choice (``--config`` it, or merge its data section)."""
        return {"data": self.chosen.candidate.data_section()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.candidate.name,
            "choose_by": self.choose_by,
            "fragment": self.fragment(),
            "sample_size": self.sample_size,
            "tie_tolerance": self.tie_tolerance,
            "teacher": self.teacher,
            "skipped": self.skipped,
            "results": [r.to_dict() for r in self.results],
        }


def format_table(results: Sequence[TemplateProbe], chosen: TemplateProbe | None = None) -> str:
    """A fixed-width table, one row per candidate; the chosen one is marked with '*'."""
    width = max(8, *(len(r.candidate.name) for r in results))
    head = f"  {'template':<{width}}  " + "  ".join(f"{h:>8}" for h, _, _ in TABLE_KEYS)
    lines = [head + f"  {'len':>6}  {'eos':>5}"]
    for r in results:
        cells = [
            (fmt.format(r.metrics[key]) if key in r.metrics else "n/a").rjust(8) for _, key, fmt in TABLE_KEYS
        ]
        mark = "*" if r is chosen else " "
        lines.append(
            f"{mark} {r.candidate.name:<{width}}  " + "  ".join(cells) + f"  {r.response_length:>6.1f}  "
            f"{r.eos_rate:>5.2f}"
        )
    return "\n".join(lines)


def write_fragment(path: str | Path, report: ProbeReport) -> Path:
    """The choice as YAML that ``student-trainer train --config`` accepts (with a comment saying why)."""
    c = report.chosen
    header = (
        f"# student-trainer probe: chose {c.candidate.name} (overlap {c.overlap:.3f}, reverse KL "
        f"{c.reverse_kl:.4f} nats/token, {report.sample_size} prompts)\n"
    )
    # ASCII JSON strings are YAML double-quoted scalars: a template with a newline stays on one line
    body = "data:\n" + "".join(
        f"  {key}: {json.dumps(value)}\n" for key, value in report.fragment()["data"].items()
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)
    return path


# --------------------------------------------------------------------------------------------- measuring


def sample_table(table: PromptTable, size: int, seed: int) -> PromptTable:
    """``size`` rows drawn without replacement (seeded), kept in source order; all rows when size >= N."""
    if size < 1:
        raise ProbeError(f"sample size {size} must be >= 1")
    if size >= len(table):
        return table
    rows = np.sort(np.random.default_rng([seed, 7]).permutation(len(table))[:size])
    answers = None if table.answers is None else [table.answers[r] for r in rows]
    return PromptTable(
        [table.questions[r] for r in rows], answers, [table.ids[r] for r in rows], table.source
    )


class Prober:
    """The student (and its rollout engine), the teacher and a prompt sample, set up as ``train`` sets them up
    from the same config; :meth:`measure` runs one group of candidates sharing a student side."""

    def __init__(self, cfg: Config, sample: PromptTable) -> None:
        import torch
        from accelerate import Accelerator

        from shared.fingerprint import tokenizer_fingerprint
        from student_trainer.opd.policy import HiddenStatesLM, load_causal_lm
        from student_trainer.rollout import build_rollout_engine
        from student_trainer.teacher.connect import connect_teacher

        if not cfg.teacher.urls:
            raise ProbeError("the probe needs a teacher endpoint: set teacher.urls (--teacher-url URL)")
        self.cfg, self.sample = cfg, sample
        gpu = torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision="bf16" if gpu and cfg.model.dtype == "auto" else "no")
        dtype = torch.float32 if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
        model, self.tokenizer = load_causal_lm(
            cfg.model.student, dtype, cfg.model.gradient_checkpointing, cfg.model.trust_remote_code
        )
        self.policy = HiddenStatesLM(model.to(self.acc.device))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.engine = build_rollout_engine(cfg, model, self.tokenizer, self.acc)
        self.teacher = connect_teacher(
            cfg, tokenizer_fingerprint(self.tokenizer), warn=lambda _: None, student_tokenizer=self.tokenizer
        )
        self.infos = self.teacher.infos
        self.teacher_has_chat = self.teacher.has_chat_template
        self.student_has_chat = bool(getattr(self.tokenizer, "chat_template", None))

    def teacher_info(self) -> dict[str, Any]:
        first = next(iter(self.infos.values()))
        return {"urls": list(self.infos), "model": first.model, "backend": first.backend}

    def _prompts(self, candidate: Candidate) -> list[Prompt]:
        """The first train step's prompts over the sample (``train.prompts_per_step`` = sample size)."""
        from student_trainer.data.prompts import PromptRenderer, PromptStream, PromptTemplates

        d = self.cfg.data
        templates = PromptTemplates(
            student=candidate.student_template,
            teacher=candidate.teacher_prompt,
            system_prompt=d.system_prompt,
        )
        stream = PromptStream(self.sample, PromptRenderer(self.tokenizer, templates), seed=d.seed)
        return stream.take(len(self.sample))

    def measure(self, candidates: Sequence[Candidate], keep_rollouts: bool = False) -> list[TemplateProbe]:
        """Candidates sharing one student template: the student samples once (seeded exactly as train's
        step 0), each teacher side scores the same rollouts."""
        from student_trainer.opd.step import rollout_seed, sample, split_micro

        if len({c.student_template for c in candidates}) != 1:
            raise ProbeError("measure() takes candidates with one student template")
        size = self.cfg.train.micro_batch_prompts
        t0 = time.perf_counter()
        micro = split_micro(self._prompts(candidates[0]), size)
        seed = self.cfg.train.seed
        batches = [
            sample(self.engine, mb, self.cfg, rollout_seed(seed, 0, 0, i), self.acc.autocast)
            for i, mb in enumerate(micro)
        ]
        gen_s = time.perf_counter() - t0
        out = []
        for c in candidates:
            t1 = time.perf_counter()
            totals, kept = None, []
            for mb, rollouts in zip(split_micro(self._prompts(c), size), batches, strict=True):
                part = self._score_and_measure(mb, rollouts)
                totals = part if totals is None else totals + part
                if keep_rollouts:
                    kept += [(mb[s.prompt_index], s) for s in rollouts.samples]
            samples = [s for b in batches for s in b.samples]
            out.append(
                TemplateProbe(
                    candidate=c,
                    metrics=totals.means(),
                    samples=len(samples),
                    tokens=sum(len(s.completion_ids) for s in samples),
                    eos_rate=sum(s.finished for s in samples) / max(1, len(samples)),
                    seconds=gen_s / len(candidates) + time.perf_counter() - t1,
                    rollouts=kept if keep_rollouts else None,
                )
            )
        return out

    def _score_and_measure(self, prompts: list[Prompt], rollouts: Any):
        """The teacher's scores (the request ``train`` sends) -> the trainer's metric totals (no loss)."""
        import torch

        from student_trainer.opd.batch import build_batch
        from student_trainer.opd.step import forward

        t = self.cfg.rollout.temperature
        scores = self.teacher.submit(prompts, rollouts, self.cfg.loss.top_k, temperature=t).result()
        batch = build_batch(rollouts.samples, scores.scores, self.pad_id, self.acc.device)
        with torch.no_grad(), self.acc.autocast():
            # the metrics do not depend on the loss variant: no loss, no graph; as train's forward
            _, totals = forward(
                self.policy,
                batch,
                self.cfg.loss,
                None,
                1.0,
                vocab_size=len(self.tokenizer),
                temperature=t,
            )
        return totals

    def close(self) -> None:
        self.teacher.close()


def applicable(
    candidates: Sequence[Candidate], student_has_chat: bool, teacher_has_chat: bool
) -> tuple[list[Candidate], list[str]]:
    """Drop pairs a side cannot render (no chat template); returns (kept, notes)."""
    kept, notes = [], []
    for c in candidates:
        if c.student_template == "chat" and not student_has_chat:
            notes.append(f"skipped {c.name}: the student tokenizer has no chat template")
        elif c.teacher_prompt == "chat" and not teacher_has_chat:
            notes.append(f"skipped {c.name}: the teacher has no chat template")
        else:
            kept.append(c)
    return kept, notes


def run_probe(
    cfg: Config,
    candidates: Sequence[Candidate],
    sample: PromptTable,
    *,
    tie_tolerance: float = 0.01,
    choose_by: str = "opd/overlap_ratio",
    keep_rollouts: bool = False,
    log: Any = print,
) -> ProbeReport:
    """Measure every applicable candidate on ``sample`` and choose one (see the module docstring)."""
    prober = Prober(cfg, sample)
    try:
        todo, skipped = applicable(candidates, prober.student_has_chat, prober.teacher_has_chat)
        for note in skipped:
            log(f"note: {note}")
        if not todo:
            raise ProbeError("no candidate template can be rendered on both sides: " + "; ".join(skipped))
        results: list[TemplateProbe] = []
        groups = list(dict.fromkeys(c.student_template for c in todo))
        for student_template in groups:
            group = [c for c in todo if c.student_template == student_template]
            results += prober.measure(group, keep_rollouts)
            for res in results[-len(group) :]:
                log(f"probe {res.candidate.name}: overlap {res.overlap:.3f}, reverse KL {res.reverse_kl:.4f}")
        results.sort(key=lambda res: todo.index(res.candidate))
        chosen = choose(results, tie_tolerance, choose_by)
        return ProbeReport(
            results, chosen, len(sample), tie_tolerance, prober.teacher_info(), skipped, choose_by
        )
    finally:
        prober.close()


def with_choice(cfg: Config, candidate: Candidate) -> Config:
    """A copy of ``cfg`` with the candidate's data.student_template / data.teacher_prompt."""
    out = copy.deepcopy(cfg)
    out.data.student_template = candidate.student_template
    out.data.teacher_prompt = candidate.teacher_prompt
    out.validate()
    return out
