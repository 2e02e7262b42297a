"""Prompt data for OPD: load questions, render them for the student and the teacher, serve seeded batches.

    table = load_prompts("train.jsonl", question_field="problem", answer_field="answer")
    renderer = PromptRenderer(tokenizer, PromptTemplates(student="chat", teacher="same"))
    stream = PromptStream(table, renderer, seed=0)               # or position=DataPosition(**saved)
    prompts = stream.take(64)                                     # list[Prompt], the next 64 in order
    saved = stream.state_dict()                                   # {"epoch", "index", "seed", "size"}
    stream.load_state_dict(saved)                                 # continue exactly after --resume

Sources (``load_prompts``, read by :mod:`student_trainer.data.sources`): a ``.jsonl``/``.json`` file (JSON
lines or one array of objects), a ``.parquet`` file, or a Hugging Face ``datasets`` dataset (a
``save_to_disk`` directory, a local data directory or a Hub name) of which ``split`` is read. A question
is a string or a list of chat messages (``[{"role": ..., "content": ...}]``, as in verl-style datasets).

Rendering (``PromptTemplates``): the student side is ``"chat"`` (the student tokenizer's chat template with
``add_generation_prompt=True``, optional system prompt) or a plain template containing ``{question}``. The
teacher side (the "teacher-aligned prompt" of docs/OPD.md, section 6; completion tokens stay identical either way) is
``"same"`` (the student's prompt ids), ``"chat"`` (messages that the teacher server renders with the
TEACHER's chat template: ScoreSequence chat form) or a plain template tokenized with the shared tokenizer.
Templates are filled with ``str.replace``, so literal braces such as ``\\boxed{}`` need no escaping.
Rendered text is tokenized with ``add_special_tokens=False``, exactly as the teacher server does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.protocol import check_chat_template_kwargs
from student_trainer.data.sources import (
    check_file_split,
    json_rows,
    load_split,
    parquet_columns,
    parquet_table,
    source_kind,
)
from student_trainer.errors import DataError

QUESTION = "{question}"

Messages = list[dict[str, str]]


class PromptDataError(DataError):
    """Bad prompt data or template settings; the message names the value and the fix."""


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class PromptTable:
    """All prompts of one source, in source order. ``questions[i]`` is a string or a list of messages."""

    questions: list[str | Messages]
    answers: list[str | None] | None
    ids: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.questions)


def load_prompts(
    source: str | Path,
    *,
    question_field: str = "question",
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str = "train",
    subset: str | None = None,
    data_format: str = "auto",
) -> PromptTable:
    """Read prompts from ``source``. ``data_format``: auto | jsonl | parquet | datasets.

    ``source``: a ``.jsonl``/``.json`` or ``.parquet`` file (one split, ``train``), or a ``datasets`` source
    (a ``save_to_disk`` directory, a data directory, a Hub name) of which ``split`` (of config ``subset``)
    is read. The stable prompt id is ``str(row[id_field])`` when ``id_field`` is given, else the row's index
    in the source. Answers (when ``answer_field`` is given) are kept as strings for evaluation.
    """
    fmt = _detect_format(source, data_format)
    fields = [f for f in (question_field, answer_field, id_field) if f is not None]
    if fmt == "datasets":
        columns = _read_datasets(str(source), fields, split, subset)
    else:
        check_file_split(source, split, PromptDataError)
        read = _read_jsonl if fmt == "jsonl" else _read_parquet
        columns = read(Path(source), fields)
    return _to_table(columns, str(source), question_field, answer_field, id_field)


def _detect_format(source: str | Path, data_format: str) -> str:
    formats = ("auto", "jsonl", "parquet", "datasets")
    if data_format not in formats:
        raise PromptDataError(f"data_format={data_format!r} is not one of {formats}")
    if data_format != "auto":
        return data_format
    kind = source_kind(source, PromptDataError)
    if kind != "datasets" and not Path(source).is_file():
        raise PromptDataError(f"prompt file {str(source)!r} does not exist")
    return {"json": "jsonl"}.get(kind, kind)


def _missing_field(fieldname: str, available: Sequence[str], where: str) -> PromptDataError:
    return PromptDataError(
        f"{where}: no field {fieldname!r}; available fields: {sorted(available)} "
        "(set question_field / answer_field / id_field to one of them)"
    )


def _read_jsonl(path: Path, fields: list[str]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {f: [] for f in fields}
    for where, row in json_rows(path, PromptDataError):
        for f in fields:
            if f not in row:
                raise _missing_field(f, list(row), where)
            columns[f].append(row[f])
    return columns


def _read_parquet(path: Path, fields: list[str]) -> dict[str, list[Any]]:
    names = parquet_columns(path)
    for f in fields:
        if f not in names:
            raise _missing_field(f, names, str(path))
    return parquet_table(path, list(dict.fromkeys(fields))).to_pydict()


def _read_datasets(source: str, fields: list[str], split: str, subset: str | None) -> dict[str, list[Any]]:
    ds = load_split(source, split, subset=subset, error=PromptDataError)
    for f in fields:
        if f not in ds.column_names:
            raise _missing_field(f, ds.column_names, f"{source} (split {split!r})")
    return ds.select_columns(list(dict.fromkeys(fields))).to_dict()


def _to_table(
    columns: dict[str, list[Any]],
    source: str,
    question_field: str,
    answer_field: str | None,
    id_field: str | None,
) -> PromptTable:
    questions = columns[question_field]
    if not questions:
        raise PromptDataError(f"{source}: the prompt source is empty (no rows)")
    checked = [
        _check_question(q, f"{source}: row {i} field {question_field!r}") for i, q in enumerate(questions)
    ]
    answers = None
    if answer_field is not None:
        answers = [None if a is None else str(a) for a in columns[answer_field]]
    if id_field is None:
        ids = [str(i) for i in range(len(questions))]
    else:
        ids = [str(v) for v in columns[id_field]]
        if len(set(ids)) != len(ids):
            dup = next(v for v in ids if ids.count(v) > 1)
            raise PromptDataError(f"{source}: id_field {id_field!r} is not unique (value {dup!r} repeats)")
    return PromptTable(checked, answers, ids, source)


def _check_question(value: Any, where: str) -> str | Messages:
    if isinstance(value, str):
        if not value.strip():
            raise PromptDataError(f"{where}: the question is empty")
        return value
    if isinstance(value, Sequence) and value and all(isinstance(m, Mapping) for m in value):
        messages = [dict(m) for m in value]
        for j, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise PromptDataError(
                    f"{where}[{j}]: a chat message needs string 'role' and 'content', got {m}"
                )
        if not any(m["role"] == "user" for m in messages):
            raise PromptDataError(f"{where}: the chat messages have no 'user' message")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise PromptDataError(
        f"{where}: expected a string or a list of chat messages, got {type(value).__name__} {value!r:.80}"
    )


# ---------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class PromptTemplates:
    """How a question becomes prompt tokens on each side.

    student: "chat" or a plain template containing ``{question}``.
    teacher: "same" (student ids) | "chat" (messages, rendered by the teacher's chat template) | a plain
        template containing ``{question}`` (tokenized with the shared tokenizer).
    user_template: the user message content in the chat renderings (``{question}`` = the question as is).
    system_prompt: prepended as a system message in chat renderings ("" or None = none).
    teacher_system_prompt: the teacher side's system prompt; None = the same as ``system_prompt``.
    chat_template_kwargs: extra variables of the chat template, the keyword arguments of
        ``apply_chat_template`` (for example ``{"enable_thinking": False}`` for Qwen3), for the student's chat
        rendering and, with ``teacher="chat"``, sent with the messages so the teacher server renders its side
        with them too (``ScoreSequence.chat_template_kwargs``).
    """

    student: str = "chat"
    teacher: str = "same"
    user_template: str = QUESTION
    system_prompt: str | None = None
    teacher_system_prompt: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:  # the server's own check: a reserved name (tokenize, messages, ...) or a nested value fails here
            check_chat_template_kwargs(self.chat_template_kwargs)
        except ValueError as exc:
            raise PromptDataError(f"chat_template_kwargs={self.chat_template_kwargs!r}: {exc}") from None
        for name, value, keywords in (
            ("student", self.student, ("chat",)),
            ("teacher", self.teacher, ("same", "chat")),
            ("user_template", self.user_template, ()),
        ):
            if value not in keywords and QUESTION not in value:
                allowed = " or ".join(repr(k) for k in keywords)
                raise PromptDataError(
                    f"{name}={value!r} has no {QUESTION} placeholder; use "
                    + (f"{allowed} or " if allowed else "")
                    + f"a template string containing {QUESTION}"
                )


@dataclass(frozen=True)
class Prompt:
    """One rendered prompt. Exactly one of ``teacher_ids`` / ``teacher_messages`` is set."""

    prompt_id: str
    question: str
    answer: str | None
    student_ids: list[int]
    teacher_ids: list[int] | None = None
    teacher_messages: Messages | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # chat form: the teacher's template variables

    def teacher_fields(self) -> dict[str, Any]:
        """The prompt part of a ``shared.protocol.ScoreSequence``: ``prompt_ids`` (token form) or
        ``messages`` (chat form, plus ``chat_template_kwargs`` when there are any); add ``completion_ids``
        to score a completion."""
        if self.teacher_messages is not None:
            if self.chat_template_kwargs:
                return {"messages": self.teacher_messages, "chat_template_kwargs": self.chat_template_kwargs}
            return {"messages": self.teacher_messages}
        return {"prompt_ids": self.teacher_ids}


class PromptRenderer:
    """Turns (question, answer, id) into a :class:`Prompt` with a tokenizer shared by student and teacher."""

    def __init__(self, tokenizer: Any, templates: PromptTemplates | None = None) -> None:
        self.tokenizer = tokenizer
        self.templates = templates or PromptTemplates()
        if self.templates.student == "chat" and not getattr(tokenizer, "chat_template", None):
            raise PromptDataError(
                "student='chat' but the student tokenizer has no chat template; set student to a plain "
                f"template string containing {QUESTION} (for example 'Question: {QUESTION}\\nAnswer:')"
            )

    def render(self, question: str | Messages, answer: str | None = None, prompt_id: str = "") -> Prompt:
        t = self.templates
        text = question if isinstance(question, str) else _last_user(question)
        student_msgs = self._messages(question, t.system_prompt)
        if t.student == "chat":
            student_ids = self._chat_ids(student_msgs)
        else:
            student_ids = self._ids(t.student.replace(QUESTION, text))
        if t.teacher == "same":
            return Prompt(prompt_id, text, answer, student_ids, teacher_ids=student_ids)
        if t.teacher == "chat":
            system = t.system_prompt if t.teacher_system_prompt is None else t.teacher_system_prompt
            return Prompt(
                prompt_id,
                text,
                answer,
                student_ids,
                teacher_messages=self._messages(question, system),
                chat_template_kwargs=dict(t.chat_template_kwargs) or None,
            )
        teacher_ids = self._ids(t.teacher.replace(QUESTION, text))
        return Prompt(prompt_id, text, answer, student_ids, teacher_ids=teacher_ids)

    def _messages(self, question: str | Messages, system: str | None) -> Messages:
        if isinstance(question, str):
            msgs = [{"role": "user", "content": self.templates.user_template.replace(QUESTION, question)}]
        else:
            msgs = [dict(m) for m in question]
        if system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    def _chat_ids(self, messages: Messages) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **self.templates.chat_template_kwargs
        )
        return self._ids(text)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _last_user(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


# ------------------------------------------------------------------------------------------------ stream


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: ``index`` prompts of epoch ``epoch``'s shuffled order are consumed."""

    epoch: int = 0
    index: int = 0


class PromptStream:
    """Endless, seeded, resumable sequence of rendered prompts.

    Epoch ``e`` visits every prompt once in the order ``permutation(seed, e)`` (numpy PCG64 seeded with
    ``[seed, e]``, so an order never depends on what was consumed before); a batch that reaches the end of
    an epoch continues into the next one. The order depends only on (seed, epoch, table size), so the
    position alone is enough to resume exactly.
    """

    def __init__(
        self,
        table: PromptTable,
        renderer: PromptRenderer,
        seed: int = 0,
        *,
        shuffle: bool = True,
        position: DataPosition | None = None,
    ) -> None:
        self.table, self.renderer, self.seed, self.shuffle = table, renderer, int(seed), shuffle
        self._order_epoch, self._order = -1, np.arange(0)
        self.position = DataPosition()
        self.seek(position or DataPosition())
        self.renderer.render(table.questions[0], None, table.ids[0])  # template errors now, not at step N

    def order(self, epoch: int) -> np.ndarray:
        """(N,) source row indices in epoch ``epoch``'s visiting order."""
        if epoch != self._order_epoch:
            n = len(self.table)
            self._order = (
                np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            )
            self._order_epoch = epoch
        return self._order

    def seek(self, position: DataPosition) -> None:
        if position.epoch < 0 or not 0 <= position.index <= len(self.table):
            raise PromptDataError(
                f"data position {position} is outside the data (epoch >= 0, 0 <= index <= {len(self.table)})"
            )
        self.position = position

    def take(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts (rendered); advances the position."""
        if n < 1:
            raise PromptDataError(f"take(n={n}): n must be at least 1")
        rows = []
        epoch, index = self.position.epoch, self.position.index
        while len(rows) < n:
            if index == len(self.table):
                epoch, index = epoch + 1, 0
            rows.append(int(self.order(epoch)[index]))
            index += 1
        self.position = DataPosition(epoch, index)
        answers = self.table.answers
        return [
            self.renderer.render(
                self.table.questions[r], None if answers is None else answers[r], self.table.ids[r]
            )
            for r in rows
        ]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.position.epoch,
            "index": self.position.index,
            "seed": self.seed,
            "size": len(self.table),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at a saved position; refuses if the seed or the data size changed (the order would differ)."""
        for key, now in (("seed", self.seed), ("size", len(self.table))):
            if int(state[key]) != now:
                raise PromptDataError(
                    f"cannot resume the prompt stream: the checkpoint has {key}={state[key]} but this run has "
                    f"{key}={now}; resume with the same prompt data and data seed"
                )
        self.seek(DataPosition(int(state["epoch"]), int(state["index"])))
