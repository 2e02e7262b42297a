"""Where records come from: one place that tells a file from a dataset and reads either.

    kind = source_kind("train.jsonl")                       # "json" | "parquet" | "datasets"
    for where, row in json_rows(Path("train.jsonl")): ...   # ("train.jsonl:3", {...}) per object
    ds = load_split("openai/gsm8k", "test", subset="main")  # a datasets.Dataset

A ``.jsonl`` / ``.json`` file (JSON lines, or one JSON array of objects) and a ``.parquet`` file are read here
directly (exact line numbers in errors, no schema unification across rows, no cache). Anything else is a
Hugging Face ``datasets`` source: a ``save_to_disk`` directory (``datasets.load_from_disk``), a local data
directory (files named by split, e.g. ``train.jsonl`` / ``data/test-00000-of-00001.parquet``) or a Hub
name (``datasets.load_dataset``). A single file is one split, named ``train`` as ``datasets`` names it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from student_trainer.errors import DataError

FILE_SPLIT = "train"  # the split name of a single file (what datasets calls it too)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
KINDS = ("json", "parquet", "datasets")


def source_kind(source: str | Path, error: type[DataError] = DataError) -> str:
    """``json`` / ``parquet`` for an existing file with that suffix, else ``datasets`` (a directory or a Hub
    name). A file with another suffix is an error naming the suffixes understood."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES + PARQUET_SUFFIXES and not path.is_dir():
        return "json" if suffix in JSON_SUFFIXES else "parquet"
    if path.is_file():
        raise error(
            f"cannot tell the format of {str(source)!r} from its suffix {suffix!r}: name it .jsonl, .json or "
            ".parquet, or save it as a datasets directory (Dataset.save_to_disk)"
        )
    return "datasets"


def check_file_split(source: str | Path, split: str, error: type[DataError] = DataError) -> None:
    """A single file is the ``train`` split; asking it for another one is an error, not silently ignored."""
    if split != FILE_SPLIT:
        raise error(
            f"{source}: no split {split!r}; available splits: [{FILE_SPLIT!r}] (a single file is one split; "
            f"set the split to {FILE_SPLIT!r} or give a dataset directory / Hub name with a {split!r} split)"
        )


def json_rows(path: Path, error: type[DataError] = DataError) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every object of a JSON-lines file or of a file holding one JSON array of objects;
    ``where`` is ``path:line`` (lines) or ``path[i]`` (array), for error messages."""
    with path.open(encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
        fh.seek(0)
        if head.startswith("["):
            try:
                items = json.load(fh)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            for i, row in enumerate(items):
                where = f"{path}[{i}]"
                if not isinstance(row, dict):
                    raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
            return
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def parquet_table(path: Path, columns: list[str] | None = None) -> Any:
    """The ``pyarrow.Table`` of a parquet file (only ``columns`` when given)."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=columns)


def parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def load_split(
    source: str, split: str = FILE_SPLIT, *, subset: str | None = None, error: type[DataError] = DataError
) -> Any:
    """Split ``split`` of a datasets source as a ``datasets.Dataset``.

    A ``save_to_disk`` directory is opened with ``load_from_disk``; a data directory or a Hub name with
    ``load_dataset(source, subset, split=split)`` (only that split is prepared). A missing split is one line
    naming the split asked for and the splits available; other load failures are one line too.
    """
    import datasets

    path = Path(source)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise _no_split(source, split, list(ds), error)
            return ds[split]
        if split != FILE_SPLIT:  # a saved single Dataset has no split names: it is the whole data
            raise _no_split(source, split, [FILE_SPLIT], error)
        return ds
    try:
        return datasets.load_dataset(source, subset, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower() and "unknown" in str(exc).lower():
            raise _no_split(source, split, _split_names(source, subset), error) from None
        raise _load_error(source, exc, error) from None
    except Exception as exc:  # DatasetNotFoundError, ConnectionError (offline), missing subset, bad files
        raise _load_error(source, exc, error) from None


def _split_names(source: str, subset: str | None) -> list[str] | str:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(source, subset))
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def _no_split(source: str, split: str, available: list[str] | str, error: type[DataError]) -> DataError:
    return error(
        f"{source}: no split {split!r}; available splits: {available} (set the split to one of them)"
    )


def _load_error(source: str, exc: Exception, error: type[DataError]) -> DataError:
    first = " ".join(str(exc).split()) or type(exc).__name__
    where = "the local directory" if Path(source).is_dir() else "the Hugging Face Hub dataset"
    return error(
        f"{source!r} is not a .jsonl/.json/.parquet file, so it was loaded as {where} {source!r}, which "
        f"failed: {type(exc).__name__}: {first[:300]}"
    )
