"""Accuracy of a causal LM on problems with reference answers (``student-trainer eval``, and ``train``'s
periodic held-out eval).

    report = evaluate("runs/sft", None, load_problems("test.jsonl"), EvalConfig(n=4, max_new_tokens=1024))
    print(report.summary)                     # accuracy = mean over items of pass@1
    metrics = report.summary.as_metrics()     # {"eval/accuracy": ..., "eval/eos_rate": ...}

``evaluate`` takes a directory or an already-loaded model (the trainer passes its unwrapped model; the
model's train/eval mode and the global RNG state are restored afterwards). Generation is plain transformers
``generate`` on left-padded batches. With ``n`` samples per problem, pass@1 is the mean correctness over the
n samples (an unbiased pass@1 estimate); greedy decoding is one sample. Prompts are rendered with the
tokenizer's chat template (``add_generation_prompt=True``) unless ``template`` is a string with
``{question}``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from student_trainer.data.records import question_text, read_records, write_jsonl
from student_trainer.errors import ConfigError, DataError
from student_trainer.evaluate.answers import get_checker


@dataclass(frozen=True)
class Problem:
    question: str
    reference: str


@dataclass(frozen=True)
class EvalConfig:
    """Sampling (``n`` samples at ``temperature``/``top_p``, top-k off) or ``greedy`` (one sample)."""

    n: int = 1
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 16  # sequences per generate call (n samples of one problem count n times)
    template: str | None = None  # None: the tokenizer's chat template; else a string containing {question}
    system_prompt: str | None = None  # chat template only
    extractor: str = "math"  # see student_trainer.evaluate.answers.get_checker
    seed: int | None = 0  # None: use (and advance) the caller's RNG
    progress: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be >= 1 (got {self.n})")
        if self.greedy and self.n != 1:
            raise ConfigError(f"greedy decoding gives one sample per problem: set n=1 (got n={self.n})")
        if not self.greedy and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling (got {self.temperature}); use greedy")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.template is not None and "{question}" not in self.template:
            raise ConfigError(f"template must contain '{{question}}' (got {self.template!r})")
        if self.template is not None and self.system_prompt is not None:
            raise ConfigError(
                "system_prompt applies to the chat template only; put it in the template string"
            )
        get_checker(self.extractor)  # fail now on a bad extractor spec, not after generation


@dataclass(frozen=True)
class Sample:
    text: str
    answer: str | None  # None: the extractor found no answer
    correct: bool
    num_tokens: int  # generated tokens, the EOS token included when there is one
    finished: bool  # ended with an EOS token (False: cut at max_new_tokens)


@dataclass(frozen=True)
class ItemResult:
    index: int
    question: str
    reference: str
    samples: list[Sample]

    @property
    def pass_at_1(self) -> float:
        return sum(s.correct for s in self.samples) / len(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "question": self.question,
            "reference": self.reference,
            "pass@1": self.pass_at_1,
            "samples": [s.text for s in self.samples],
            "answers": [s.answer for s in self.samples],
            "correct": [s.correct for s in self.samples],
            "num_tokens": [s.num_tokens for s in self.samples],
            "finished": [s.finished for s in self.samples],
        }


@dataclass(frozen=True)
class EvalSummary:
    accuracy: float  # mean over items of pass@1
    n_items: int
    n_samples: int
    mean_length: float  # generated tokens per sample
    eos_rate: float  # fraction of samples that ended with EOS
    extracted_rate: float  # fraction of samples where the extractor found an answer
    seconds: float
    tokens_per_s: float

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return (
            f"accuracy {self.accuracy:.4f} | items {self.n_items} | samples {self.n_samples} | "
            f"mean length {self.mean_length:.1f} | eos rate {self.eos_rate:.3f} | "
            f"extracted {self.extracted_rate:.3f} | {self.seconds:.1f}s | {self.tokens_per_s:.1f} tok/s"
        )


@dataclass(frozen=True)
class EvalReport:
    items: list[ItemResult]
    summary: EvalSummary
    config: EvalConfig = field(repr=False)


# ---------------------------------------------------------------- pure helpers


def left_pad(seqs: list[list[int]], pad_id: int):
    """Left-pad token id lists for batched generation.

    Returns (input_ids_B_L, attention_mask_B_L) int64 tensors, L = the longest sequence; padding on the left
    so every row's last prompt token sits at position L-1 and generation continues from there.
    """
    import torch

    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad: every prompt must have at least one token")
    width = max(len(s) for s in seqs)
    input_ids_B_L = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask_B_L = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids_B_L[b, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attention_mask_B_L[b, width - len(s) :] = 1
    return input_ids_B_L, attention_mask_B_L


def completion_lengths(new_tokens_B_T, eos_ids: list[int]):
    """Length and EOS flag of each generated row.

    new_tokens_B_T: the tokens after the prompt (rows that stopped early are padded afterwards).
    Returns (lengths_B, finished_B): lengths count up to and including the first EOS; a row without EOS
    was cut at the budget, so its length is T.
    """
    import torch

    is_eos_B_T = torch.isin(new_tokens_B_T, torch.tensor(eos_ids, device=new_tokens_B_T.device))
    finished_B = is_eos_B_T.any(dim=1)
    first_eos_B = is_eos_B_T.int().argmax(dim=1)  # argmax returns the first maximum
    T = new_tokens_B_T.shape[1]
    lengths_B = torch.where(finished_B, first_eos_B + 1, torch.full_like(first_eos_B, T))
    return lengths_B, finished_B


def render_prompts(
    tokenizer: Any, questions: list[str], template: str | None, system_prompt: str | None = None
) -> list[str]:
    """Prompt strings: the chat template with a generation prompt, or ``template.format(question=q)``."""
    if template is not None:
        return [template.replace("{question}", q) for q in questions]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template: pass a plain template such as '{question}' "
            "(--template on the command line)"
        )
    rendered = []
    for q in questions:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": q}
        ]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer (chat models often have several)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError("no EOS token id: neither the model's generation_config nor the tokenizer has one")
    return ids


# ---------------------------------------------------------------- generation + scoring


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) from a local directory through ``from_pretrained``, in eval mode, on ``device``
    (default: cuda when available, else cpu)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _generate(
    model: Any, tokenizer: Any, prompts: list[str], config: EvalConfig
) -> list[tuple[list[int], bool]]:
    """One (completion_ids, finished) per prompt string, generated in left-padded batches."""
    from tqdm.auto import tqdm

    # no added special tokens: a chat template renders its own, and training (prompts.py) and the teacher
    # server tokenize rendered prompts the same way, so eval sees exactly the prompts the model trains on
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = (
        {"do_sample": False}
        if config.greedy
        # top_k=0 explicitly: otherwise transformers fills it from the model's generation_config (Qwen3: 20)
        else {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
    )
    # longest prompts first so each batch pads little; results go back to their original slots
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[tuple[list[int], bool]] = [([], False)] * len(encoded)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    for batch in tqdm(batches, desc="eval", disable=not config.progress):
        input_ids_B_L, attention_mask_B_L = left_pad([encoded[i] for i in batch], pad)
        generated = model.generate(
            input_ids=input_ids_B_L.to(model.device),
            attention_mask=attention_mask_B_L.to(model.device),
            max_new_tokens=config.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
            **sampling,
        )
        new_tokens_B_T = generated[:, input_ids_B_L.shape[1] :].cpu()
        lengths_B, finished_B = completion_lengths(new_tokens_B_T, eos)
        for row, i in enumerate(batch):
            out[i] = (new_tokens_B_T[row, : lengths_B[row]].tolist(), bool(finished_B[row]))
    return out


def evaluate(
    model: Any, tokenizer: Any, problems: list[Problem], config: EvalConfig | None = None
) -> EvalReport:
    """Generate ``config.n`` completions per problem, extract and compare answers, summarise.

    model: a local model directory or a loaded causal LM (then ``tokenizer`` is required).
    """
    import torch

    config = config or EvalConfig()
    if not problems:
        raise DataError("evaluate: the problem list is empty")
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("evaluate: pass the tokenizer together with an already-loaded model")
    checker = get_checker(config.extractor)
    prompts = render_prompts(tokenizer, [p.question for p in problems], config.template, config.system_prompt)
    jobs = [i for i in range(len(problems)) for _ in range(config.n)]

    was_training = model.training
    devices = [model.device] if model.device.type == "cuda" else []
    start = time.perf_counter()
    # fork_rng: a seeded eval inside training must not change the trainer's random stream
    with torch.random.fork_rng(devices=devices, enabled=config.seed is not None), torch.inference_mode():
        if config.seed is not None:
            torch.manual_seed(config.seed)
        model.eval()
        try:
            generated = _generate(model, tokenizer, [prompts[i] for i in jobs], config)
        finally:
            model.train(was_training)
    seconds = time.perf_counter() - start

    samples_per_item: list[list[Sample]] = [[] for _ in problems]
    for i, (ids, finished) in zip(jobs, generated, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        answer, correct = checker.score(text, problems[i].reference)
        samples_per_item[i].append(Sample(text, answer, correct, len(ids), finished))
    items = [
        ItemResult(i, p.question, p.reference, s)
        for i, (p, s) in enumerate(zip(problems, samples_per_item, strict=True))
    ]
    return EvalReport(items, summarize(items, seconds), config)


def summarize(items: list[ItemResult], seconds: float = 0.0) -> EvalSummary:
    """Accuracy (mean pass@1 over items) and sample statistics over all samples."""
    samples = [s for item in items for s in item.samples]
    tokens = sum(s.num_tokens for s in samples)
    return EvalSummary(
        accuracy=sum(item.pass_at_1 for item in items) / len(items),
        n_items=len(items),
        n_samples=len(samples),
        mean_length=tokens / len(samples),
        eos_rate=sum(s.finished for s in samples) / len(samples),
        extracted_rate=sum(s.answer is not None for s in samples) / len(samples),
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
    )


# ---------------------------------------------------------------- files


def load_problems(
    path: str | Path,
    question_field: str | None = None,
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[Problem]:
    """Problems from JSONL or parquet: the question field (default "question", then "prompt") and the
    reference answer field (converted to a string: numbers in JSON are common)."""
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    problems = []
    for i, rec in enumerate(records):
        if answer_field not in rec or rec[answer_field] is None:
            raise DataError(
                f"{path}: record {i} has no answer field {answer_field!r} (fields: {sorted(rec)})"
            )
        problems.append(
            Problem(question_text(rec, question_field, where=f"{path}: record {i}"), str(rec[answer_field]))
        )
    return problems


def write_results(report: EvalReport, path: str | Path) -> None:
    """One JSON line per problem (see ``ItemResult.to_dict``)."""
    write_jsonl(path, (item.to_dict() for item in report.items))
