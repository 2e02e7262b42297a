"""Record files shared by the recipe tools: JSONL / parquet readers and writers, the question of a record."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from student_trainer.errors import DataError, DataFileNotFound, MissingDependencyError

DEFAULT_QUESTION_FIELDS = ("question", "prompt")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from ``.jsonl``/``.json`` lines or ``.parquet`` (needs pyarrow)."""
    path = Path(path)
    if not path.exists():
        raise DataFileNotFound(f"no such file: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise MissingDependencyError(
                f"reading {path} needs pyarrow: pip install 'opd-distill[data]'"
            ) from exc
        return pq.read_table(path).to_pylist()
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records


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
