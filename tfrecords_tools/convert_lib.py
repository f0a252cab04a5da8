"""DICOM exam folders + labels CSV -> sharded TFRecords, manifest.json and failures.csv.

Steps (``convert``):

1. Check the labels CSV, the phase map and the folders under the DICOM root; every problem is
   reported at once before any exam is read (``labels_csv.InputError``).
2. Convert every exam in ``num_workers`` processes: ``dicom_reader.load_exam`` ->
   ``schema.encode_example`` with keyed-hash pseudonyms. Each finished record is kept, framed
   as a one-record TFRecord file, in ``OUTPUT/.work/`` under a key made of the exam folder, its
   file listing (names, sizes, mtimes), its labels and phase map, the pseudonym key's
   fingerprint and the reader settings. A run killed at any point and started again reuses
   these and reads only the exams not done yet.
3. Split patients (seeded, stratified by malignancy, or the CSV's ``split`` column).
4. Assemble shards by concatenating the cached records in a deterministic order (by exam
   pseudonym); each shard is written under a temporary name and renamed, then the manifest and
   failures.csv are replaced atomically, then stale shards are removed.

Nothing from the DICOM headers but pixels, geometry and the (pseudonymised) PatientID is used;
failure reasons written under the output directory carry no file names or UIDs. The folder
names and full error messages go to ``failures_detail.csv`` next to the id map, outside the
output directory.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time

import numpy as np

from tfrecords_tools import (
    dicom_reader,
    durable_io,
    fileio,
    labels_csv,
    memory,
    pseudonym,
    record_cache,
    record_encoder,
    schema,
    splits,
)

MB = 1 << 20
_UID_RE = re.compile(r"\b\d+(?:\.\d+){3,}\b")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Settings of one conversion (built from flags by ``tfrecords_tools.convert``).

    Attributes:
      dicom_root: str. Folder holding one folder per exam.
      labels: str. Labels CSV (``exam`` + the four labels, optional ``split``).
      output_dir: str. Records directory (shards, manifest.json, failures.csv).
      pseudonym_key_file: str. Key file outside output_dir; empty: OUTPUT_private/pseudonym.key.
      id_map: str. Pseudonym -> exam folder CSV outside output_dir; empty: next to the key.
      phase_map: str. Optional ``exam,series_instance_uid,phase`` CSV.
      split_ratios: tuple of 3 floats. train/val/test fractions of patients.
      seed: int. Split seed.
      shard_size_mb: float. Target shard size in MiB.
      num_workers: int. Processes; 0 means all cores.
      max_obliquity_deg: float. See ``dicom_reader.ReaderOptions``.
      progress: bool. Print a progress line to stderr.
    """

    dicom_root: str
    labels: str
    output_dir: str
    pseudonym_key_file: str = ""
    id_map: str = ""
    phase_map: str = ""
    split_ratios: tuple = (0.6, 0.2, 0.2)
    seed: int = 0
    shard_size_mb: float = 200.0
    num_workers: int = 0
    max_obliquity_deg: float = 15.0
    progress: bool = True

    def key_file(self) -> str:
        if self.pseudonym_key_file:
            return self.pseudonym_key_file
        out = os.path.abspath(self.output_dir).rstrip(os.sep)
        return os.path.join(out + "_private", "pseudonym.key")

    def id_map_file(self) -> str:
        return self.id_map or os.path.join(
            os.path.dirname(os.path.abspath(self.key_file())), "id_map.csv"
        )

    def workers(self) -> int:
        if self.num_workers > 0:
            return self.num_workers
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What a conversion did.

    Attributes:
      num_labelled: int. Exams in the labels CSV.
      num_converted: int. Exams written to the shards.
      failures: list of (exam pseudonym, reason).
      num_cached: int. Exams taken from the resume cache instead of being read.
      manifest: dict. The manifest written.
    """

    num_labelled: int
    num_converted: int
    failures: list
    num_cached: int
    manifest: dict

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclasses.dataclass(frozen=True)
class _Task:
    exam: str  # Relative folder path.
    exam_dir: str
    exam_id: str
    labels: tuple
    overrides: dict | None
    cache_key: str
    work_dir: str
    key: bytes
    options: dicom_reader.ReaderOptions


def scrub(reason: str) -> str:
    """Removes anything UID-like from a failure reason (it goes under the output dir)."""
    return _UID_RE.sub("<uid>", reason)


def _convert_one(task: _Task, pending: record_cache.PendingRecords) -> dict:
    """Reads, encodes and caches one exam.

    The record is written under a temporary name and added to ``pending``, this process's
    queue: it is published (synced, renamed, meta file written) when this process starts its
    next exam, or by the parent after the last one (``result["pending"]``).
    """
    pending.publish_all()
    start = time.perf_counter()
    rec_path, meta_path = record_cache.cache_paths(task.work_dir, task.cache_key)
    try:
        exam = dicom_reader.load_exam(task.exam_dir, task.overrides, task.options, keep_stored=True)
    except dicom_reader.ExamError as e:
        return {"exam": task.exam, "exam_id": task.exam_id, "reason": e.reason, "detail": str(e)}
    except Exception as e:  # noqa: BLE001 - one broken exam never stops the others.
        reason = f"unexpected error while reading ({type(e).__name__})"
        return {
            "exam": task.exam,
            "exam_id": task.exam_id,
            "reason": reason,
            "detail": f"exam {task.exam_dir}: {type(e).__name__}: {e}",
        }
    read_s = time.perf_counter() - start
    patient_id = pseudonym.Pseudonymizer(task.key).patient(exam.patient_id)
    # Byte for byte schema.encode_example, without its three copies of the voxels.
    record = record_encoder.encode_record(
        task.exam_id, patient_id, exam.volumes, exam.spacing, task.labels, exam.rescale
    )
    tmp = record_cache.write_pending(rec_path, record)
    meta = {
        "exam_id": task.exam_id,
        "patient_id": patient_id,
        "labels": list(task.labels),
        "shape": [int(s) for s in exam.shape],
        "spacing": [float(s) for s in exam.spacing],
        "voxel_dtype": schema.voxel_dtype_name(exam.volumes),
        "bytes": os.path.getsize(tmp),
    }
    entry = record_cache.PendingRecord(tmp, rec_path, meta_path, dict(meta))
    pending.add(entry)
    meta.update(exam=task.exam, read_s=read_s, total_s=time.perf_counter() - start, pending=entry)
    return meta


# The records a pool worker has written and not yet published; set up in each worker process
# by the pool's initializer, so it lives as long as the worker.
_worker_pending: record_cache.PendingRecords | None = None


def _init_worker() -> None:
    global _worker_pending
    memory.tune_malloc()
    _worker_pending = record_cache.PendingRecords()


def _convert_in_worker(task: _Task) -> dict:
    return _convert_one(task, _worker_pending)


class _Progress:
    """A one-line progress bar with exams/s on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.done = self.failed = self.cached = 0
        self.start = self._last = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._finished = False

    def update(self, failed=False, cached=False, force=False):
        self.done += not force
        self.failed += failed
        self.cached += cached
        now = time.monotonic()
        due = now - self._last >= (0.2 if self.tty else 5.0) or self.done == self.total
        if not self.enabled or self._finished or not (due or force):
            return
        self._finished = self.done == self.total
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.cached) / elapsed
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        line = (
            f"convert [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} exams "
            f"{rate:.2f} exams/s, {self.cached} resumed, {self.failed} failed, "
            f"eta {eta:.0f}s"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _pool(workers: int):
    # Fork keeps the already imported TensorFlow/pydicom modules (no per-worker import cost);
    # where fork is unavailable or unsafe (macOS, Windows) workers are spawned.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    if method != "fork":
        return context.Pool(workers, initializer=_init_worker)
    with memory.gc_frozen():  # Keeps the workers from copying the parent's memory.
        return context.Pool(workers, initializer=_init_worker)


def _plan_shards(split, metas, shard_bytes) -> list:
    """Groups a split's exams (in order) into shards of about ``shard_bytes``.

    Returns:
      list of (shard file name, [exam metas]).
    """
    groups: list = []
    size = 0
    for meta in metas:
        if not groups or (size + meta["bytes"] > shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(meta)
        size += meta["bytes"]
    return [
        (schema.SHARD_PATTERN.format(split=split, index=i, count=len(groups)), group)
        for i, group in enumerate(groups)
    ]


def _assemble_shard(job) -> str:
    """Concatenates cached one-record files into one shard (temporary name, then rename).

    ``job`` is ``(output_dir, shard name, cached record paths, move_first)``. With
    ``move_first`` (every exam converted, so the cache is dropped afterwards anyway) the first
    record's cache file is renamed into the shard, only the others are copied, and their cache
    files are removed once the shard is complete; a run killed during assembly then converts
    those exams again.
    """
    output_dir, name, paths, move_first = job
    tmp = os.path.join(output_dir, f".{name}.tmp")
    if move_first and len(paths) > 1:
        # A partial shard left under the temporary name by a kill is removed by the next run.
        os.replace(paths[0], tmp)
        with open(tmp, "ab") as out:
            for path in paths[1:]:
                with open(path, "rb") as src:
                    durable_io.append_file(src, out)
            durable_io.sync(out.fileno())
            durable_io.release(out.fileno())
        os.replace(tmp, os.path.join(output_dir, name))
        for path in paths[1:]:  # The cache goes anyway; dropping it here runs in parallel.
            os.unlink(path)
        return name
    if len(paths) == 1:
        # One record (exams of half the shard size or more): the cached file already is the
        # shard; a hard link shares it without copying (the cache name is removed later).
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.link(paths[0], tmp)
            os.replace(tmp, os.path.join(output_dir, name))
            return name
        except OSError:
            pass  # No hard links here (another file system): copy instead.
    with open(tmp, "wb") as out:
        for path in paths:
            with open(path, "rb") as src:
                durable_io.append_file(src, out)
        durable_io.sync(out.fileno())
        durable_io.release(out.fileno())
    os.replace(tmp, os.path.join(output_dir, name))
    return name


def _summary_stats(exams: list) -> dict:
    if not exams:
        return {"min": None, "max": None}
    arr = np.asarray(exams, dtype=np.float64)
    return {"min": arr.min(axis=0).tolist(), "max": arr.max(axis=0).tolist()}


def _label_counts(labels: list) -> dict:
    arr = np.asarray(labels, dtype=np.int64).reshape(-1, len(schema.LABELS))
    return {name: int(arr[:, i].sum()) for i, name in enumerate(schema.LABELS)}


def _prevalence(labels: list) -> dict:
    n = len(labels)
    counts = _label_counts(labels)
    return {name: (counts[name] / n if n else None) for name in schema.LABELS}


def _config_flags(config: ConvertConfig) -> dict:
    flags = dataclasses.asdict(config)
    flags["split_ratios"] = list(config.split_ratios)
    flags["pseudonym_key_file"] = config.key_file()
    flags["id_map"] = config.id_map_file()
    flags.pop("progress")
    flags.pop("num_workers")  # Does not change the output; keeps reruns byte-identical.
    return flags


def _write_csv(path: str, header, rows) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    fileio.atomic_write_text(path, buf.getvalue())


def convert(config: ConvertConfig, stream=None) -> ConvertResult:
    """Converts the labelled exams under ``config.dicom_root`` into ``config.output_dir``.

    Args:
      config: ConvertConfig.
      stream: where progress and the summary go. Defaults to sys.stderr.

    Returns:
      ConvertResult (``ok`` is False when any labelled exam failed).

    Raises:
      labels_csv.InputError: the inputs do not match (nothing is read or written then), or the
        CSV's ``split`` column puts one patient in two splits (found after reading).
      ValueError: bad settings (key file inside the output directory, bad split ratios).
    """
    stream = stream or sys.stderr
    out_dir = config.output_dir
    if pseudonym.is_inside(config.id_map_file(), out_dir):
        raise ValueError(
            f"--id_map={config.id_map_file()} is inside --output_dir={out_dir}; the map from "
            "pseudonyms to exam folders must be kept outside the records directory."
        )
    if pseudonym.is_inside(out_dir, config.dicom_root):
        raise ValueError(f"--output_dir={out_dir} must not be inside --dicom_root.")
    rows = labels_csv.read_labels(config.labels, config.dicom_root)
    overrides = (
        labels_csv.read_phase_map(config.phase_map, [r.exam for r in rows])
        if config.phase_map
        else {}
    )
    os.makedirs(out_dir, exist_ok=True)
    key = pseudonym.load_or_create_key(config.key_file(), out_dir)
    pseudo = pseudonym.Pseudonymizer(key)
    work_dir = os.path.join(out_dir, record_cache.WORK_DIR)
    os.makedirs(work_dir, exist_ok=True)
    record_cache.remove_unpublished(work_dir)
    options = dicom_reader.ReaderOptions(max_obliquity_deg=config.max_obliquity_deg)

    tasks, cached, by_exam = [], [], {}
    for row in rows:
        exam_dir = os.path.join(config.dicom_root, *row.exam.split("/"))
        exam_id = pseudo.exam(row.exam)
        ov = overrides.get(row.exam)
        ckey = record_cache.cache_key(
            row.exam, exam_dir, row.labels, ov, pseudo.fingerprint(), options
        )
        task = _Task(row.exam, exam_dir, exam_id, row.labels, ov, ckey, work_dir, key, options)
        by_exam[row.exam] = task
        meta = record_cache.load_meta(work_dir, ckey)
        if meta is not None:
            meta["exam"] = row.exam
            cached.append(meta)
        else:
            tasks.append(task)
    if len({t.exam_id for t in by_exam.values()}) != len(by_exam):
        raise RuntimeError("pseudonym collision between two exam folders; use another key")

    progress = _Progress(len(rows), config.progress, stream)
    results = list(cached)
    for _ in cached:
        progress.update(cached=True)
    workers = min(config.workers(), len(rows))
    pool = None
    if workers > 1:
        import tensorflow  # noqa: F401 - imported once before fork, shared by workers.

        pool = _pool(workers)
    pending = record_cache.PendingRecords()  # This process's own (no worker pool).
    try:
        if tasks:
            if pool is None or len(tasks) == 1:
                iterator = (_convert_one(task, pending) for task in tasks)
            else:
                iterator = pool.imap_unordered(_convert_in_worker, tasks)
            for res in iterator:
                results.append(res)
                progress.update(failed="reason" in res)
        pending.publish_all()
        for res in results:  # Each worker's last record.
            entry = res.pop("pending", None)
            if entry is not None and not entry.published():
                entry.publish()
        progress.update(force=True)
        result = _finish(config, rows, results, by_exam, cached, work_dir, pool, stream)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return result


def _finish(config, rows, results, by_exam, cached, work_dir, pool, stream) -> ConvertResult:
    """Splits, shards, manifest, failures, id map; cache clean-up."""
    out_dir = config.output_dir
    good = [r for r in results if "reason" not in r]
    failed = sorted((r for r in results if "reason" in r), key=lambda r: r["exam_id"])

    # Splits (patient level).
    row_of = {r.exam: r for r in rows}
    if rows and rows[0].split is not None:
        patient_split: dict = {}
        for r in sorted(good, key=lambda r: row_of[r["exam"]].line):
            patient_split.setdefault(r["patient_id"], []).append(row_of[r["exam"]])
        conflicts = [
            ", ".join(f"line {lr.line} ({lr.exam!r}) split={lr.split}" for lr in lrs)
            for lrs in patient_split.values()
            if len({lr.split for lr in lrs}) > 1
        ]
        if conflicts:
            raise labels_csv.InputError(
                f"{config.labels}: the split column puts one patient (same DICOM PatientID) in "
                "two splits; give all exams of a patient one split:"
                + "".join(f"\n    {c}" for c in conflicts)
            )
        split_of = {p: lrs[0].split for p, lrs in patient_split.items()}
    else:
        strata: dict = {}
        for r in good:
            malignant = int(r["labels"][1] or r["labels"][3])
            strata[r["patient_id"]] = max(strata.get(r["patient_id"], 0), malignant)
        split_of = splits.assign_splits(strata, config.split_ratios, config.seed)

    # Shards: exams in pseudonym order, assembled in parallel (each is independent).
    recs = {
        r["exam_id"]: record_cache.cache_paths(work_dir, by_exam[r["exam"]].cache_key)[0]
        for r in good
    }
    manifest_splits, written = {}, set()
    shard_bytes = max(1, int(config.shard_size_mb * MB))
    plans = {}
    for split in schema.SPLITS:
        metas = sorted(
            (r for r in good if split_of[r["patient_id"]] == split), key=lambda r: r["exam_id"]
        )
        plans[split] = (metas, _plan_shards(split, metas, shard_bytes))
    jobs = [
        (out_dir, name, [recs[m["exam_id"]] for m in group], not failed)
        for _, plan in plans.values()
        for name, group in plan
    ]
    mapper = pool.imap_unordered if pool is not None and len(jobs) > 1 else map
    written.update(mapper(_assemble_shard, jobs))
    for split in schema.SPLITS:
        metas, plan = plans[split]
        names = [name for name, _ in plan]
        manifest_splits[split] = {
            "shards": names,
            "num_exams": len(metas),
            "num_patients": len({m["patient_id"] for m in metas}),
            "exams": [
                {k: m[k] for k in ("exam_id", "patient_id", "labels", "shape", "spacing")}
                for m in metas
            ],
            "label_counts": _label_counts([m["labels"] for m in metas]),
        }
    all_labels = [r["labels"] for r in good]
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "phases": list(schema.PHASES),
        "labels": list(schema.LABELS),
        "voxel_dtypes": {
            name: sum(r["voxel_dtype"] == name for r in good)
            for name in schema.VOXEL_DTYPES
            if any(r["voxel_dtype"] == name for r in good)
        },
        "splits": manifest_splits,
        "shapes": _summary_stats([r["shape"] for r in good]),
        "spacings": _summary_stats([r["spacing"] for r in good]),
        "prevalence": {
            "all": _prevalence(all_labels),
            **{
                s: _prevalence([e["labels"] for e in manifest_splits[s]["exams"]])
                for s in schema.SPLITS
            },
        },
        "num_labelled": len(rows),
        "num_exams": len(good),
        "num_failures": len(failed),
        "flags": _config_flags(config),
    }
    _write_csv(
        os.path.join(out_dir, schema.FAILURES_NAME),
        ("exam", "reason"),
        [(r["exam_id"], scrub(r["reason"])) for r in failed],
    )
    fileio.atomic_write_text(
        os.path.join(out_dir, schema.MANIFEST_NAME),
        json.dumps(manifest, indent=1, sort_keys=False) + "\n",
    )
    _remove_stale(out_dir, written)

    # Outside the output directory: pseudonym -> folder, and full failure messages.
    id_map = config.id_map_file()
    os.makedirs(os.path.dirname(os.path.abspath(id_map)), exist_ok=True)
    patient_of = {r["exam"]: r["patient_id"] for r in good}
    _write_csv(
        id_map,
        ("exam_id", "patient_id", "exam"),
        [(by_exam[r.exam].exam_id, patient_of.get(r.exam, ""), r.exam) for r in rows],
    )
    detail_path = os.path.join(os.path.dirname(os.path.abspath(id_map)), "failures_detail.csv")
    _write_csv(
        detail_path,
        ("exam_id", "exam", "detail"),
        [(r["exam_id"], r["exam"], r["detail"]) for r in failed],
    )

    # The cache is dropped once every exam is in the shards; kept (pruned) otherwise, so a
    # rerun after fixing the failed exams reads only those.
    if failed:
        record_cache.keep_only(work_dir, {by_exam[r["exam"]].cache_key for r in good})
    else:
        record_cache.drop(work_dir)

    result = ConvertResult(
        len(rows),
        len(good),
        [(r["exam_id"], scrub(r["reason"])) for r in failed],
        len(cached),
        manifest,
    )
    _print_summary(result, config, stream)
    return result


def _remove_stale(out_dir: str, written: set) -> None:
    for name in os.listdir(out_dir):
        stale_shard = (
            name.endswith(".tfrecord")
            and name not in written
            and any(
                re.fullmatch(f"{s}-\\d{{5}}-of-\\d{{5}}\\.tfrecord", name) for s in schema.SPLITS
            )
        )
        temp = name.startswith(".") and name.endswith(".tmp") or name.startswith(fileio.TEMP_PREFIX)
        if stale_shard or temp:
            os.unlink(os.path.join(out_dir, name))


def _print_summary(result: ConvertResult, config: ConvertConfig, stream) -> None:
    m = result.manifest
    lines = [
        f"converted {result.num_converted}/{result.num_labelled} exams into "
        f"{config.output_dir} ({result.num_cached} resumed from an earlier run)",
        "  "
        + ", ".join(
            f"{s}: {m['splits'][s]['num_exams']} exams / {m['splits'][s]['num_patients']} "
            f"patients in {len(m['splits'][s]['shards'])} shards"
            for s in schema.SPLITS
        ),
        f"  id map (pseudonym -> folder, keep private): {config.id_map_file()}",
    ]
    if result.failures:
        lines.append(
            f"  {len(result.failures)} exam(s) failed (see failures.csv; folder names "
            f"in failures_detail.csv next to the id map):"
        )
        lines += [f"    {e}: {r}" for e, r in result.failures[:20]]
        if len(result.failures) > 20:
            lines.append(f"    ... and {len(result.failures) - 20} more")
    stream.write("\n".join(lines) + "\n")
    stream.flush()
