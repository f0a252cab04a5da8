"""Input pipeline throughput against a raw sequential read of the same shard files.

Writes synthetic records (all four phases stored as 16-bit integers with a rescale, as the
converter writes them) unless given a records directory, then measures in one run, alternating:

* ``raw_read``: plain ``readinto`` of every shard file of the split, 8 MiB at a time;
* ``tfrecord_read``: ``TFRecordDataset`` over the same files (parallel interleave as in the
  pipeline) without parsing: record framing and the CRC32C check, the floor of any TFRecord
  pipeline;
* ``input_pipeline``: one epoch of ``mri_keras.input_pipeline.make_dataset`` (training=True:
  shuffling, flip and a 0.9 in-plane crop when ``augment``; z-score, input ``t2-t0``),
  counting the shard bytes it consumes;

once with the files in the page cache (``warm``: the raw read is a memory copy) and once with
them dropped from it before each read (``cold``: both read the disk).

Usage: ``python scripts/bench/pipeline_bench.py [--num_exams=24] [--slices=16] [--stages] ...``
prints one JSON object per line (``--stages`` first adds the CPU cost of each pipeline
stage). ``--shape=128,448,448`` (or ``--placements``) instead measures the two preprocessing
placements (``--preprocess_on=cpu`` / ``device``: CPU ms and MB per exam, exams/s per core)
and, from ``model.count_flops`` and ``--accelerator_tflops``, the CPU cores and read GB/s one
GPU needs (``measure_placements``). ``scripts/bench/model.py`` imports :func:`measure_pipeline`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

_CHUNK_BYTES = 8 << 20


def _split_files(records_dir: str, split: str, input_variant: str) -> list:
    from mri_keras import input_pipeline

    return input_pipeline.open_split(records_dir, split, input_variant)[1]


def write_synthetic_records(
    directory: str,
    num_exams: int,
    slices: int,
    height: int,
    width: int,
    num_shards: int = 4,
    seed: int = 0,
    phases=None,
) -> str:
    """Writes ``num_exams`` random 4-phase exams as a ``train`` split with a manifest.

    Args:
      directory: str. Output directory (created).
      num_exams: int. Exams to write.
      slices, height, width: int. Shape of every exam.
      num_shards: int. Shard files (at most num_exams). Defaults to 4.
      seed: int. Seed of the voxels and labels. Defaults to 0.
      phases: optional phases to store. Defaults to all four (as the converter stores them).

    Returns:
      ``directory``.
    """
    import numpy as np
    import tensorflow as tf

    from tfrecords_tools import schema

    os.makedirs(directory, exist_ok=True)
    stored = tuple(phases or schema.PHASES)
    rng = np.random.default_rng(seed)
    num_shards = max(1, min(num_shards, num_exams))
    names = [
        schema.SHARD_PATTERN.format(split="train", index=i, count=num_shards)
        for i in range(num_shards)
    ]
    writers = [tf.io.TFRecordWriter(os.path.join(directory, n)) for n in names]
    exams = []
    shape = (slices, height, width)
    for i in range(num_exams):
        base = rng.gamma(2.0, 150.0, size=shape)
        # As the converter writes them: the scanner's 16-bit integers with a rescale.
        volumes = {
            p: np.rint(base * (1.0 + 0.3 * k)).astype(np.int16)
            for k, p in enumerate(schema.PHASES)
            if p in stored
        }
        rescale = {p: (1.6875, -16.0) for p in stored}
        labels = [int(v) for v in rng.integers(0, 2, size=4)]
        exam_id, patient_id = f"bench{i:05d}", f"benchpatient{i:05d}"
        writers[i % num_shards].write(
            schema.encode_example(exam_id, patient_id, volumes, (3.0, 0.7, 0.7), labels, rescale)
        )
        exams.append(
            {"exam_id": exam_id, "patient_id": patient_id, "labels": labels, "shape": list(shape)}
        )
    for w in writers:
        w.close()
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "phases": list(stored),
        "labels": list(schema.LABELS),
        "splits": {
            "train": {
                "shards": names,
                "num_exams": num_exams,
                "num_patients": num_exams,
                "exams": exams,
                "label_counts": {
                    name: sum(e["labels"][k] for e in exams) for k, name in enumerate(schema.LABELS)
                },
            }
        },
    }
    with open(os.path.join(directory, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    return directory


def raw_read_seconds(paths: list) -> tuple:
    """Reads every byte of ``paths`` sequentially with plain file reads.

    Returns:
      (wall seconds, CPU seconds of this process).
    """
    buf = bytearray(_CHUNK_BYTES)
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start, time.process_time() - cpu


def evict_from_page_cache(paths: list) -> bool:
    """Asks the kernel to drop ``paths`` from the page cache (no privileges needed).

    Returns:
      False where ``posix_fadvise`` does not exist (then reads stay warm).
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # Dirty pages (freshly written shards) cannot be dropped.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def measure_pipeline(
    records_dir: str | None = None,
    slices: int = 16,
    height: int = 224,
    width: int = 224,
    num_exams: int = 48,
    augment: bool = True,
    *,
    split: str = "train",
    input_variant: str = "t2-t0",
    repeats: int = 3,
    cold: bool = True,
) -> list:
    """Measures the input pipeline's exams/s and MB/s against raw read MB/s.

    Every measurement is one full epoch with a fresh iterator (pipeline start-up and the
    shuffle-buffer fill included), alternating raw read and pipeline; the median of
    ``repeats`` is reported. ``warm``: files in the page cache (raw read is then a memory copy,
    so the ratio prices the pipeline's CPU work). ``cold``: files dropped from the page cache
    before each measurement (``posix_fadvise``), so both read from the disk.

    Args:
      records_dir: str or None. A converted records directory; None writes ``num_exams``
        synthetic ``slices x height x width`` exams into a temporary directory (removed after).
      slices, height, width: int. Exam shape of the synthetic records. Defaults to 16x224x224.
      num_exams: int. Synthetic exams (one epoch). Defaults to 48.
      augment: bool. Train-mode pipeline (shuffle, flip, 0.9 in-plane crop) if True, else the
        evaluation pipeline. Defaults to True.
      split: str. Split to read. Defaults to "train".
      input_variant: str. Input variant. Defaults to "t2-t0" (2 of the 4 stored phases).
      repeats: int. Timed epochs of each measurement. Defaults to 3.
      cold: bool. Also measure with the files dropped from the page cache. Defaults to True.

    Returns:
      Per cache state (``warm``, then ``cold``), ``{"benchmark": "raw_read", "mb_per_s",
      "cpu_s", ...}``, ``{"benchmark": "tfrecord_read", ...}`` and
      ``{"benchmark": "input_pipeline", "exams_per_s", "mb_per_s",
      "vs_raw_read", "cpu_ms_per_exam", "cpu_s", ...}`` (MB = 1e6 bytes of shard files; median
      wall and process CPU time of the ``repeats`` epochs; ``load_avg_1min`` says how busy the
      machine was).
    """
    import tensorflow as tf

    from mri_keras import input_pipeline
    from mri_keras.config import InputConfig

    results = []
    with tempfile.TemporaryDirectory(prefix="pipeline_bench_") as tmp:
        synthetic = records_dir is None
        if synthetic:
            records_dir = write_synthetic_records(tmp, num_exams, slices, height, width)
        files = _split_files(records_dir, split, input_variant)
        total_bytes = sum(os.path.getsize(p) for p in files)
        config = InputConfig(
            input_variant=input_variant, flip=augment, crop=0.9 if augment else None
        )

        def pipeline_epoch():
            start, cpu = time.perf_counter(), time.process_time()
            count = 0
            for _ in input_pipeline.make_dataset(records_dir, split, config, training=augment):
                count += 1
            return time.perf_counter() - start, time.process_time() - cpu, count

        def tfrecord_epoch():
            # The floor of any TFRecord pipeline: framing + CRC32C check, no parsing.
            start, cpu = time.perf_counter(), time.process_time()
            reader = tf.data.Dataset.from_tensor_slices(files).interleave(
                tf.data.TFRecordDataset,
                cycle_length=min(len(files), 4),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            for _ in reader.prefetch(tf.data.AUTOTUNE):
                pass
            return time.perf_counter() - start, time.process_time() - cpu

        raw_read_seconds(files)  # Warm-up: page cache.
        tfrecord_epoch()
        epoch_exams = pipeline_epoch()[2]  # Warm-up: op kernels, thread pools.
        states = ["warm"]
        if cold and evict_from_page_cache(files):
            states.append("cold")
        timings = {state: ([], [], []) for state in states}
        for _ in range(repeats):
            for state in states:
                raw, pipe, records = timings[state]
                for times, measure in (
                    (raw, lambda: raw_read_seconds(files)),
                    (records, tfrecord_epoch),
                    (pipe, lambda: pipeline_epoch()[:2]),
                ):
                    if state == "cold":
                        evict_from_page_cache(files)
                    times.append(measure())
    mb = total_bytes / 1e6
    common = {
        "records": "synthetic" if synthetic else records_dir,
        "split": split,
        "files": len(files),
        "exams": epoch_exams,
        "shard_mb": round(mb, 1),
        "repeats": repeats,
        "cpus": os.cpu_count(),
    }
    if synthetic:
        common["shape"] = [slices, height, width]
    if hasattr(os, "getloadavg"):
        common["load_avg_1min"] = round(os.getloadavg()[0], 2)
    for state in states:
        raw_s = statistics.median(t[0] for t in timings[state][0])
        raw_cpu = statistics.median(t[1] for t in timings[state][0])
        pipe_s = statistics.median(t[0] for t in timings[state][1])
        pipe_cpu = statistics.median(t[1] for t in timings[state][1])
        rec_s = statistics.median(t[0] for t in timings[state][2])
        rec_cpu = statistics.median(t[1] for t in timings[state][2])
        results.append(
            dict(
                benchmark="raw_read",
                cache=state,
                mb_per_s=round(mb / raw_s, 1),
                cpu_s=round(raw_cpu, 3),
                **common,
            )
        )
        results.append(
            dict(
                benchmark="tfrecord_read",
                cache=state,
                exams_per_s=round(epoch_exams / rec_s, 2),
                mb_per_s=round(mb / rec_s, 1),
                vs_raw_read=round(raw_s / rec_s, 3),
                cpu_ms_per_exam=round(1e3 * rec_cpu / epoch_exams, 2),
                cpu_s=round(rec_cpu, 3),
                **common,
            )
        )
        results.append(
            dict(
                benchmark="input_pipeline",
                cache=state,
                exams_per_s=round(epoch_exams / pipe_s, 2),
                mb_per_s=round(mb / pipe_s, 1),
                vs_raw_read=round(raw_s / pipe_s, 3),
                # CPU seconds (all threads) per exam: the pipeline's cost even on a busy machine.
                cpu_ms_per_exam=round(1e3 * pipe_cpu / epoch_exams, 2),
                cpu_s=round(pipe_cpu, 3),
                input_variant=config.input_variant,
                normalization=config.normalization,
                augment="shuffle+flip+crop0.9" if augment else "none",
                **common,
            )
        )
    return results


def measure_stages(
    records_dir: str | None = None,
    slices: int = 16,
    height: int = 224,
    width: int = 224,
    num_exams: int = 48,
    input_variant: str = "t2-t0",
    repeats: int = 3,
    split: str = "train",
) -> list:
    """CPU ms per exam of the training pipeline built up one stage at a time (warm cache).

    Stages, each including the ones before: ``read`` (interleaved ``TFRecordDataset``),
    ``parse`` (``schema.decode_example`` of the phases the input needs: parse, decode,
    rescale), ``preprocess`` (input variant + z-score), ``augment`` (flip + 0.9 crop),
    ``batch`` (``batch(1)`` + prefetch), then ``make_dataset`` itself (adds the record
    shuffle buffer, the schema-version check and the label targets).

    Returns:
      one ``{"benchmark": "pipeline_stage", "stage", "cpu_ms_per_exam", "exams_per_s"}`` per
      stage (median of ``repeats`` epochs after a warm-up epoch).
    """
    import tensorflow as tf

    from mri_keras import constants, input_pipeline
    from mri_keras.config import InputConfig
    from tfrecords_tools import schema

    results = []
    with tempfile.TemporaryDirectory(prefix="pipeline_stages_") as tmp:
        if records_dir is None:
            records_dir = write_synthetic_records(tmp, num_exams, slices, height, width)
        files = _split_files(records_dir, split, input_variant)
        config = InputConfig(input_variant=input_variant, flip=True, crop=0.9)
        phases = constants.phases_needed(input_variant)
        auto = tf.data.AUTOTUNE

        def read():
            return tf.data.Dataset.from_tensor_slices(files).interleave(
                tf.data.TFRecordDataset, cycle_length=min(len(files), 4), num_parallel_calls=auto
            )

        def parse(record):
            d = schema.decode_example(record, phases)
            return {p: d[p] for p in phases}, d[schema.KEY_LABELS]

        def preprocess(record):
            volumes, labels = parse(record)
            return input_pipeline.preprocess(volumes, config), labels

        def augment(record, seed):
            return input_pipeline.augment(*preprocess(record), seed, config)

        def augmented():
            seeds = tf.data.Dataset.random(seed=0).batch(2)
            return tf.data.Dataset.zip((read(), seeds)).map(augment, num_parallel_calls=auto)

        chains = {
            "read": read,
            "parse": lambda: read().map(parse, num_parallel_calls=auto),
            "preprocess": lambda: read().map(preprocess, num_parallel_calls=auto),
            "augment": augmented,
            "batch": lambda: augmented().batch(1).prefetch(auto),
            "make_dataset": lambda: input_pipeline.make_dataset(
                records_dir, split, config, training=True
            ),
        }
        for stage, make in chains.items():
            runs = []
            for _ in range(repeats + 1):
                start, cpu = time.perf_counter(), time.process_time()
                count = sum(1 for _ in make())
                runs.append((time.perf_counter() - start, time.process_time() - cpu, count))
            wall = statistics.median(r[0] for r in runs[1:])
            cpu = statistics.median(r[1] for r in runs[1:])
            count = runs[-1][2]
            results.append(
                dict(
                    benchmark="pipeline_stage",
                    stage=stage,
                    cache="warm",
                    cpu_ms_per_exam=round(1e3 * cpu / count, 2),
                    exams_per_s=round(count / wall, 1),
                    exams=count,
                    load_avg_1min=round(os.getloadavg()[0], 2)
                    if hasattr(os, "getloadavg")
                    else None,
                )
            )
    return results


# A training step costs about 3x the forward FLOPs (model.count_flops).
_STEP_FLOPS_PER_FORWARD = 3


def measure_placements(
    records_dir: str | None = None,
    slices: int = 16,
    height: int = 224,
    width: int = 224,
    num_exams: int = 8,
    *,
    split: str = "train",
    input_variant: str = "t2-t0",
    repeats: int = 3,
    accelerator_tflops: float = 300.0,
    stored_phases=None,
) -> list:
    """CPU and bytes per exam of the two preprocessing placements, and what one GPU needs.

    Both read the same records with ``make_dataset(..., training=True)`` (shuffle, flip, 0.9
    in-plane crop; warm page cache): ``cpu`` does all the per-voxel work in tf.data (today's
    path); ``device`` only parses the stored 16-bit phases and draws the augmentation, leaving
    the per-voxel work to the step (``mri_keras.preprocessing``). ``device_on_cpu`` adds that
    step-side preprocessing run on this CPU (what ``--preprocess_on=device`` costs a CPU-only
    machine).

    Args:
      records_dir: str or None. Records to read; None writes ``num_exams`` synthetic exams.
      slices, height, width: int. Synthetic exam shape, and the shape the FLOPs are counted at.
      num_exams: int. Synthetic exams (one epoch). Defaults to 8.
      split, input_variant: str. What is read. Defaults to "train", "t2-t0".
      repeats: int. Timed epochs (median). Defaults to 3.
      accelerator_tflops: float. Achieved TFLOP/s of one accelerator on the train step (e.g.
        300 = an H100-class GPU at ~30% of its ~990 bf16 dense peak). Defaults to 300.
      stored_phases: optional phases the synthetic records store. Defaults to all four.

    Returns:
      One ``{"benchmark": "placement", "placement", "cpu_ms_per_exam",
      "exams_per_s_per_core", "record_mb_per_exam", "to_device_mb_per_exam", ...}`` per
      placement, then ``{"benchmark": "gpu_budget", ...}``: the step's TFLOP (paper model),
      exams/s of one accelerator at ``accelerator_tflops``, and per placement the CPU cores
      and GB/s of record reads (every epoch from disk) that keep it fed.
    """
    import tensorflow as tf

    from mri_keras import config as config_lib
    from mri_keras import input_pipeline, preprocessing
    from mri_keras import model as model_lib

    config = config_lib.InputConfig(input_variant=input_variant, flip=True, crop=0.9)
    results = []
    with tempfile.TemporaryDirectory(prefix="pipeline_placements_") as tmp:
        synthetic = records_dir is None
        if synthetic:
            records_dir = write_synthetic_records(
                tmp, num_exams, slices, height, width, phases=stored_phases
            )
        files = _split_files(records_dir, split, input_variant)
        record_mb = sum(os.path.getsize(p) for p in files) / 1e6
        step = tf.function(lambda batch: preprocessing.preprocess_batch(batch, config))

        def epoch(placement):
            on = "cpu" if placement == "cpu" else "device"
            ds = input_pipeline.make_dataset(
                records_dir, split, config, training=True, preprocess_on=on
            )
            start, cpu = time.perf_counter(), time.process_time()
            count, nbytes = 0, 0
            for volume, _ in ds:
                if placement == "device_on_cpu":
                    volume = step(volume)
                parts = volume.values() if isinstance(volume, dict) else [volume]
                nbytes += sum(int(tf.size(v)) * v.dtype.size for v in parts)
                count += 1
            return time.perf_counter() - start, time.process_time() - cpu, count, nbytes

        placements = ("cpu", "device", "device_on_cpu")
        for placement in placements:
            epoch(placement)  # Warm-up: page cache, kernels, tracing.
        runs = {p: [] for p in placements}
        for _ in range(repeats):
            for placement in placements:  # Alternating: a load change hits all of them.
                runs[placement].append(epoch(placement))
    common = {
        "records": "synthetic" if synthetic else records_dir,
        "repeats": repeats,
        "malloc": "default" if os.environ.get("MRI_KERAS_DEFAULT_MALLOC") == "1" else "tuned",
    }
    if synthetic:
        common["stored_phases"] = list(stored_phases or ("t0", "t1", "t2", "t3"))
    if synthetic:
        common["shape"] = [slices, height, width]
    if hasattr(os, "getloadavg"):
        common["load_avg_1min"] = round(os.getloadavg()[0], 2)
    cpu_ms = {}
    for placement in placements:
        count = runs[placement][0][2]
        wall = statistics.median(r[0] for r in runs[placement])
        cpu = statistics.median(r[1] for r in runs[placement])
        cpu_ms[placement] = 1e3 * cpu / count
        results.append(
            dict(
                benchmark="placement",
                placement=placement,
                exams=count,
                cpu_ms_per_exam=round(cpu_ms[placement], 2),
                exams_per_s_per_core=round(1e3 / cpu_ms[placement], 2),
                exams_per_s=round(count / wall, 2),
                record_mb_per_exam=round(record_mb / count, 2),
                to_device_mb_per_exam=round(runs[placement][0][3] / count / 1e6, 2),
                input_variant=config.input_variant,
                augment="shuffle+flip+crop0.9",
                **common,
            )
        )
    step_flops = _STEP_FLOPS_PER_FORWARD * model_lib.count_flops(
        config_lib.ModelConfig(), slices, height, width
    )
    gpu_exams_per_s = accelerator_tflops * 1e12 / step_flops
    mb_per_exam = record_mb / runs["cpu"][0][2]
    budget = dict(
        benchmark="gpu_budget",
        shape=[slices, height, width],
        step_tflop=round(step_flops / 1e12, 3),
        accelerator_tflops=accelerator_tflops,
        gpu_exams_per_s=round(gpu_exams_per_s, 1),
        read_gb_per_s=round(gpu_exams_per_s * mb_per_exam / 1e3, 2),
        **{
            f"cores_per_gpu_{p}": round(gpu_exams_per_s * cpu_ms[p] / 1e3, 1)
            for p in ("cpu", "device")
        },
    )
    results.append(budget)
    return results


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    from tfrecords_tools import memory

    # As training does (mri_keras.train): reuse freed exam-sized blocks instead of mapping and
    # page-faulting them afresh; MRI_KERAS_DEFAULT_MALLOC=1 measures glibc's defaults.
    memory.tune_malloc()
    slices, height, width = f.slices, f.height, f.width
    if f.shape:
        slices, height, width = (int(v) for v in f.shape)
    if f.placements or f.shape:
        for result in measure_placements(
            records_dir=f.records_dir,
            slices=slices,
            height=height,
            width=width,
            num_exams=f.num_exams if f["num_exams"].present else 8,
            split=f.split,
            input_variant=f.input_variant,
            repeats=f.repeats,
            accelerator_tflops=f.accelerator_tflops,
            stored_phases=f.stored_phases or None,
        ):
            print(json.dumps(result), flush=True)
        return
    if f.stages:
        for result in measure_stages(
            records_dir=f.records_dir,
            slices=f.slices,
            height=f.height,
            width=f.width,
            num_exams=f.num_exams,
            input_variant=f.input_variant,
            repeats=f.repeats,
            split=f.split,
        ):
            print(json.dumps(result), flush=True)
    for result in measure_pipeline(
        records_dir=f.records_dir,
        slices=f.slices,
        height=f.height,
        width=f.width,
        num_exams=f.num_exams,
        augment=f.augment,
        split=f.split,
        input_variant=f.input_variant,
        repeats=f.repeats,
        cold=f.cold,
    ):
        print(json.dumps(result), flush=True)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("records_dir", None, "Converted records; default: synthetic records.")
    flags.DEFINE_integer("slices", 16, "Slices of each synthetic exam.")
    flags.DEFINE_integer("height", 224, "Rows of each synthetic exam.")
    flags.DEFINE_integer("width", 224, "Cols of each synthetic exam.")
    flags.DEFINE_integer("num_exams", 48, "Synthetic exams.")
    flags.DEFINE_boolean("augment", True, "Train-mode pipeline with flip and crop.")
    flags.DEFINE_string("split", "train", "Split to read.")
    flags.DEFINE_string("input_variant", "t2-t0", "Input variant.")
    flags.DEFINE_integer("repeats", 3, "Timed epochs per measurement (median reported).")
    flags.DEFINE_boolean("cold", True, "Also measure with the files dropped from the page cache.")
    flags.DEFINE_list(
        "shape",
        [],
        "S,H,W (e.g. 128,448,448, the paper's scale): measure the two preprocessing "
        "placements at this shape (--placements) instead of the default benchmarks.",
    )
    flags.DEFINE_boolean(
        "placements",
        False,
        "Measure CPU and bytes per exam of --preprocess_on=cpu and =device, and the CPU cores "
        "and read GB/s one accelerator needs (default 8 exams).",
    )
    flags.DEFINE_list(
        "stored_phases",
        [],
        "With --placements: phases the synthetic records store (default all four, as the "
        "converter writes them; t0,t2 = only what t2-t0 reads).",
    )
    flags.DEFINE_float(
        "accelerator_tflops",
        300.0,
        "Achieved train-step TFLOP/s of one accelerator for the budget (300: H100-class at "
        "~30%% of its bf16 dense peak).",
    )
    flags.DEFINE_boolean(
        "stages",
        False,
        "First, CPU ms per exam as the pipeline is built up stage by stage (warm cache).",
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main)
