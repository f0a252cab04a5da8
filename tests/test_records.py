"""The one records reader (tfrecords_tools.records): what it reads and how it refuses."""

import os

import numpy as np
import pytest
import train_fixtures
from eval_fixtures import write_records

from tfrecords_tools import schema
from tfrecords_tools.records import Records, RecordsError


@pytest.fixture()
def records_dir(tmp_path):
    exams = write_records(str(tmp_path / "rec"), {"train": 3, "val": 2, "test": 0}, size=8)
    return str(tmp_path / "rec"), exams


def test_reads_manifest_shards_and_records_in_order(records_dir):
    directory, exams = records_dir
    records = Records.open(directory)
    assert records.phases == schema.PHASES
    assert records.counts() == {"train": 3, "val": 2, "test": 0}
    assert [e["exam_id"] for e in records.exams("val")] == ["val00", "val01"]
    assert records.shard_paths("train") == [
        os.path.join(directory, schema.SHARD_PATTERN.format(split="train", index=0, count=1))
    ]
    got = list(records.iter_numpy())  # The empty test split is skipped, not an error.
    assert [(s, r["exam_id"]) for s, r in got] == [
        ("train", "train00"),
        ("train", "train01"),
        ("train", "train02"),
        ("val", "val00"),
        ("val", "val01"),
    ]
    first = exams["train"][0]
    np.testing.assert_allclose(got[0][1]["t2"], first["volumes"]["t2"], rtol=1e-6)
    assert records.first_record("val")["exam_id"] == "val00"
    records.check_phases(("t0", "t2"), "Input variant 't2-t0'")


def test_refusals_name_the_directory_split_and_file(records_dir, tmp_path):
    directory, _ = records_dir
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
        Records.open(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(RecordsError, match="empty'? is empty; convert"):
        Records.open(tmp_path / "empty")
    train_fixtures.edit_manifest(directory, lambda m: m["splits"]["test"].update(shards=[]))
    records = Records.open(directory)
    with pytest.raises(RecordsError, match="'test' of .* has no shard files"):
        records.shard_paths("test")
    with pytest.raises(RecordsError, match="'dev' is not in .*'test', 'train', 'val'"):
        records.shard_paths("dev")

    train_fixtures.edit_manifest(directory, lambda m: m.update(phases=["t0", "t1"]))
    with pytest.raises(RecordsError, match=r"'t2-t0'.*needs phases \['t0', 't2'\].*lack \['t2'\]"):
        Records.open(directory).check_phases(("t0", "t2"), "Input variant 't2-t0'")
    train_fixtures.edit_manifest(directory, lambda m: m.pop("phases"))
    with pytest.raises(RecordsError, match="no 'phases' entry"):
        Records.open(directory).check_phases(("t0",), "t0")
    future = schema.SCHEMA_VERSION + 1
    train_fixtures.edit_manifest(directory, lambda m: m.update(schema_version=future))
    with pytest.raises(RecordsError, match="schema"):
        Records.open(directory)


def test_unreadable_empty_or_missing_shards(records_dir):
    directory, _ = records_dir
    train, val = (Records.open(directory).shard_paths(s)[0] for s in ("train", "val"))
    open(val, "w").close()  # An empty shard.
    with pytest.raises(RecordsError, match="val-00000-of-00001.tfrecord: the first shard .*no rec"):
        Records.open(directory).first_record("val")
    with open(train, "wb") as f:
        f.write(b"this is not a TFRecord file at all")
    with pytest.raises(RecordsError, match="train-00000-of-00001.tfrecord: not a readable"):
        Records.open(directory).first_record("train")
    os.remove(train)
    with pytest.raises(FileNotFoundError, match="train-00000-of-00001.tfrecord is listed"):
        Records.open(directory).shard_paths("train")


def test_inspect_summary_of_a_manifest_without_statistics(records_dir):
    """A manifest written by another tool (no shapes, spacings or label counts): the summary
    shows "-" for what it lacks instead of failing."""
    from tfrecords_tools import inspect_lib

    text = inspect_lib.summary(records_dir[0])
    assert "shape (S x H x W): -" in text and "train       3" in text
