"""Bytes and CPU per exam of TFRecord compression and of cropping to the body (issue 17).

For each exam of two sources it re-encodes the record five ways and measures bytes per exam
and the CPU the device path spends per exam on it (read with ``TFRecordDataset`` and the
record's compression, parse, ``decode_raw`` of the phases ``t2-t0`` reads; median of
``--repeats`` passes over the exams, warm page cache):

* ``none``: the record as the converter writes it;
* ``gzip`` / ``zlib``: the same record in a ``GZIP`` / ``ZLIB`` TFRecord file;
* ``body``: every phase cut to ``tfrecords_tools.body_crop.body_box`` (``--crop_to_body``);
* ``body+gzip``.

Sources: ``synthetic`` (a cohort of ``tfrecords_tools.synthetic``, converted by
``tfrecords_tools.convert``: the synthetic anatomy in its field of view) and ``pydicom`` (the
real MR images bundled with pydicom's test data, ``MR_small.dcm`` 64 x 64 and the
300 x 484 ``examples_overlay.dcm``, each made an exam of 4 identical phases of 8 slices).

Usage: ``python scripts/bench/record_bytes.py [--patients=6 --slices=32 --size=192]``, one
JSON line per source and variant.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

VARIANTS = ("none", "gzip", "zlib", "body", "body+gzip")
_PHASES_READ = ("t0", "t2")  # What the paper's t2-t0 input reads.


def _stored(record: bytes) -> dict:
    """A record's metadata and stored (not rescaled) volumes."""
    import numpy as np
    import tensorflow as tf

    from tfrecords_tools import schema

    f = tf.train.Example.FromString(record).features.feature
    shape = tuple(f[schema.KEY_SHAPE].int64_list.value)
    dtype = schema.VOXEL_DTYPES[f[schema.KEY_VOXEL_DTYPE].bytes_list.value[0].decode()]
    phases = [v.decode() for v in f[schema.KEY_PHASES].bytes_list.value]
    volumes, rescale = {}, {}
    for p in phases:
        raw = f[schema.volume_key(p)].bytes_list.value[0]
        volumes[p] = np.frombuffer(raw, dtype).reshape(shape)
        rescale[p] = tuple(np.frombuffer(f[schema.rescale_key(p)].bytes_list.value[0], "<f8"))
    return dict(
        exam_id=f[schema.KEY_EXAM_ID].bytes_list.value[0].decode(),
        patient_id=f[schema.KEY_PATIENT_ID].bytes_list.value[0].decode(),
        spacing=list(f[schema.KEY_SPACING].float_list.value),
        labels=list(f[schema.KEY_LABELS].int64_list.value),
        volumes=volumes,
        rescale=rescale,
    )


def cropped_record(record: bytes) -> tuple[bytes, float]:
    """The record cut to the body's box, and the fraction of voxels kept."""
    import numpy as np

    from tfrecords_tools import body_crop, schema

    e = _stored(record)
    values = {p: schema.voxel_values(v, *e["rescale"][p]) for p, v in e["volumes"].items()}
    box = body_crop.body_box(values)
    volumes = {p: np.ascontiguousarray(v) for p, v in body_crop.crop(e["volumes"], box).items()}
    kept = next(iter(volumes.values())).size / next(iter(e["volumes"].values())).size
    out = schema.encode_example(
        e["exam_id"], e["patient_id"], volumes, e["spacing"], e["labels"], e["rescale"]
    )
    return out, kept


def synthetic_records(directory: str, patients: int, slices: int, size: int) -> list:
    """Serialized records of a converted synthetic cohort."""
    import tensorflow as tf

    from tfrecords_tools import convert_lib, synthetic
    from tfrecords_tools.records import Records

    cohort = synthetic.generate_cohort(
        os.path.join(directory, "dicom"), patients, seed=0, slices=slices, rows=size, cols=size
    )
    out = os.path.join(directory, "records")
    convert_lib.convert(
        convert_lib.ConvertConfig(
            dicom_root=cohort.root,
            labels=cohort.labels_csv,
            output_dir=out,
            num_workers=1,
            progress=False,
        )
    )
    records = Records.open(out)
    paths = [
        p for s in ("train", "val", "test") if records.num_exams(s) for p in records.shard_paths(s)
    ]
    return [r.numpy() for r in tf.data.TFRecordDataset(paths)]


def pydicom_records(slices: int = 8) -> list:
    """pydicom's bundled real MR images, each as an exam of 4 identical phases."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file

    from tfrecords_tools import schema

    out = []
    for i, name in enumerate(("MR_small.dcm", "examples_overlay.dcm")):
        ds = pydicom.dcmread(get_testdata_file(name))
        image = ds.pixel_array
        image = image.astype(np.int16 if image.min() < 0 or image.max() < 32768 else np.uint16)
        volume = np.ascontiguousarray(np.repeat(image[None], slices, axis=0))
        rescale = (
            float(getattr(ds, "RescaleSlope", 1.0)),
            float(getattr(ds, "RescaleIntercept", 0.0)),
        )
        out.append(
            schema.encode_example(
                f"pydicom{i}",
                f"pydicom{i}",
                {p: volume for p in schema.PHASES},
                (3.0, 1.0, 1.0),
                [0, 0, 0, 0],
                {p: rescale for p in schema.PHASES},
            )
        )
    return out


def _write(path: str, records: list, compression: str) -> None:
    import tensorflow as tf

    with tf.io.TFRecordWriter(path, options=compression or None) as w:
        for r in records:
            w.write(r)


def _read_cpu_ms(path: str, compression: str, count: int, repeats: int) -> float:
    """CPU ms per exam of the device path's CPU work: read, parse, decode_raw."""
    import tensorflow as tf

    from tfrecords_tools import schema

    spec = schema.feature_spec(_PHASES_READ)

    def parse(record):
        p = tf.io.parse_single_example(record, spec)
        return [tf.io.decode_raw(p[schema.volume_key(k)], tf.int16) for k in _PHASES_READ]

    def once():
        ds = tf.data.TFRecordDataset(path, compression_type=compression).map(parse)
        start = time.process_time()
        for _ in ds:
            pass
        return 1e3 * (time.process_time() - start) / count

    once()  # Warm-up: page cache, kernels.
    return statistics.median(once() for _ in range(repeats))


def measure(source: str, records: list, repeats: int = 3) -> list:
    """Bytes and CPU per exam of each of ``VARIANTS`` for ``records``."""
    cropped, kept = zip(*(cropped_record(r) for r in records))
    results = []
    with tempfile.TemporaryDirectory(prefix="record_bytes_") as tmp:
        for variant in VARIANTS:
            body = variant.startswith("body")
            compression = variant.split("+")[-1].upper() if variant != "body" else ""
            compression = "" if compression == "NONE" else compression
            path = os.path.join(tmp, f"{variant}.tfrecord")
            _write(path, list(cropped if body else records), compression)
            results.append(
                dict(
                    benchmark="record_bytes",
                    source=source,
                    variant=variant,
                    exams=len(records),
                    mb_per_exam=round(os.path.getsize(path) / len(records) / 1e6, 3),
                    cpu_ms_per_exam=round(
                        _read_cpu_ms(path, compression, len(records), repeats), 2
                    ),
                    voxels_kept=round(statistics.mean(kept), 3) if body else 1.0,
                )
            )
    base = results[0]
    for r in results:
        r["bytes_vs_none"] = round(r["mb_per_exam"] / base["mb_per_exam"], 3)
        r["cpu_vs_none"] = round(r["cpu_ms_per_exam"] / base["cpu_ms_per_exam"], 3)
    if hasattr(os, "getloadavg"):
        for r in results:
            r["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return results


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    with tempfile.TemporaryDirectory(prefix="record_bytes_cohort_") as tmp:
        sources = {
            "synthetic": synthetic_records(tmp, f.patients, f.slices, f.size),
            "pydicom": pydicom_records(),
        }
        for source, records in sources.items():
            for result in measure(source, records, f.repeats):
                print(json.dumps(result), flush=True)


def _define_flags():
    from absl import flags

    flags.DEFINE_integer("patients", 6, "Synthetic patients (about 1.3 exams each).")
    flags.DEFINE_integer("slices", 32, "Slices of the synthetic exams.")
    flags.DEFINE_integer("size", 192, "Rows and cols of the synthetic exams.")
    flags.DEFINE_integer("repeats", 3, "Timed passes (median).")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main)
