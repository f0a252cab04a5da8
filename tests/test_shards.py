"""tfrecords_tools.shards: planning, the three ways a shard is assembled, stale clean-up."""

import os

import pytest

from tfrecords_tools import shards


def _cached(tmp_path, contents):
    work = tmp_path / "work"
    work.mkdir()
    paths = []
    for i, data in enumerate(contents):
        path = work / f"k{i}.tfrecord"
        path.write_bytes(data)
        paths.append(str(path))
    out = tmp_path / "out"
    out.mkdir()
    return out, paths


def test_plan_shards_by_size_never_empty():
    metas = [{"exam_id": f"E{i}", "bytes": b} for i, b in enumerate([40, 40, 40, 200, 10])]
    plan = shards.plan_shards("train", metas, shard_bytes=100)
    assert [name for name, _ in plan] == [f"train-0000{i}-of-00004.tfrecord" for i in range(4)]
    assert [[m["exam_id"] for m in group] for _, group in plan] == [
        ["E0", "E1"],
        ["E2"],
        ["E3"],  # Larger than a shard: alone.
        ["E4"],
    ]
    assert shards.plan_shards("val", [], 100) == []


@pytest.mark.parametrize("move_first", [False, True])
def test_assemble_concatenates_in_order(tmp_path, move_first):
    out, paths = _cached(tmp_path, [b"aa", b"bbb", b"c"])
    name = shards.assemble(
        shards.ShardJob(str(out), "train-00000-of-00001.tfrecord", paths, move_first)
    )
    assert (out / name).read_bytes() == b"aabbbc"
    assert os.listdir(out) == [name]
    # Moving: the cache files went into the shard; copying: the cache is left as it was.
    assert [os.path.exists(p) for p in paths] == [not move_first] * 3


def test_single_record_shard_is_a_hard_link_or_a_copy(tmp_path, monkeypatch):
    out, paths = _cached(tmp_path, [b"record"])
    job = shards.ShardJob(str(out), "val-00000-of-00001.tfrecord", paths, False)
    shards.assemble(job)
    assert os.path.samefile(out / job.name, paths[0])

    def no_links(*args):
        raise OSError(18, "Invalid cross-device link")

    (out / job.name).unlink()
    monkeypatch.setattr(os, "link", no_links)  # Another file system: copied instead.
    shards.assemble(job)
    assert (out / job.name).read_bytes() == b"record"
    assert not os.path.samefile(out / job.name, paths[0])
    assert os.listdir(out) == [job.name]


def test_remove_stale_keeps_written_and_foreign_files(tmp_path):
    names = [
        "train-00000-of-00002.tfrecord",  # Written by this run.
        "train-00000-of-00001.tfrecord",  # Stale: from an earlier run.
        "val-00003-of-00004.tfrecord",  # Stale.
        ".test-00000-of-00001.tfrecord.tmp",  # A killed assembly.
        ".tmp-0123abcd",  # A killed fileio write.
        "notes.tfrecord",  # Not a shard name: the user's.
        "manifest.json",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    shards.remove_stale(str(tmp_path), {"train-00000-of-00002.tfrecord"})
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["train-00000-of-00002.tfrecord", "notes.tfrecord", "manifest.json"]
    )
