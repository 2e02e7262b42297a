"""Data sources through `datasets`: JSONL, a JSON array, parquet, a `save_to_disk` directory, a data directory
of split files, and a Hub name, read by `load_prompts` and `read_records` alike; `split` selects, a missing
split is one line naming the split asked for and the splits there are."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from student_trainer.data.prompts import PromptDataError, load_prompts
from student_trainer.data.records import read_records
from student_trainer.errors import DataError, DataFileNotFound

TRAIN = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "uid": f"t{i}"} for i in range(5)]
TEST = [{"question": f"What is {i} * 2?", "answer": str(2 * i), "uid": f"e{i}"} for i in range(3)]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def sources(tmp_path):
    """The same TRAIN rows in every single-split form, and TRAIN/TEST in every split-aware form."""
    single = {
        "jsonl": jsonl(tmp_path / "p.jsonl", TRAIN),
        "json_array": tmp_path / "p.json",
        "parquet": tmp_path / "p.parquet",
        "saved_dataset": tmp_path / "saved_dataset",
    }
    single["json_array"].write_text(json.dumps(TRAIN, indent=1))
    pq.write_table(pa.Table.from_pylist(TRAIN), single["parquet"])
    datasets.Dataset.from_list(TRAIN).save_to_disk(str(single["saved_dataset"]))
    splits = {"saved_dict": tmp_path / "saved_dict", "data_dir": tmp_path / "data_dir"}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(TRAIN), "test": datasets.Dataset.from_list(TEST)}
    ).save_to_disk(str(splits["saved_dict"]))
    (splits["data_dir"] / "data").mkdir(parents=True)
    for split, rows in (("train", TRAIN), ("test", TEST)):  # the Hub's parquet layout
        pq.write_table(
            pa.Table.from_pylist(rows), splits["data_dir"] / "data" / f"{split}-00000-of-00001.parquet"
        )
    return single, splits


def test_every_source_form_reads_the_same_rows(sources):
    single, splits = sources
    for name, path in {**single, **splits}.items():
        table = load_prompts(path, answer_field="answer", id_field="uid")
        assert table.questions == [r["question"] for r in TRAIN], name
        assert table.answers == [r["answer"] for r in TRAIN] and table.ids == [r["uid"] for r in TRAIN], name
        assert read_records(path) == TRAIN, name


def test_split_selects_the_rows(sources):
    _, splits = sources
    for name, path in splits.items():
        assert load_prompts(path, split="test", id_field="uid").ids == [r["uid"] for r in TEST], name
        assert read_records(path, split="test") == TEST, name


@pytest.mark.parametrize("form", ["saved_dict", "data_dir"])
def test_a_missing_split_names_the_split_and_the_ones_there(sources, form):
    path = sources[1][form]
    for read in (
        lambda: load_prompts(path, split="validation"),
        lambda: read_records(path, split="validation"),
    ):
        with pytest.raises(DataError) as err:
            read()
        message = str(err.value)
        assert "no split 'validation'; available splits: " in message and "\n" not in message
        assert "'train'" in message and "'test'" in message


def test_a_file_is_the_train_split_only(sources):
    single, _ = sources
    for name in ("jsonl", "parquet", "saved_dataset"):
        with pytest.raises(DataError, match=r"no split 'test'; available splits: \['train'\]"):
            load_prompts(single[name], split="test")
        with pytest.raises(DataError, match=r"no split 'test'; available splits: \['train'\]"):
            read_records(single[name], split="test")


def test_errors_of_the_datasets_path_are_one_line(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: a Hub name cannot be reached, which must read as that, not a traceback
    with pytest.raises(PromptDataError) as err:
        load_prompts("someone/no-such-dataset")
    message = str(err.value)
    assert (
        "loaded as the Hugging Face Hub dataset 'someone/no-such-dataset'" in message and "\n" not in message
    )
    with pytest.raises(DataError, match="Hub dataset 'someone/no-such-dataset', which failed"):
        read_records("someone/no-such-dataset")
    datasets.Dataset.from_list(TRAIN).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(
        PromptDataError, match=r"\(split 'train'\): no field 'nope'; available fields: \['answer'"
    ):
        load_prompts(tmp_path / "saved", question_field="nope")
    with pytest.raises(DataFileNotFound, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "bad.json").write_text('[{"question": "a"}, 3]')
    with pytest.raises(DataError, match=r"bad.json\[1\]: expected a JSON object, got int"):
        read_records(tmp_path / "bad.json")


def test_chat_message_columns_survive_a_datasets_directory(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "level": i} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "msgs"))
    table = load_prompts(tmp_path / "msgs", question_field="prompt")
    assert table.questions == [r["prompt"] for r in rows]
