"""The converter's resume cache: each converted exam's record, kept until it is in the shards.

``OUTPUT/.work/`` holds, per exam, ``<key>.tfrecord`` (the record framed as a one-record
TFRecord file) and ``<key>.json`` (its metadata). The key is made of the exam folder, its file
listing (names, sizes, mtimes), its labels and phase map, the pseudonym key's fingerprint and the
reader settings, so an entry is reused only for the same input. An entry exists when both files
do; the metadata is written last, so it never names an incomplete record.

A record is first written under a temporary name (``<key>.tfrecord.tmp-<pid>``) and published
(synced, renamed, metadata written) a little later, once its write-back has finished, so that
publishing neither waits for the disk nor keeps the record in the page cache (``PendingRecords``).
A run killed at any point leaves complete entries and temporary files; the next run removes the
temporary files (``remove_unpublished``) and reads only the exams without an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

from tfrecords_tools import dicom_reader, durable_io, fileio, schema

WORK_DIR = ".work"
CONVERTER_VERSION = 2  # Bump when the records written for the same input would change.
# In the name of every temporary file in the cache: records before publication, and fileio's.
_TEMP_MARK = fileio.TEMP_PREFIX


def _exam_fingerprint(exam_dir: str) -> list:
    listing = []
    for rel in dicom_reader.list_files(exam_dir):
        try:
            st = os.stat(os.path.join(exam_dir, rel))
        except OSError:  # A dangling link: the reader skips it too.
            continue
        listing.append([rel, st.st_size, st.st_mtime_ns])
    return listing


def cache_key(
    exam,
    exam_dir,
    labels,
    overrides,
    key_fingerprint,
    options,
    files=None,
    crop_to_body=False,
    phases=schema.PHASES,
) -> str:
    """The cache key of one exam's record (changes whenever the record could).

    Args:
      exam: str. Exam folder relative to the DICOM root.
      exam_dir: str. The exam folder.
      labels: the exam's four labels.
      overrides: dict or None. The exam's phase map entries.
      key_fingerprint: str. ``pseudonym.Pseudonymizer.fingerprint()``.
      options: dicom_reader.ReaderOptions.
      files: list of [relative path, size, modification time] of the exam's files, where the
        caller listed them (object storage); None: listed here from ``exam_dir``.
      crop_to_body: bool. The record is cut to the body's box (``ConvertConfig.crop_to_body``);
        part of the key only when True, so the keys of earlier runs stay valid.
      phases: the phases stored (``ConvertConfig.phases``); in the key only when not all four.
    """
    extra = {"crop_to_body": True} if crop_to_body else {}
    if tuple(phases) != schema.PHASES:
        extra["phases"] = list(phases)
    payload = json.dumps(
        {
            **extra,
            "converter": CONVERTER_VERSION,
            "schema": schema.SCHEMA_VERSION,
            "exam": exam,
            "files": _exam_fingerprint(exam_dir) if files is None else files,
            "labels": list(labels),
            "overrides": sorted((overrides or {}).items()),
            "key": key_fingerprint,
            "options": dataclasses.asdict(options),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cache_paths(work_dir: str, key: str) -> tuple[str, str]:
    """(record path, metadata path) of the entry ``key``."""
    return (
        os.path.join(work_dir, key + ".tfrecord"),
        os.path.join(work_dir, key + ".json"),
    )


def load_meta(work_dir: str, key: str) -> dict | None:
    """The metadata of the entry ``key``; None when there is no complete entry."""
    rec_path, meta_path = cache_paths(work_dir, key)
    if not (os.path.exists(meta_path) and os.path.exists(rec_path)):
        return None
    with open(meta_path) as f:
        return json.load(f)


def is_unpublished(name: str) -> bool:
    """A temporary file of the cache (a record or metadata a killed run never published)."""
    return _TEMP_MARK in name


def remove_unpublished(work_dir: str) -> None:
    """Removes the temporary files a killed run left (records it never published)."""
    for name in os.listdir(work_dir):
        if is_unpublished(name):
            os.unlink(os.path.join(work_dir, name))


def entry_of(name: str) -> str:
    """The key of the cache entry a file of the cache belongs to."""
    return name.split(".")[0]


def keep_only(work_dir: str, keys: set) -> None:
    """Removes every file of the cache but those of the entries ``keys``."""
    for name in os.listdir(work_dir):
        if entry_of(name) not in keys:
            os.unlink(os.path.join(work_dir, name))


def drop(work_dir: str) -> None:
    """Removes the whole cache."""
    shutil.rmtree(work_dir, ignore_errors=True)


def write_pending(path: str, record: bytes) -> str:
    """Writes ``record`` as a one-record TFRecord file under a temporary name next to ``path``.

    Its write-back starts at once; ``PendingRecord.publish`` later makes it the file ``path``.

    Returns:
      The temporary name.
    """
    import tensorflow as tf

    tmp = path + f"{_TEMP_MARK}{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as writer:
        writer.write(record)
    durable_io.release_file(tmp)  # Starts the write-back now; the pages are dropped at publication.
    return tmp


def frame_record(path: str, record: bytes) -> None:
    """Writes ``record`` as a one-record TFRecord file at ``path`` and publishes it at once."""
    durable_io.sync_release_rename(write_pending(path, record), path)


@dataclasses.dataclass(frozen=True)
class PendingRecord:
    """A record written under a temporary name that is not a cache entry yet.

    Attributes:
      tmp: str. The record's temporary name (``write_pending``).
      rec_path: str. The entry's record path.
      meta_path: str. The entry's metadata path.
      meta: dict. The metadata to write.
    """

    tmp: str
    rec_path: str
    meta_path: str
    meta: dict

    def published(self) -> bool:
        return not os.path.exists(self.tmp)

    def publish(self) -> None:
        """Makes the record a cache entry: sync, drop from the page cache, rename, metadata.

        The data is synced before the rename so that, even after a power loss, a cache entry
        never names a record that was not completely written. By the time a record is
        published its write-back has usually finished, so the sync rarely waits.
        """
        durable_io.sync_release_rename(self.tmp, self.rec_path)
        fileio.atomic_write_text(self.meta_path, json.dumps(self.meta, sort_keys=True))


class PendingRecords:
    """The records one process has written and not yet published, in the order written.

    Each process that converts exams owns one: it adds each record it writes and publishes
    the earlier ones before it starts the next exam, so their write-back has finished by then.
    Whatever is still pending when the process's work ends is published by its owner
    (``publish_all``), or by whoever collects its results (``PendingRecord.publish``).
    """

    def __init__(self):
        self._queue: list[PendingRecord] = []

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, entry: PendingRecord) -> None:
        self._queue.append(entry)

    def publish_all(self) -> None:
        """Publishes the pending records, oldest first."""
        while self._queue:
            self._queue.pop(0).publish()
