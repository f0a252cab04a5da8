"""DICOM exam folders + labels CSV -> sharded TFRecords, manifest.json and failures.csv.

Steps (``convert``):

1. Check the labels CSV, the phase map and the folders under the DICOM root; every problem is
   reported at once before any exam is read (``labels_csv.InputError``).
2. Convert every exam in ``num_workers`` processes: ``dicom_reader.load_exam`` ->
   ``record_encoder.encode_record`` (byte for byte ``schema.encode_example``) with keyed-hash
   pseudonyms. Each finished record is kept in the resume cache ``OUTPUT/.work/``
   (``record_cache``), so a run killed at any point and started again reads only the exams not
   done yet.
3. Split patients (seeded, stratified by malignancy, or the CSV's ``split`` column).
4. Assemble shards by concatenating the cached records in a deterministic order (by exam
   pseudonym; ``shards``); each shard is written under a temporary name and renamed, then the
   manifest and failures.csv are replaced atomically (``convert_report``), then stale shards are
   removed.

The Beam converter (``beam_lib``) runs the same steps on a Beam runner and calls the same
functions for everything that decides an output byte: ``read_exam`` (one exam), ``plan`` (the
split and the shards) and ``publish`` (manifest, failures, id map, cache clean-up).

Nothing from the DICOM headers but pixels, geometry and the (pseudonymised) PatientID is used;
failure reasons written under the output directory carry no file names or UIDs. The folder
names and full error messages go to ``failures_detail.csv`` next to the id map, outside the
output directory.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from tfrecords_tools import (
    body_crop,
    convert_report,
    dicom_reader,
    fileio,
    labels_csv,
    memory,
    pseudonym,
    record_cache,
    record_encoder,
    schema,
    shards,
    splits,
)

MB = 1 << 20


def _is_url(path: str) -> bool:
    return "://" in path


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
      crop_to_body: bool. Cut every exam to the body's bounding box (``body_crop.body_box``:
        all phases, a 4-voxel margin, cols symmetric about the centre so labels keep their
        side); the manifest's shapes are the cut ones. Measured (BENCHMARKS.md, "Feeding an
        accelerator"): 0.88x the bytes and 0.84x the read CPU per synthetic exam, 0.97x on
        pydicom's MR images, which fill their field of view. Defaults to False.
      phases: tuple of str. The phases each record stores, a subset of ``schema.PHASES`` (in
        that order). Training reads whole records, so storing only what the input needs (t0
        and t2 for the paper's t2-t0) halves what every epoch reads; an input needing a phase
        not stored is refused when training starts. Defaults to all four.
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
    crop_to_body: bool = False
    phases: tuple = schema.PHASES
    progress: bool = True

    def __post_init__(self):
        phases = tuple(self.phases)
        if not phases or any(p not in schema.PHASES for p in phases):
            raise ValueError(
                f"phases must be a non-empty subset of {schema.PHASES}. Received: {phases}"
            )
        object.__setattr__(self, "phases", tuple(p for p in schema.PHASES if p in phases))

    def key_file(self) -> str:
        if self.pseudonym_key_file:
            return self.pseudonym_key_file
        if _is_url(self.output_dir):  # Object storage (the Beam converter): no local paths.
            return self.output_dir.rstrip("/") + "_private/pseudonym.key"
        out = os.path.abspath(self.output_dir).rstrip(os.sep)
        return os.path.join(out + "_private", "pseudonym.key")

    def id_map_file(self) -> str:
        if self.id_map:
            return self.id_map
        if _is_url(self.key_file()):
            return self.key_file().rsplit("/", 1)[0] + "/id_map.csv"
        return os.path.join(os.path.dirname(os.path.abspath(self.key_file())), "id_map.csv")

    def workers(self) -> int:
        if self.num_workers > 0:
            return self.num_workers
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1

    def manifest_flags(self) -> dict:
        """The settings as the manifest records them (those that change the output)."""
        flags = dataclasses.asdict(self)
        flags["split_ratios"] = list(self.split_ratios)
        flags["phases"] = list(self.phases)
        flags["pseudonym_key_file"] = self.key_file()
        flags["id_map"] = self.id_map_file()
        flags.pop("progress")
        flags.pop("num_workers")  # Does not change the output; keeps reruns byte-identical.
        return flags


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
    crop_to_body: bool = False
    phases: tuple = schema.PHASES


@dataclasses.dataclass(frozen=True)
class ExamRecord:
    """One exam read and encoded (``read_exam``), or why it could not be.

    Attributes:
      meta: dict. The record's metadata as the cache keeps it (``exam_id``, ``patient_id``,
        ``labels``, ``shape``, ``spacing``, ``voxel_dtype``; the caller adds ``bytes``, the
        framed record's size), or the failure (``exam``, ``exam_id``, ``reason``, ``detail``).
      record: bytes or None (failed). The serialized example.
      read_s: float. Seconds spent reading the DICOM files.
    """

    meta: dict
    record: bytes | None = None
    read_s: float = 0.0


def read_exam(
    exam, exam_dir, exam_id, labels, overrides, key, options, crop_to_body=False, phases=None
) -> ExamRecord:
    """Reads one exam folder and encodes its record: the one conversion of an exam that both
    converters run (``convert`` in its worker processes, ``beam_lib`` in its DoFn).

    Args:
      exam: str. Exam folder relative to the DICOM root (for the failure detail only).
      exam_dir: str. The folder to read.
      exam_id: str. The exam's pseudonym.
      labels: tuple of 4 ints.
      overrides: dict or None. The exam's phase map entries.
      key: bytes. The pseudonym key (the patient pseudonym is made here).
      options: dicom_reader.ReaderOptions.
      crop_to_body: bool. Cut the exam to the body's box (``ConvertConfig.crop_to_body``).
      phases: optional phases to store (``ConvertConfig.phases``). Defaults to all.

    Returns:
      ExamRecord; a broken exam gives a failure, never an exception.
    """
    start = time.perf_counter()
    try:
        exam_data = dicom_reader.load_exam(exam_dir, overrides, options, keep_stored=True)
    except dicom_reader.ExamError as e:
        return ExamRecord({"exam": exam, "exam_id": exam_id, "reason": e.reason, "detail": str(e)})
    except Exception as e:  # noqa: BLE001 - one broken exam never stops the others.
        reason = f"unexpected error while reading ({type(e).__name__})"
        detail = f"exam {exam_dir}: {type(e).__name__}: {e}"
        return ExamRecord({"exam": exam, "exam_id": exam_id, "reason": reason, "detail": detail})
    read_s = time.perf_counter() - start
    patient_id = pseudonym.Pseudonymizer(key).patient(exam_data.patient_id)
    volumes = exam_data.volumes
    rescale = exam_data.rescale
    if phases is not None:
        volumes = {p: v for p, v in volumes.items() if p in phases}
        rescale = {p: r for p, r in rescale.items() if p in phases}
    if crop_to_body:
        values = {
            p: schema.voxel_values(v, *rescale.get(p, schema.IDENTITY_RESCALE))
            for p, v in volumes.items()
        }
        box = body_crop.body_box(values)
        volumes = {p: np.ascontiguousarray(v) for p, v in body_crop.crop(volumes, box).items()}
    # Byte for byte schema.encode_example, without its three copies of the voxels.
    record = record_encoder.encode_record(
        exam_id, patient_id, volumes, exam_data.spacing, labels, rescale
    )
    meta = {
        "exam_id": exam_id,
        "patient_id": patient_id,
        "labels": list(labels),
        "shape": [int(s) for s in next(iter(volumes.values())).shape],
        "spacing": [float(s) for s in exam_data.spacing],
        "voxel_dtype": schema.voxel_dtype_name(volumes),
    }
    return ExamRecord(meta, record, read_s)


def _convert_one(task: _Task, pending: record_cache.PendingRecords) -> dict:
    """Reads, encodes and caches one exam.

    The record is written under a temporary name and added to ``pending``, this process's
    queue: it is published (synced, renamed, meta file written) when this process starts its
    next exam, or by the parent after the last one (``result["pending"]``).
    """
    pending.publish_all()
    start = time.perf_counter()
    rec_path, meta_path = record_cache.cache_paths(task.work_dir, task.cache_key)
    done = read_exam(
        task.exam,
        task.exam_dir,
        task.exam_id,
        task.labels,
        task.overrides,
        task.key,
        task.options,
        crop_to_body=task.crop_to_body,
        phases=task.phases,
    )
    if done.record is None:
        return done.meta
    tmp = record_cache.write_pending(rec_path, done.record)
    meta = dict(done.meta, bytes=os.path.getsize(tmp))
    entry = record_cache.PendingRecord(tmp, rec_path, meta_path, dict(meta))
    pending.add(entry)
    meta.update(
        exam=task.exam, read_s=done.read_s, total_s=time.perf_counter() - start, pending=entry
    )
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


@dataclasses.dataclass
class _Run:
    """One conversion: its inputs, and the exams' results as they come in.

    Attributes:
      config: ConvertConfig.
      rows: list of labels_csv rows, in CSV order.
      tasks: dict exam folder -> _Task, for every labelled exam.
      cached: list of dict. Metadata of the exams resumed from the cache.
      todo: list of _Task. The exams to read.
      results: list of dict. Metadata of each exam converted or resumed, or its failure
        (``reason``, ``detail``).
    """

    config: ConvertConfig
    rows: list
    tasks: dict
    cached: list
    todo: list
    results: list = dataclasses.field(default_factory=list)

    @property
    def work_dir(self) -> str:
        return os.path.join(self.config.output_dir, record_cache.WORK_DIR)

    def good(self) -> list:
        return [r for r in self.results if "reason" not in r]

    def failed(self) -> list:
        """The failures, in pseudonym order."""
        return sorted((r for r in self.results if "reason" in r), key=lambda r: r["exam_id"])


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
    run = _start(config)
    progress = _Progress(len(run.rows), config.progress, stream)
    run.results = list(run.cached)
    for _ in run.cached:
        progress.update(cached=True)
    workers = min(config.workers(), len(run.rows))
    pool = None
    if workers > 1:
        import tensorflow  # noqa: F401 - imported once before fork, shared by workers.

        pool = _pool(workers)
    try:
        _convert_exams(run, pool, progress)
        progress.update(force=True)
        return _finish(run, pool, stream)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _start(config: ConvertConfig) -> _Run:
    """Checks the inputs, prepares the output and cache directories, finds what is cached."""
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

    run = _Run(config, rows, tasks={}, cached=[], todo=[])
    for row in rows:
        exam_dir = os.path.join(config.dicom_root, *row.exam.split("/"))
        exam_id = pseudo.exam(row.exam)
        ov = overrides.get(row.exam)
        ckey = record_cache.cache_key(
            row.exam,
            exam_dir,
            row.labels,
            ov,
            pseudo.fingerprint(),
            options,
            crop_to_body=config.crop_to_body,
            phases=config.phases,
        )
        task = _Task(
            row.exam,
            exam_dir,
            exam_id,
            row.labels,
            ov,
            ckey,
            work_dir,
            key,
            options,
            config.crop_to_body,
            config.phases,
        )
        run.tasks[row.exam] = task
        meta = record_cache.load_meta(work_dir, ckey)
        if meta is not None:
            meta["exam"] = row.exam
            run.cached.append(meta)
        else:
            run.todo.append(task)
    if len({t.exam_id for t in run.tasks.values()}) != len(run.tasks):
        raise RuntimeError("pseudonym collision between two exam folders; use another key")
    return run


def _convert_exams(run: _Run, pool, progress: _Progress) -> None:
    """Converts ``run.todo`` (in ``pool`` if any), then publishes every record still pending."""
    pending = record_cache.PendingRecords()  # This process's own (no worker pool).
    if run.todo:
        if pool is None or len(run.todo) == 1:
            iterator = (_convert_one(task, pending) for task in run.todo)
        else:
            iterator = pool.imap_unordered(_convert_in_worker, run.todo)
        for res in iterator:
            run.results.append(res)
            progress.update(failed="reason" in res)
    pending.publish_all()
    for res in run.results:  # Each worker's last record.
        entry = res.pop("pending", None)
        if entry is not None and not entry.published():
            entry.publish()


def split_of(config: ConvertConfig, rows: list, good: list) -> dict:
    """Patient pseudonym -> split, from the CSV's split column or seeded and stratified.

    Args:
      config: ConvertConfig.
      rows: list of labels_csv rows, in CSV order.
      good: list of dict. Metadata of the converted exams (``exam``, ``patient_id``,
        ``labels``), in any order.

    Raises:
      labels_csv.InputError: the split column puts one patient in two splits.
    """
    if not (rows and rows[0].split is not None):
        strata: dict = {}
        for r in good:
            malignant = int(r["labels"][1] or r["labels"][3])
            strata[r["patient_id"]] = max(strata.get(r["patient_id"], 0), malignant)
        return splits.assign_splits(strata, config.split_ratios, config.seed)
    row_of = {r.exam: r for r in rows}
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
    return {p: lrs[0].split for p, lrs in patient_split.items()}


def plan(config: ConvertConfig, rows: list, good: list) -> dict:
    """Every split's exams and shards (split -> ``shards.SplitPlan``): the patient split, then
    each split's exams in pseudonym order cut into shards of about ``config.shard_size_mb``."""
    return shards.plan_splits(
        good, split_of(config, rows, good), max(1, int(config.shard_size_mb * MB))
    )


@dataclasses.dataclass(frozen=True)
class OutputFiles:
    """How ``publish`` changes files: local files by default; ``beam_files`` gives the same
    operations over Beam's file systems for object storage.

    Attributes:
      write_text: callable(path, text, private=bool). Replaces a file in one step.
      remove_stale: callable(output_dir, written). See ``shards.remove_stale``.
      keep_cache: callable(work_dir, keys). See ``record_cache.keep_only``.
      drop_cache: callable(work_dir). See ``record_cache.drop``.
    """

    write_text: Callable = fileio.atomic_write_text
    remove_stale: Callable = shards.remove_stale
    keep_cache: Callable = record_cache.keep_only
    drop_cache: Callable = record_cache.drop


def publish(
    config: ConvertConfig,
    rows: list,
    exam_ids: dict,
    plans: dict,
    good: list,
    failed: list,
    written: set,
    cache_keys: set,
    files: OutputFiles = OutputFiles(),
) -> tuple:
    """Once the shards are written: failures.csv, the manifest, stale shards removed, the id map
    and failure details, the cache pruned (or dropped when every exam converted).

    Args:
      config: ConvertConfig.
      rows: list of labels_csv rows, in CSV order.
      exam_ids: dict exam folder -> exam pseudonym, for every labelled exam.
      plans: dict split -> shards.SplitPlan (``plan``).
      good: list of dict. Metadata of the converted exams.
      failed: list of dict. The failures, in pseudonym order.
      written: set of the shard file names written.
      cache_keys: set of the cache keys of the converted exams.
      files: OutputFiles.

    Returns:
      (manifest dict, failure rows as failures.csv lists them).
    """
    out_dir = config.output_dir
    manifest = convert_report.build_manifest(
        plans, good, len(rows), len(failed), config.manifest_flags()
    )
    failure_rows = convert_report.failure_rows(failed)
    convert_report.write_failures(out_dir, failure_rows, files.write_text)
    convert_report.write_manifest(out_dir, manifest, files.write_text)
    files.remove_stale(out_dir, written)
    patient_of = {r["exam"]: r["patient_id"] for r in good}
    ids = [(exam_ids[r.exam], patient_of.get(r.exam, ""), r.exam) for r in rows]
    convert_report.write_private(config.id_map_file(), ids, failed, files.write_text)

    # The cache is dropped once every exam is in the shards; kept (pruned) otherwise, so a
    # rerun after fixing the failed exams reads only those.
    work_dir = os.path.join(out_dir, record_cache.WORK_DIR)
    if failed:
        files.keep_cache(work_dir, cache_keys)
    else:
        files.drop_cache(work_dir)
    return manifest, failure_rows


def _finish(run: _Run, pool, stream) -> ConvertResult:
    """Splits, shards, manifest, failures, id map; cache clean-up."""
    config, out_dir = run.config, run.config.output_dir
    good, failed = run.good(), run.failed()
    plans = plan(config, run.rows, good)
    cache_key = {r["exam_id"]: run.tasks[r["exam"]].cache_key for r in good}
    record_path = {e: record_cache.cache_paths(run.work_dir, k)[0] for e, k in cache_key.items()}
    written = shards.write_shards(out_dir, plans, record_path, not failed, pool)
    exam_ids = {exam: task.exam_id for exam, task in run.tasks.items()}
    manifest, failure_rows = publish(
        config, run.rows, exam_ids, plans, good, failed, written, set(cache_key.values())
    )
    result = ConvertResult(len(run.rows), len(good), failure_rows, len(run.cached), manifest)
    convert_report.print_summary(result, out_dir, config.id_map_file(), stream)
    return result
