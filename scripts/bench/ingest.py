r"""Ingest benchmark: DICOM -> TFRecords conversion against a bare pydicom decode.

Generates a synthetic cohort (default 4 patients, 1-3 exams each, 4 phases x 96 slices x
256 x 256), then, in the same run and with the same number of processes over the same files:

* ``bare``: ``pydicom.dcmread(f).pixel_array`` for every file, one exam per task;
* ``convert``: ``tfrecords_tools.convert_lib.convert`` (labels check, reading, grouping,
  reorientation, encoding, resume cache, shard assembly, manifest).

Files are read once beforehand so both passes see a warm page cache; TensorFlow is imported
before timing (a one-off start-up cost, not a per-exam one). The passes alternate
``--repeats`` times and the median of each is reported. Prints JSON lines.

``--dtype_study`` also measures, on one converted exam, the record size, the tf.data read
cost (parse, decode, rescale to float32) and the exactness of the converter's record (16-bit
stored values + rescale) against float32, float16 and per-slice re-quantised int16 voxels,
the figures behind the voxel dtype choice in ``tfrecords_tools/schema.py``.

``--enhanced`` measures reading Enhanced MR exams instead (its own small cohort: the
``enhanced_one_file`` and ``enhanced_per_phase`` variants, ``--enhanced_patients`` patients,
``--slices`` x ``--rows`` x ``--cols`` per phase): per exam, in this process, the CPU seconds of
``dicom_reader.load_exam`` (as the converter calls it) against ``pydicom.dcmread(f).pixel_array``
on the same files, alternating, median of ``--repeats`` after a warm-up; target ratio <= 1.3.
glibc malloc is tuned as in the converter (``memory.tune_malloc``) for both passes.

  .venv/bin/python scripts/bench/ingest.py --enhanced --slices=48 --rows=192 --cols=192

  .venv/bin/python scripts/bench/ingest.py --num_patients=8 --num_workers=2 --stages --dtype_study
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tfrecords_tools import (  # noqa: E402
    convert_lib,
    dicom_reader,
    durable_io,
    memory,
    record_cache,
    synthetic,
)

flags.DEFINE_integer("num_patients", 4, "Patients in the synthetic cohort (1-3 exams each).")
flags.DEFINE_integer("slices", 96, "Slices per phase.")
flags.DEFINE_integer("rows", 256, "Rows per slice.")
flags.DEFINE_integer("cols", 256, "Columns per slice.")
flags.DEFINE_integer("num_workers", 0, "Processes for both passes; 0 = all cores.")
flags.DEFINE_float("shard_size_mb", 200.0, "Converter --shard_size_mb.")
flags.DEFINE_integer("repeats", 3, "Alternating repetitions of both passes (median reported).")
flags.DEFINE_string("work_dir", "", "Where the cohort and records go; default a temp dir.")
flags.DEFINE_bool("dtype_study", False, "Also measure record size/read cost per voxel dtype.")
flags.DEFINE_bool("keep", False, "Keep the work dir.")
flags.DEFINE_bool(
    "page_cache_study",
    False,
    "Also measure the system time of writing 100 MB files into fresh page cache "
    "against writing them into pages just freed (why the converter releases "
    "what it writes).",
)
flags.DEFINE_bool(
    "enhanced",
    False,
    "Only measure reading Enhanced MR exams against a bare pydicom decode (see the "
    "module docstring).",
)
flags.DEFINE_integer("enhanced_patients", 4, "Patients of the --enhanced cohort.")
flags.DEFINE_bool(
    "stages",
    False,
    "Also time each stage on one exam in this process (steady state, after a "
    "warm-up exam): bare decode vs read, encode, cache write, shard copy.",
)


def _emit(**fields):
    print(json.dumps({"bench": "ingest", **fields}), flush=True)


def _decode_exam(exam_dir: str) -> int:
    import pydicom

    n = 0
    for rel in dicom_reader.list_files(exam_dir):
        n += pydicom.dcmread(os.path.join(exam_dir, rel)).pixel_array.nbytes
    return n


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (robust to a busy machine)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _bare(exam_dirs, workers: int) -> tuple:
    start, cpu = time.perf_counter(), _cpu()
    if workers <= 1:
        list(map(_decode_exam, exam_dirs))
    else:
        pool = multiprocessing.get_context("fork").Pool(workers)
        list(pool.imap_unordered(_decode_exam, exam_dirs))
        pool.close()
        pool.join()
    return time.perf_counter() - start, _cpu() - cpu


def _convert(root, labels, out, key, workers) -> tuple:
    shutil.rmtree(out, ignore_errors=True)
    config = convert_lib.ConvertConfig(
        dicom_root=root,
        labels=labels,
        output_dir=out,
        pseudonym_key_file=key,
        num_workers=workers,
        progress=False,
        shard_size_mb=flags.FLAGS.shard_size_mb,
    )
    start, cpu = time.perf_counter(), _cpu()
    with open(os.devnull, "w") as devnull:
        result = convert_lib.convert(config, stream=devnull)
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    if not result.ok:
        raise RuntimeError(f"conversion failed: {result.failures}")
    return seconds, cpu


def _dtype_study(records_dir: str) -> None:
    """Record size, read cost and exactness of one converted exam stored four ways.

    ``stored`` is the converter's record (the DICOM's 16-bit integers + rescale) and
    ``float32`` the same exam as float32 voxel values, both read by ``schema.decode_example``
    (the pipeline's parser); ``float16`` and ``int16_slice_scale`` (values re-quantised with a
    per-slice scale) are the rejected alternatives, read by an equivalent ad hoc parser.
    """
    import numpy as np
    import tensorflow as tf

    from tfrecords_tools import schema

    shard = os.path.join(
        records_dir, sorted(f for f in os.listdir(records_dir) if f.endswith(".tfrecord"))[0]
    )
    stored = next(iter(tf.data.TFRecordDataset(shard))).numpy()
    rec = schema.decode_example_numpy(stored)
    vols = {p: rec[p] for p in schema.PHASES}
    shape = vols["t0"].shape

    def adhoc(dtype):
        feats = {}
        for p, v in vols.items():
            if dtype == "int16_slice_scale":
                scale = np.maximum(np.abs(v).max(axis=(1, 2)), 1e-6) / 32767.0
                data = np.rint(v / scale[:, None, None]).astype("<i2").tobytes()
                feats[p + "_scale"] = tf.train.Feature(
                    float_list=tf.train.FloatList(value=scale.tolist())
                )
            else:
                data = v.astype("<f2").tobytes()
            feats[p] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
        serialized = tf.train.Example(features=tf.train.Features(feature=feats))
        spec = {p: tf.io.FixedLenFeature([], tf.string) for p in vols}
        if dtype == "int16_slice_scale":
            spec.update({p + "_scale": tf.io.FixedLenFeature([shape[0]], tf.float32) for p in vols})
        tf_dtype = tf.int16 if dtype == "int16_slice_scale" else tf.float16

        def parse(s):
            f = tf.io.parse_single_example(s, spec)
            out = []
            for p in vols:
                v = tf.cast(tf.reshape(tf.io.decode_raw(f[p], tf_dtype), shape), tf.float32)
                if dtype == "int16_slice_scale":
                    v = v * f[p + "_scale"][:, None, None]
                out.append(v)
            return tf.stack(out)

        return serialized.SerializeToString(), parse

    def schema_parse(s):
        d = schema.decode_example(s, schema.PHASES)
        return tf.stack([d[p] for p in schema.PHASES])

    as_float32 = schema.encode_example("E0", "P0", vols, rec["spacing"], rec["labels"])
    variants = {"stored": (stored, schema_parse), "float32": (as_float32, schema_parse)}
    variants.update({d: adhoc(d) for d in ("float16", "int16_slice_scale")})
    truth = np.stack(list(vols.values()))
    for dtype, (serialized, parse) in variants.items():
        path = os.path.join(records_dir, f"dtype-{dtype}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for _ in range(8):
                w.write(serialized)
        ds = tf.data.TFRecordDataset(path).map(parse).repeat(4)
        for _ in ds.take(2):
            pass
        start = time.perf_counter()
        n = sum(1 for _ in ds)
        per_exam = (time.perf_counter() - start) / n
        err = float(np.max(np.abs(parse(tf.constant(serialized)).numpy() - truth)))
        _emit(
            what="dtype",
            dtype=dtype,
            record_mb=len(serialized) / 1e6,
            read_ms_per_exam=per_exam * 1e3,
            max_abs_error=err,
        )
        os.unlink(path)


def _page_cache_study(base: str, files: int = 12, mb: int = 100) -> None:
    """System seconds per 100 MB written: fresh page cache, then pages freed just before.

    Round 1 writes ``files`` new files (the page cache grows); they are deleted and round 2
    writes as many again, into the pages just freed. A third round writes each file, syncs it
    and drops it from the page cache before the next, as the converter does.
    """
    import numpy as np

    data = np.random.default_rng(0).integers(0, 255, size=mb << 20, dtype=np.uint8).tobytes()
    tmp = tempfile.mkdtemp(prefix="page-cache-", dir=base)

    def system_seconds(release: bool) -> float:
        total = 0.0
        for i in range(files):
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            with open(os.path.join(tmp, f"f{i}"), "wb") as f:
                f.write(data)
                if release:
                    f.flush()
                    os.fdatasync(f.fileno())
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            total += resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0
        for i in range(files):
            os.unlink(os.path.join(tmp, f"f{i}"))
        return total / files * 100 / mb

    for name, release in (("fresh", False), ("reused", False), ("sync_and_release", True)):
        _emit(what="page_cache", write=name, system_s_per_100mb=round(system_seconds(release), 4))
    shutil.rmtree(tmp, ignore_errors=True)


def _stages(exam_dir: str, repeats: int = 4) -> None:
    """Per-stage CPU seconds of one exam, median of repeats after a warm-up."""
    import numpy as np
    import pydicom

    from tfrecords_tools import record_encoder

    memory.tune_malloc()
    files = [os.path.join(exam_dir, f) for f in dicom_reader.list_files(exam_dir)]
    tmp = tempfile.mkdtemp(prefix="ingest-stages-")
    rec, shard = os.path.join(tmp, "rec"), os.path.join(tmp, "shard")

    def copy():
        with open(rec, "rb") as src, open(shard, "wb") as out:
            durable_io.append_file(src, out)

    stages = {}
    for _ in range(repeats + 1):
        state = {}
        steps = [
            ("bare_decode", lambda: [pydicom.dcmread(f).pixel_array for f in files]),
            (
                "load_exam",
                lambda: state.update(exam=dicom_reader.load_exam(exam_dir, keep_stored=True)),
            ),
            (
                "encode",
                lambda: state.update(
                    record=record_encoder.encode_record(
                        "E0",
                        "P0",
                        state["exam"].volumes,
                        state["exam"].spacing,
                        (0, 0, 0, 0),
                        state["exam"].rescale,
                    )
                ),
            ),
            ("cache_write", lambda: record_cache.frame_record(rec, state["record"])),
            ("shard_copy", copy),
            ("cleanup", lambda: os.unlink(shard)),
            # One exam per shard: the shard is a hard link of the cache, whose name is dropped.
            ("shard_link", lambda: os.link(rec, shard)),
            ("cleanup_linked", lambda: os.unlink(rec)),
        ]
        for name, fn in steps:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            fn()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            stages.setdefault(name, []).append(
                (r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime)
            )
        state.clear()
        os.unlink(shard)  # The records' consumer's business, outside the conversion.
    for name, runs in stages.items():
        user, system = np.median(np.asarray(runs[1:]), axis=0)
        _emit(
            what="stage",
            stage=name,
            user_s=round(float(user), 4),
            system_s=round(float(system), 4),
            cpu_s=round(float(user + system), 4),
        )
    shutil.rmtree(tmp, ignore_errors=True)


def _enhanced(base: str, repeats: int) -> None:
    """CPU seconds per Enhanced MR exam: ``load_exam`` against ``dcmread(f).pixel_array``."""
    import pydicom

    FLAGS = flags.FLAGS
    memory.tune_malloc()  # As the converter's processes do (both passes gain from it).
    root = os.path.join(base, "enhanced")
    t = time.perf_counter()
    cohort = synthetic.generate_cohort(
        root,
        FLAGS.enhanced_patients,
        seed=0,
        slices=FLAGS.slices,
        rows=FLAGS.rows,
        cols=FLAGS.cols,
        variants=synthetic.MULTIFRAME_VARIANTS,
        workers=1,
        overwrite=True,
    )
    exams = [(e.variant, os.path.join(root, e.exam)) for e in cohort.exams]
    files = {d: [os.path.join(d, f) for f in dicom_reader.list_files(d)] for _, d in exams}
    mb = sum(os.path.getsize(f) for fs in files.values() for f in fs) / 1e6
    for fs in files.values():  # Warm the page cache.
        for f in fs:
            with open(f, "rb") as fh:
                fh.read()
    _emit(
        what="enhanced_cohort",
        exams=len(exams),
        files=sum(map(len, files.values())),
        dicom_mb=round(mb, 1),
        shape=[4, FLAGS.slices, FLAGS.rows, FLAGS.cols],
        generate_s=round(time.perf_counter() - t, 1),
    )

    def cpu(fn) -> float:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime

    totals = {"bare_decode": 0.0, "load_exam": 0.0}
    for variant, exam_dir in exams:
        runs = {"bare_decode": [], "load_exam": []}
        for _ in range(repeats + 1):  # The first round warms up.
            runs["bare_decode"].append(
                cpu(lambda: [pydicom.dcmread(f).pixel_array for f in files[exam_dir]])
            )
            runs["load_exam"].append(
                cpu(lambda: dicom_reader.load_exam(exam_dir, keep_stored=True))
            )
        med = {k: statistics.median(v[1:]) for k, v in runs.items()}
        for k in totals:
            totals[k] += med[k]
        _emit(
            what="enhanced_exam",
            variant=variant,
            files=len(files[exam_dir]),
            bare_cpu_s=round(med["bare_decode"], 4),
            load_exam_cpu_s=round(med["load_exam"], 4),
            ratio=round(med["load_exam"] / med["bare_decode"], 3),
        )
    ratio = totals["load_exam"] / totals["bare_decode"]
    _emit(
        what="enhanced_ratio",
        bare_cpu_s=round(totals["bare_decode"], 4),
        load_exam_cpu_s=round(totals["load_exam"], 4),
        load_exam_over_bare=round(ratio, 3),
        target=1.3,
        met=ratio <= 1.3,
        repeats=repeats,
        load_average=[round(x, 1) for x in os.getloadavg()],
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    if FLAGS.enhanced:
        base = FLAGS.work_dir or tempfile.mkdtemp(prefix="ingest-bench-")
        _enhanced(base, FLAGS.repeats)
        if not FLAGS.keep and not FLAGS.work_dir:
            shutil.rmtree(base, ignore_errors=True)
        return
    import tensorflow  # noqa: F401 - start-up cost outside the timed region.

    # As the converter's command line does (it matters with --num_workers=1, where the
    # conversion runs in this process; worker processes call it themselves).
    memory.tune_malloc()

    workers = FLAGS.num_workers or len(os.sched_getaffinity(0))
    base = FLAGS.work_dir or tempfile.mkdtemp(prefix="ingest-bench-")
    root = os.path.join(base, "dicom")
    t = time.perf_counter()
    params = [FLAGS.num_patients, FLAGS.slices, FLAGS.rows, FLAGS.cols]
    params_file = os.path.join(base, "cohort_params.json")
    labels = os.path.join(root, synthetic.LABELS_CSV)
    if os.path.exists(params_file) and json.load(open(params_file)) == params:
        with open(labels) as f:  # Same cohort as last time in this --work_dir: reuse it.
            exam_names = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    else:
        cohort = synthetic.generate_cohort(
            root,
            FLAGS.num_patients,
            seed=0,
            slices=FLAGS.slices,
            rows=FLAGS.rows,
            cols=FLAGS.cols,
            workers=1,
            overwrite=True,
        )
        exam_names = [e.exam for e in cohort.exams]
        with open(params_file, "w") as f:
            json.dump(params, f)
    exams = [os.path.join(root, e) for e in exam_names]
    files = [os.path.join(d, f) for d in exams for f in dicom_reader.list_files(d)]
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    for f in files:  # Warm the page cache for both passes.
        with open(f, "rb") as fh:
            fh.read()
    _emit(
        what="cohort",
        exams=len(exams),
        files=len(files),
        dicom_mb=round(mb, 1),
        shape=[4, FLAGS.slices, FLAGS.rows, FLAGS.cols],
        workers=workers,
        cpus=os.cpu_count(),
        generate_s=round(time.perf_counter() - t, 1),
    )

    out = os.path.join(base, "records")
    key = os.path.join(base, "private", "key")
    bare, conv = [], []
    for _ in range(FLAGS.repeats):
        bare.append(_bare(exams, workers))
        conv.append(_convert(root, labels, out, key, workers))
    record_mb = (
        sum(
            os.path.getsize(os.path.join(out, n))
            for n in os.listdir(out)
            if n.endswith(".tfrecord")
        )
        / 1e6
    )
    med = {}
    for what, runs in (("bare_decode", bare), ("convert", conv)):
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        med[what] = (wall, cpu)
        _emit(
            what=what,
            seconds=round(wall, 3),
            cpu_seconds=round(cpu, 3),
            runs=[round(r[0], 3) for r in runs],
            exams_per_s=round(len(exams) / wall, 3),
            dicom_mb_per_s=round(mb / wall, 1),
            workers=workers,
        )
    ratio = med["convert"][0] / med["bare_decode"][0]
    cpu_ratio = med["convert"][1] / med["bare_decode"][1]
    _emit(
        what="ratio",
        convert_over_bare=round(ratio, 3),
        cpu_convert_over_bare=round(cpu_ratio, 3),
        target=1.3,
        met=ratio <= 1.3,
        record_mb=round(record_mb, 1),
        load_average=[round(x, 1) for x in os.getloadavg()],
    )
    if FLAGS.dtype_study:
        _dtype_study(out)
    if FLAGS.stages:
        _stages(exams[0])
    if FLAGS.page_cache_study:
        _page_cache_study(base)
    if not FLAGS.keep and not FLAGS.work_dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
