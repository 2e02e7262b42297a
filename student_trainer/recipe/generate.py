"""Teacher rollouts for the off-policy cold start (``student-trainer generate``; docs/OPD.md, section 6 "The recipe").

    table = load_prompts("prompts.jsonl", answer_field="answer")
    settings = GenerateSettings(n=4, temperature=0.7, max_tokens=12288)
    summary = generate_to_file(["http://gpu:8000"], table, settings, "rollouts.jsonl")

Each prompt goes to ``POST /v1/generate`` as its own request (``n`` samples), ``concurrency`` requests in
flight, spread over the endpoints by the client's pool. Prompt forms (``settings.template``):

- ``"chat"`` (default): chat messages, rendered server-side with the TEACHER's chat template (and
  ``settings.chat_template_kwargs``, sent as the prompt's ``chat_template_kwargs``);
- a plain string containing ``{question}``: text form, tokenized by the teacher;
- either of those rendered here with a local ``tokenizer`` (``--tokenizer DIR``) and sent as token ids.

Output: one JSON line per sample (see :func:`sample_record`), appended as soon as a prompt's ``n`` samples
are back, so an interrupted run loses only the prompts in flight. Re-running with the same output skips the
prompt ids already complete there (a torn last line or an incomplete group is dropped first) and refuses to
mix settings. With a seed, prompt row ``r`` is sampled with seed ``seed + r`` (one prompt per request, so
the hf backend's per-request seeding gives the same samples whatever the concurrency or the resume point).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.protocol import check_chat_template_kwargs
from shared.wire import GeneratedSample
from student_trainer.data.prompts import QUESTION, Messages, PromptTable
from student_trainer.errors import ConfigError
from student_trainer.teacher.client import TeacherClient
from student_trainer.teacher.errors import TeacherIncompatible

PAPER_MAX_TOKENS = 12_288  # the paper's cold-start budget (Qwen3-4B non-thinking teacher)


class GenerateError(ConfigError):
    """Bad generate settings or an output file that cannot be resumed; the message names the fix."""


@dataclass(frozen=True)
class GenerateSettings:
    """Sampling and prompt settings of one generate run (paper defaults: temperature 0.7, long budget)."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = PAPER_MAX_TOKENS
    seed: int | None = 0
    template: str = "chat"  # "chat" or a plain template containing {question}
    system_prompt: str | None = None
    stop: tuple[str, ...] = ()
    concurrency: int = 8
    chat_template_kwargs: dict[str, Any] | None = (
        None  # chat template variables, e.g. {"enable_thinking": False}
    )

    def __post_init__(self) -> None:
        try:
            check_chat_template_kwargs(self.chat_template_kwargs)
        except ValueError as exc:
            raise GenerateError(f"chat_template_kwargs={self.chat_template_kwargs!r}: {exc}") from None
        checks = (
            ("n", self.n, self.n >= 1, ">= 1"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("max_tokens", self.max_tokens, self.max_tokens >= 1, ">= 1"),
            ("concurrency", self.concurrency, self.concurrency >= 1, ">= 1"),
        )
        for name, value, ok, limit in checks:
            if not ok:
                raise GenerateError(f"{name}={value!r} is invalid: must be {limit}")
        if self.template != "chat" and QUESTION not in self.template:
            raise GenerateError(
                f"template={self.template!r} has no {QUESTION} placeholder: use 'chat' or a string such as "
                f"'Question: {QUESTION}\\nAnswer:'"
            )

    def sampling(self) -> dict[str, Any]:
        """What must match for samples of two runs to belong in one file."""
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop),
        }


@dataclass
class GenerateSummary:
    prompts_total: int
    prompts_skipped: int  # already complete in the output file
    prompts_done: int  # generated in this run
    samples_written: int
    finish_reasons: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    repaired_lines: int = 0  # torn or incomplete lines dropped before resuming

    def __str__(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.finish_reasons.items())) or "none"
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"prompts: {self.prompts_total} total, {self.prompts_skipped} already done, {self.prompts_done} "
            f"generated now | samples written {self.samples_written} (finish: {reasons}) | "
            f"{self.tokens} tokens in {self.seconds:.1f}s ({rate:.0f} tok/s)"
        )


# ------------------------------------------------------------------------------------------------ prompts


def _last_user(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def chat_messages(question: str | Messages, system_prompt: str | None) -> Messages:
    """The chat form of a question (a message list is kept as is); the system prompt goes first if absent."""
    if isinstance(question, str):
        messages = [{"role": "user", "content": question}]
    else:
        messages = [dict(m) for m in question]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_request(question: str | Messages, settings: GenerateSettings, renderer: Any = None) -> dict:
    """The wire prompt of one question: ``{"messages": ...}``, ``{"prompt": text}``, or ``{"prompt_ids": ...}``
    when a local :class:`~student_trainer.data.prompts.PromptRenderer` renders it (see :func:`local_renderer`)."""
    if renderer is not None:
        return {"prompt_ids": renderer.render(question).student_ids}
    if settings.template == "chat":
        messages = chat_messages(question, settings.system_prompt)
        if settings.chat_template_kwargs:
            return {"messages": messages, "chat_template_kwargs": dict(settings.chat_template_kwargs)}
        return {"messages": messages}
    text = question if isinstance(question, str) else _last_user(question)
    return {"prompt": settings.template.replace(QUESTION, text)}


def local_renderer(tokenizer: Any, settings: GenerateSettings) -> Any:
    """Renders prompts here exactly as ``train``/``sft`` render the student side (chat or plain template)."""
    from student_trainer.data.prompts import PromptRenderer, PromptTemplates

    templates = PromptTemplates(
        settings.template,
        "same",
        system_prompt=settings.system_prompt,
        chat_template_kwargs=dict(settings.chat_template_kwargs or {}),
    )
    return PromptRenderer(tokenizer, templates)


def sample_record(
    table: PromptTable,
    row: int,
    request: Mapping[str, Any],
    index: int,
    sample: GeneratedSample,
    meta: Mapping[str, Any],
    seed: int | None,
) -> dict[str, Any]:
    """One output line: what ``filter`` (completion, completion_ids, finish_reason) and ``sft`` (prompt_ids,
    or messages / question rendered with the student's template) read, plus provenance."""
    question = table.questions[row]
    rec: dict[str, Any] = {
        "prompt_id": table.ids[row],
        "sample_index": index,
        "question": question if isinstance(question, str) else _last_user(question),
    }
    if table.answers is not None:
        rec["answer"] = table.answers[row]
    rec.update({k: (list(map(int, v)) if k == "prompt_ids" else v) for k, v in request.items()})
    rec.update(
        completion=sample.text,
        completion_ids=sample.completion_ids.tolist(),
        finish_reason=sample.finish_reason,
        cumulative_logprob=sample.cumulative_logprob,
        num_tokens=int(len(sample.completion_ids)),
        sample_seed=seed,
        teacher=dict(meta),
    )
    return rec


# -------------------------------------------------------------------------------------- resumable output


@dataclass
class ResumeState:
    done: set[str]  # prompt ids whose n samples are all in the file
    dropped_lines: int  # torn / incomplete-group lines removed from the file
    meta: dict[str, Any] | None  # the "teacher" object of the first kept record


# the start of every record this module writes; other layouts fall back to a full JSON parse
_KEY_PREFIX = re.compile(rb'^\{"prompt_id": ("(?:[^"\\]|\\.)*"), "sample_index": (\d+),')


def _line_key(line: bytes) -> tuple[str, int] | None:
    """(prompt_id, sample_index) of one output line without parsing its (long) completion, or None."""
    m = _KEY_PREFIX.match(line)
    if m:
        return json.loads(m.group(1)), int(m.group(2))
    try:
        rec = json.loads(line)
        return str(rec["prompt_id"]), int(rec["sample_index"])
    except (ValueError, KeyError, TypeError):
        return None


def load_existing(path: str | Path, n: int) -> ResumeState:
    """Read an output file to resume: complete groups are kept; a torn last line (an interrupted write:
    no final newline) or a prompt with fewer than ``n`` samples is dropped and the file rewritten without
    it (atomically, other lines in their order). Streams the file: memory is O(lines), not O(bytes)."""
    path = Path(path)
    if not path.exists():
        return ResumeState(set(), 0, None)
    owner: list[str | None] = []  # per line: its prompt id; None = torn or blank (dropped on rewrite)
    groups: dict[str, list[int]] = {}
    torn = 0
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):  # only the last line can lack it: an interrupted write
                torn += 1
                owner.append(None)
                continue
            key = _line_key(line) if line.strip() else None
            if key is None and line.strip():
                raise GenerateError(
                    f"{path}:{lineno}: not a generate record (need JSON with prompt_id and sample_index); "
                    "write to a new --out file"
                )
            owner.append(None if key is None else key[0])
            if key is not None:
                groups.setdefault(key[0], []).append(key[1])
    complete = {k for k, indices in groups.items() if sorted(indices) == list(range(n))}
    keep = [k is not None and k in complete for k in owner]
    dropped = torn + sum(1 for k in owner if k is not None and k not in complete)
    meta = None
    if not all(keep):
        tmp = path.with_name(path.name + ".tmp")
        with path.open("rb") as src, tmp.open("wb") as dst:
            dst.writelines(line for line, kept in zip(src, keep, strict=True) if kept)
        os.replace(tmp, path)
    if complete:
        with path.open("rb") as fh:
            meta = json.loads(fh.readline()).get("teacher")
    return ResumeState(complete, dropped, meta)


_RESUME_KEYS = ("tokenizer_fingerprint", "template", "system_prompt", "chat_template_kwargs", "prompt_form")


def check_resumable(previous: Mapping[str, Any] | None, current: Mapping[str, Any], path: str | Path) -> None:
    """Refuse to append samples drawn with other settings or from another tokenizer to an existing file."""
    if previous is None:
        return
    before = {**{k: previous.get(k) for k in _RESUME_KEYS}, **(previous.get("sampling") or {})}
    now = {**{k: current.get(k) for k in _RESUME_KEYS}, **current["sampling"]}
    for key in now:
        if before.get(key) != now[key]:
            raise GenerateError(
                f"{path} holds samples generated with {key}={before.get(key)!r}, this run has {key}="
                f"{now[key]!r}: resume with the same settings or write to a new --out file"
            )


# ------------------------------------------------------------------------------------------------- run


async def generate_rollouts(
    client: TeacherClient,
    table: PromptTable,
    settings: GenerateSettings,
    out_path: str | Path,
    *,
    tokenizer: Any = None,
    rows: Sequence[int] | None = None,
    progress: bool = True,
) -> GenerateSummary:
    """Sample ``settings.n`` teacher completions for each prompt row (default: all) not yet in ``out_path``."""
    infos = await client.model_info()
    first = next(iter(infos.values()))
    if not all(info.capabilities.generate for info in infos.values()):
        raise TeacherIncompatible("a teacher endpoint cannot generate (capabilities.generate = false)")
    if settings.template == "chat" and tokenizer is None and not first.chat_template:
        raise GenerateError(
            f"template='chat' but the teacher ({first.model}) has no chat template: pass a plain template "
            f"with {QUESTION} (--template)"
        )
    limit = min(info.max_model_len for info in infos.values())
    if settings.max_tokens > limit:
        print(f"note: max_tokens {settings.max_tokens} capped to the teacher's max_model_len {limit}")
        settings = GenerateSettings(**{**asdict(settings), "max_tokens": limit})
    meta = {
        "model": first.model,
        "backend": first.backend,
        "urls": list(infos),
        "tokenizer_fingerprint": first.tokenizer_fingerprint,
        "template": settings.template,
        "system_prompt": settings.system_prompt,
        "chat_template_kwargs": settings.chat_template_kwargs or None,
        "prompt_form": "tokens"
        if tokenizer is not None
        else ("chat" if settings.template == "chat" else "text"),
        "sampling": settings.sampling(),
    }
    renderer = None if tokenizer is None else local_renderer(tokenizer, settings)
    state = load_existing(out_path, settings.n)
    check_resumable(state.meta, meta, out_path)
    wanted = range(len(table)) if rows is None else rows
    todo = [r for r in wanted if table.ids[r] not in state.done]
    summary = GenerateSummary(len(wanted), len(wanted) - len(todo), 0, 0, repaired_lines=state.dropped_lines)
    if state.dropped_lines:
        print(
            f"note: dropped {state.dropped_lines} torn or incomplete line(s) from {out_path} before resuming"
        )
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out_path, "a", encoding="utf-8") as fh, _progress(len(wanted), summary, progress) as bar:
        queue: Iterator[int] = iter(todo)

        async def worker() -> None:
            for row in queue:  # one shared iterator: each row is taken by exactly one worker
                seed = None if settings.seed is None else settings.seed + row
                request = prompt_request(table.questions[row], settings, renderer)
                samples = (
                    await client.generate(
                        [request],
                        n=settings.n,
                        temperature=settings.temperature,
                        top_p=settings.top_p,
                        max_tokens=settings.max_tokens,
                        seed=seed,
                        stop=list(settings.stop) or None,
                    )
                )[0]
                records = [
                    sample_record(table, row, request, j, s, meta, seed) for j, s in enumerate(samples)
                ]
                # one write per prompt, then flush: a crash tears at most the group being written
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                fh.flush()
                summary.prompts_done += 1
                summary.samples_written += len(records)
                for s in samples:
                    summary.finish_reasons[s.finish_reason] = (
                        summary.finish_reasons.get(s.finish_reason, 0) + 1
                    )
                    summary.tokens += len(s.completion_ids)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{summary.tokens / max(time.perf_counter() - t0, 1e-9):.0f}")

        workers = [asyncio.ensure_future(worker()) for _ in range(min(settings.concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            summary.seconds = time.perf_counter() - t0
    return summary


class _progress:
    """tqdm over prompts (``initial`` = prompts already done), or None when disabled."""

    def __init__(self, total: int, summary: GenerateSummary, enabled: bool) -> None:
        self.total, self.summary, self.enabled, self.bar = total, summary, enabled, None

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total, initial=self.summary.prompts_skipped, desc="generate", unit="prompt"
            )
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def generate_to_file(
    urls: str | Sequence[str],
    table: PromptTable,
    settings: GenerateSettings,
    out_path: str | Path,
    *,
    api_key: str | None = None,
    tokenizer: Any = None,
    rows: Sequence[int] | None = None,
    progress: bool = True,
    timeout_s: float = 3600.0,
    max_retry_wait_s: float = 600.0,
) -> GenerateSummary:
    """Synchronous entry point: build the client (``concurrency`` requests in flight per endpoint), run."""

    async def main() -> GenerateSummary:
        async with TeacherClient(
            urls,
            api_key=api_key,
            timeout_s=timeout_s,
            max_wait_s=max_retry_wait_s,
            max_inflight_per_endpoint=settings.concurrency,
        ) as client:
            return await generate_rollouts(
                client, table, settings, out_path, tokenizer=tokenizer, rows=rows, progress=progress
            )

    return asyncio.run(main())
