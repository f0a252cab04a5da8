"""The Beam converter's file access: local paths as the local converter does it, object storage
through Apache Beam's ``FileSystems``.

A path with a scheme (``gs://``, ``s3://``, ``hdfs://``, ...) goes through ``FileSystems``, so
it works wherever the runner has that file system (``pip install apache-beam[gcp]`` for
``gs://``). A local path goes through the project's own helpers (``fileio``, ``record_cache``,
``shards``: synced, atomic, owner-only where private), exactly as ``tfrecords_tools.convert``
writes it.

On object storage a file only ever appears complete: it is written under a temporary name in
the same folder (``fileio.TEMP_PREFIX``, which the converter's clean-up removes) and renamed.
An exam folder is copied to a local temporary folder before ``dicom_reader`` reads it (the
reader walks folders and seeks in files; one sequential download per file is also the cheapest
way to read object storage).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from tfrecords_tools import convert_lib, fileio, pseudonym, record_cache, shards

_RAW = CompressionTypes.UNCOMPRESSED  # Never guess a compression from a file's extension.
_CHUNK = 16 << 20


def is_remote(path: str) -> bool:
    """True for a path with a scheme (object storage, HDFS, ...), False for a local path."""
    return FileSystems.get_scheme(path) is not None


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def is_inside(path: str, directory: str) -> bool:
    """``pseudonym.is_inside`` for local paths; a prefix test for URLs."""
    if is_remote(path) or is_remote(directory):
        path, directory = path.rstrip("/"), directory.rstrip("/")
        return path == directory or path.startswith(directory + "/")
    return pseudonym.is_inside(path, directory)


def read_bytes(path: str, limit: int = -1) -> bytes:
    """The file's bytes (its first ``limit`` bytes when ``limit`` >= 0)."""
    with FileSystems.open(path, compression_type=_RAW) as f:
        return f.read(limit) if limit >= 0 else f.read()


def _temp_name(path: str) -> str:
    directory, name = path.rsplit("/", 1)
    return f"{directory}/{fileio.TEMP_PREFIX}{secrets.token_hex(8)}-{name}"


def _write_remote(path: str, write) -> None:
    """Calls ``write(file)`` on a new temporary file, then renames it to ``path``."""
    tmp = _temp_name(path)
    try:
        with FileSystems.create(tmp, compression_type=_RAW) as f:
            write(f)
        FileSystems.rename([tmp], [path])
    except BaseException:
        with contextlib.suppress(Exception):
            FileSystems.delete([tmp])
        raise


def write_text(path: str, text: str, *, private: bool = False) -> None:
    """Replaces the file ``path`` with ``text`` in one step (``fileio`` for a local path; on
    object storage ``private`` is up to the bucket's permissions)."""
    if not is_remote(path):
        fileio.atomic_write_text(path, text, private=private)
        return
    _write_remote(path, lambda f: f.write(text.encode("utf-8")))


def listdir(directory: str) -> list:
    """Names of the files directly in ``directory`` (none if it does not exist)."""
    if not is_remote(directory):
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    prefix = directory.rstrip("/") + "/"
    found = FileSystems.match([prefix + "*"])[0].metadata_list
    return sorted(m.path[len(prefix) :] for m in found if "/" not in m.path[len(prefix) :])


def list_tree(directory: str) -> dict:
    """Every file below ``directory``: relative path ("/"-separated) -> ``FileMetadata``."""
    prefix = directory.rstrip("/") + "/"
    found = FileSystems.match([prefix + "**"])[0].metadata_list
    return {m.path[len(prefix) :].replace(os.sep, "/"): m for m in found}


def load_key(key_file: str, output_dir: str) -> bytes:
    """``pseudonym.load_or_create_key``, also for a key file on object storage."""
    if not is_remote(key_file):
        return pseudonym.load_or_create_key(key_file, output_dir)
    if is_inside(key_file, output_dir):
        raise ValueError(
            f"--pseudonym_key_file={key_file} is inside --output_dir={output_dir}; the key must "
            "be kept outside the records directory (whoever holds it can re-identify exams)."
        )
    if not FileSystems.exists(key_file):
        write_text(key_file, pseudonym.new_key_text(), private=True)
    return pseudonym.parse_key(read_bytes(key_file).decode("utf-8", "replace"), key_file)


def remove_unpublished(work_dir: str) -> None:
    """``record_cache.remove_unpublished``, creating the cache folder where needed."""
    if not is_remote(work_dir):
        os.makedirs(work_dir, exist_ok=True)
        record_cache.remove_unpublished(work_dir)
        return
    _delete([join(work_dir, n) for n in listdir(work_dir) if record_cache.is_unpublished(n)])


def _delete(paths: list) -> None:
    if paths:
        FileSystems.delete(paths)


# ---- one exam: its files, its cache entry ----------------------------------------------------


def exam_files(exam_dir: str) -> list | None:
    """The exam's files as ``record_cache.cache_key`` lists them, for an exam on object storage
    ([relative path, size, modification time in ns], sorted); None for a local folder (the
    cache key lists it itself)."""
    if not is_remote(exam_dir):
        return None
    return sorted(
        [rel, m.size_in_bytes, int(m.last_updated_in_seconds * 1e9)]
        for rel, m in list_tree(exam_dir).items()
    )


@contextlib.contextmanager
def local_exam(exam_dir: str, files: list | None):
    """The exam as a local folder: ``exam_dir`` itself, or a temporary copy of ``files``."""
    if files is None:
        yield exam_dir
        return
    local = tempfile.mkdtemp(prefix="exam-")
    try:
        for rel, _, _ in files:
            target = os.path.join(local, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with FileSystems.open(join(exam_dir, rel), compression_type=_RAW) as src:
                with open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def load_meta(work_dir: str, key: str) -> dict | None:
    """``record_cache.load_meta``, also for a cache on object storage."""
    if not is_remote(work_dir):
        return record_cache.load_meta(work_dir, key)
    rec_path, meta_path = record_cache.cache_paths(work_dir, key)
    if not (FileSystems.exists(meta_path) and FileSystems.exists(rec_path)):
        return None
    return json.loads(read_bytes(meta_path))


def put_record(work_dir: str, key: str, record: bytes, meta: dict) -> dict:
    """Writes a cache entry: the record as a one-record TFRecord file, then its metadata.

    Returns:
      ``meta`` with ``bytes``, the framed record's size (what the shard plan adds up).
    """
    rec_path, meta_path = record_cache.cache_paths(work_dir, key)
    if not is_remote(work_dir):
        tmp = record_cache.write_pending(rec_path, record)
        meta = dict(meta, bytes=os.path.getsize(tmp))
        record_cache.PendingRecord(tmp, rec_path, meta_path, meta).publish()
        return meta
    with tempfile.TemporaryDirectory(prefix="record-") as local_dir:
        local = os.path.join(local_dir, "record.tfrecord")  # Framed by TensorFlow's writer.
        record_cache.frame_record(local, record)
        meta = dict(meta, bytes=os.path.getsize(local))
        with open(local, "rb") as src:
            _write_remote(rec_path, lambda f: shutil.copyfileobj(src, f, _CHUNK))
    write_text(meta_path, json.dumps(meta, sort_keys=True))
    return meta


# ---- shards and the clean-up after them --------------------------------------------------------


def write_shard(output_dir: str, name: str, paths: list) -> str:
    """Concatenates the cached one-record files ``paths`` into the shard ``name`` (temporary
    name, then rename). Returns ``name``."""
    if not is_remote(output_dir):
        # move_first=False: a retried bundle must find the cache as it was.
        return shards.assemble(shards.ShardJob(output_dir, name, list(paths), False))

    def copy(out):
        for path in paths:
            with FileSystems.open(path, compression_type=_RAW) as src:
                shutil.copyfileobj(src, out, _CHUNK)

    _write_remote(join(output_dir, name), copy)
    return name


def _remove_stale(output_dir: str, written: set) -> None:
    _delete([join(output_dir, n) for n in listdir(output_dir) if shards.is_stale(n, written)])


def _keep_cache(work_dir: str, keys: set) -> None:
    names = listdir(work_dir)
    _delete([join(work_dir, n) for n in names if record_cache.entry_of(n) not in keys])


def _drop_cache(work_dir: str) -> None:
    _delete([join(work_dir, rel) for rel in list_tree(work_dir)])


def output_files(output_dir: str) -> convert_lib.OutputFiles:
    """How ``convert_lib.publish`` changes the files of ``output_dir``."""
    if not is_remote(output_dir):  # write_text: the id map may be elsewhere.
        return convert_lib.OutputFiles(write_text=write_text)
    return convert_lib.OutputFiles(write_text, _remove_stale, _keep_cache, _drop_cache)
