"""Record sources shared by the recipe tools: read records from a file or a dataset, write JSONL, the
question of a record."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from student_trainer.data.sources import (
    check_file_split,
    json_rows,
    load_split,
    parquet_table,
    source_kind,
)
from student_trainer.errors import DataError, DataFileNotFound

DEFAULT_QUESTION_FIELDS = ("question", "prompt")


def read_records(
    source: str | Path, *, split: str = "train", subset: str | None = None
) -> list[dict[str, Any]]:
    """Records (one dict per row) from a ``.jsonl``/``.json`` file (JSON lines or one array of objects), a
    ``.parquet`` file, or split ``split`` (of config ``subset``) of a ``datasets`` source: a ``save_to_disk``
    directory, a data directory or a Hub name (see :mod:`student_trainer.data.sources`)."""
    kind = source_kind(source)
    path = Path(source)
    if kind == "datasets":
        return load_split(str(source), split, subset=subset).to_list()
    if not path.is_file():
        raise DataFileNotFound(f"no such file: {path}")
    check_file_split(source, split)
    if kind == "parquet":
        return parquet_table(path).to_pylist()
    return [row for _, row in json_rows(path)]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (parent directories created); returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def question_text(record: dict[str, Any], field_name: str | None = None, where: str = "record") -> str:
    """The question of a record: ``field_name``, or the first of "question"/"prompt" present.

    A chat-style value (a list of {"role", "content"} messages) gives its last user message.
    """
    names = (field_name,) if field_name else DEFAULT_QUESTION_FIELDS
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if isinstance(value, list):
                users = [
                    m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"
                ]
                if not users:
                    raise DataError(f"{where}: field {name!r} is a message list without a user message")
                value = users[-1]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            return value
    raise DataError(f"{where}: no question field {' or '.join(map(repr, names))} (fields: {sorted(record)})")
