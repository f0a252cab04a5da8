"""tfrecords_tools.record_cache: records become cache entries in order, record before metadata."""

import os

import pytest

from tfrecords_tools import record_cache


def _pending(work_dir, key, record):
    rec_path, meta_path = record_cache.cache_paths(str(work_dir), key)
    tmp = record_cache.write_pending(rec_path, record)
    return record_cache.PendingRecord(tmp, rec_path, meta_path, {"exam_id": key})


def _read_records(path):
    import tensorflow as tf

    return [r.numpy() for r in tf.data.TFRecordDataset(path)]


def test_pending_records_publish_oldest_first_record_before_meta(tmp_path, monkeypatch):
    queue = record_cache.PendingRecords()
    entries = [_pending(tmp_path, key, key.encode() * 3) for key in ("a", "b")]
    for entry in entries:
        queue.add(entry)
    # Written but not published: not cache entries; a rerun would remove them.
    assert [record_cache.load_meta(str(tmp_path), k) for k in "ab"] == [None, None]
    assert len(queue) == 2 and not any(e.published() for e in entries)

    renames = []
    replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda a, b: renames.append(os.path.basename(b)) or replace(a, b)
    )
    queue.publish_all()
    assert renames == ["a.tfrecord", "a.json", "b.tfrecord", "b.json"]
    assert len(queue) == 0 and all(e.published() for e in entries)
    for key in "ab":
        assert record_cache.load_meta(str(tmp_path), key) == {"exam_id": key}
        rec_path, _ = record_cache.cache_paths(str(tmp_path), key)
        assert _read_records(rec_path) == [key.encode() * 3]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.tfrecord", "b.json", "b.tfrecord"]
    queue.publish_all()  # Nothing left: a no-op.


def test_killed_run_leaves_entries_or_temporary_files(tmp_path):
    """A run killed before publication: the next run removes what was not published."""
    done = _pending(tmp_path, "done", b"x")
    done.publish()
    _pending(tmp_path, "killed", b"y")  # Never published.
    rec_path, meta_path = record_cache.cache_paths(str(tmp_path), "half")
    open(rec_path, "wb").close()  # Killed between record and metadata: no entry either.
    assert record_cache.load_meta(str(tmp_path), "half") is None
    record_cache.remove_unpublished(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["done.json", "done.tfrecord", "half.tfrecord"]
    assert record_cache.load_meta(str(tmp_path), "done") == {"exam_id": "done"}


def test_keep_only_and_drop(tmp_path):
    work = tmp_path / record_cache.WORK_DIR
    work.mkdir()
    for key in ("a", "b"):
        _pending(work, key, b"r").publish()
    record_cache.keep_only(str(work), {"b"})
    assert sorted(os.listdir(work)) == ["b.json", "b.tfrecord"]
    record_cache.drop(str(work))
    assert not work.exists()


def test_frame_record_publishes_at_once(tmp_path):
    path = str(tmp_path / "r.tfrecord")
    record_cache.frame_record(path, b"payload")
    assert os.listdir(tmp_path) == ["r.tfrecord"]
    assert _read_records(path) == [b"payload"]


@pytest.mark.parametrize("change", ["labels", "overrides", "key", "files"])
def test_cache_key_changes_with_the_input(tmp_path, change):
    from tfrecords_tools import dicom_reader

    exam_dir = tmp_path / "exam"
    exam_dir.mkdir()
    (exam_dir / "1.dcm").write_bytes(b"x")
    options = dicom_reader.ReaderOptions()
    args = dict(labels=(0, 1, 0, 0), overrides=None, key_fingerprint="k")
    before = record_cache.cache_key("exam", str(exam_dir), options=options, **args)
    assert record_cache.cache_key("exam", str(exam_dir), options=options, **args) == before
    if change == "files":
        (exam_dir / "2.dcm").write_bytes(b"y")
    else:
        args[change if change != "key" else "key_fingerprint"] = {
            "labels": (0, 0, 0, 1),
            "overrides": {"1.2.3": "t0"},
            "key": "other",
        }[change]
    assert record_cache.cache_key("exam", str(exam_dir), options=options, **args) != before
