"""The single definition of the exam record format (writer and reader both import this).

One ``tf.train.Example`` per exam:

=================  =========  ==============================================================
key                type       content
=================  =========  ==============================================================
schema_version     int64[1]   ``SCHEMA_VERSION``
exam_id            bytes[1]   keyed-hash pseudonym of the exam (never a DICOM identifier)
patient_id         bytes[1]   keyed-hash pseudonym of the patient
shape              int64[3]   ``(S, H, W)``: slices (toward Superior), rows (toward
                              Posterior), cols (toward patient Left) - canonical LPS+ axes
spacing            float[3]   voxel spacing in mm along ``(slice, row, col)``
labels             int64[4]   0/1 in ``LABELS`` order
phases             bytes[P]   names of the phases stored, a subset of ``PHASES`` in order
volume/<phase>     bytes[1]   raw voxels of that phase: ``VOXEL_DTYPE``, little-endian,
                              C order ``(S, H, W)``, already rescaled
                              (stored value x RescaleSlope + RescaleIntercept)
=================  =========  ==============================================================

Voxel dtype: float32. Rescaled MR values are not integers in general (RescaleSlope is often
fractional and on some scanners varies per slice), so an integer dtype would need a per-slice
scale. float16 overflows at 65504 (seen with Philips-scaled values) and quantises to steps of
2 above 2048, which shows up in subtraction images. float32 holds every 16-bit stored value
times any slope exactly enough. The price, measured (BENCHMARKS.md, "Voxel dtype"): a
4 x 96 x 256 x 256 exam is 100.7 MB instead of 50.3 MB, and parsing it in tf.data takes about
twice as long as the 16-bit forms (333 vs 151 ms for int16 with a per-slice scale, 129 ms for
float16, on 2 busy vCPUs); the int16 form was off by up to 0.02 and float16 by up to 0.25.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 1

# Labels, always in this order (heads, losses, metrics and CSV columns key off this tuple).
LABELS = ("left_benign", "left_malignant", "right_benign", "right_malignant")
# DCE phases: t0 pre-contrast, t1..t3 first/second/third post-contrast.
PHASES = ("t0", "t1", "t2", "t3")
SPLITS = ("train", "val", "test")

VOXEL_DTYPE = np.dtype("<f4")

KEY_SCHEMA_VERSION = "schema_version"
KEY_EXAM_ID = "exam_id"
KEY_PATIENT_ID = "patient_id"
KEY_SHAPE = "shape"
KEY_SPACING = "spacing"
KEY_LABELS = "labels"
KEY_PHASES = "phases"
VOLUME_KEY_PREFIX = "volume/"

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.csv"
SHARD_PATTERN = "{split}-{index:05d}-of-{count:05d}.tfrecord"


def volume_key(phase: str) -> str:
    """Returns the feature key holding the voxels of ``phase``."""
    if phase not in PHASES:
        raise ValueError(f"Unknown phase {phase!r}; expected one of {PHASES}.")
    return VOLUME_KEY_PREFIX + phase


def shard_glob(split: str) -> str:
    """Glob pattern matching every shard file of ``split`` inside a records directory."""
    return f"{split}-*-of-*.tfrecord"


def encode_example(
    exam_id: str,
    patient_id: str,
    volumes: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    labels: Sequence[int],
) -> bytes:
    """Serializes one exam as a ``tf.train.Example``.

    Args:
      exam_id: str. Pseudonymised exam id.
      patient_id: str. Pseudonymised patient id.
      volumes: mapping phase name -> array ``(S, H, W)`` in canonical orientation. All phases
        must share one shape. Stored in ``PHASES`` order.
      spacing: 3 floats, mm along (slice, row, col).
      labels: 4 ints (0/1) in ``LABELS`` order.

    Returns:
      The serialized example.
    """
    import tensorflow as tf  # Deferred: keeps `import tfrecords_tools.schema` cheap.

    phases = [p for p in PHASES if p in volumes]
    unknown = set(volumes) - set(PHASES)
    if unknown or not phases:
        raise ValueError(f"volumes must be keyed by {PHASES}. Received: {sorted(volumes)}")
    shape = np.shape(volumes[phases[0]])
    if len(shape) != 3:
        raise ValueError(f"Each volume must be (S, H, W). Received shape: {shape}")
    for p in phases:
        if np.shape(volumes[p]) != shape:
            raise ValueError(
                f"All phases must share one grid. Received: {phases[0]}={shape}, "
                f"{p}={np.shape(volumes[p])}"
            )
    labels = [int(v) for v in labels]
    if len(labels) != len(LABELS) or any(v not in (0, 1) for v in labels):
        raise ValueError(f"labels must be 4 values in {{0,1}}. Received: {labels}")
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values. Received: {spacing}")

    def _bytes(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    def _int(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    feature = {
        KEY_SCHEMA_VERSION: _int([SCHEMA_VERSION]),
        KEY_EXAM_ID: _bytes([exam_id.encode()]),
        KEY_PATIENT_ID: _bytes([patient_id.encode()]),
        KEY_SHAPE: _int([int(s) for s in shape]),
        KEY_SPACING: tf.train.Feature(
            float_list=tf.train.FloatList(value=[float(s) for s in spacing])
        ),
        KEY_LABELS: _int(labels),
        KEY_PHASES: _bytes([p.encode() for p in phases]),
    }
    for p in phases:
        arr = np.ascontiguousarray(volumes[p], dtype=VOXEL_DTYPE)
        feature[volume_key(p)] = _bytes([arr.tobytes()])
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Deterministic: map entries in key order. Without it the feature order (and so the bytes)
    # changes from one process to the next, and a resumed conversion would not be
    # byte-identical to a clean one.
    return example.SerializeToString(deterministic=True)


def feature_spec(phases: Sequence[str]) -> dict:
    """``tf.io.parse_single_example`` spec for records holding (at least) ``phases``."""
    import tensorflow as tf

    spec = {
        KEY_SCHEMA_VERSION: tf.io.FixedLenFeature([1], tf.int64),
        KEY_EXAM_ID: tf.io.FixedLenFeature([], tf.string),
        KEY_PATIENT_ID: tf.io.FixedLenFeature([], tf.string),
        KEY_SHAPE: tf.io.FixedLenFeature([3], tf.int64),
        KEY_SPACING: tf.io.FixedLenFeature([3], tf.float32),
        KEY_LABELS: tf.io.FixedLenFeature([len(LABELS)], tf.int64),
    }
    for p in phases:
        spec[volume_key(p)] = tf.io.FixedLenFeature([], tf.string)
    return spec


def decode_example(serialized, phases: Sequence[str]) -> dict:
    """Parses one serialized record with TF ops (usable inside tf.data and SavedModels).

    Args:
      serialized: scalar string tensor.
      phases: the phases to decode; each must be stored in the record.

    Returns:
      dict with ``exam_id``, ``patient_id`` (string scalars), ``shape`` (int64[3]),
      ``spacing`` (float32[3]), ``labels`` (int64[4]), ``schema_version`` (int64 scalar) and one
      float32 ``(S, H, W)`` tensor per phase, keyed by phase name.
    """
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, feature_spec(phases))
    shape = tf.cast(parsed[KEY_SHAPE], tf.int32)
    out = {
        KEY_EXAM_ID: parsed[KEY_EXAM_ID],
        KEY_PATIENT_ID: parsed[KEY_PATIENT_ID],
        KEY_SHAPE: parsed[KEY_SHAPE],
        KEY_SPACING: parsed[KEY_SPACING],
        KEY_LABELS: parsed[KEY_LABELS],
        KEY_SCHEMA_VERSION: parsed[KEY_SCHEMA_VERSION][0],
    }
    for p in phases:
        flat = tf.io.decode_raw(parsed[volume_key(p)], tf.float32, little_endian=True)
        out[p] = tf.reshape(flat, shape)
    return out


def decode_example_numpy(serialized: bytes) -> dict:
    """Parses one serialized record into numpy arrays (for inspection and tests).

    Returns:
      dict with ``exam_id``, ``patient_id`` (str), ``schema_version`` (int), ``shape`` (tuple),
      ``spacing`` (float32[3]), ``labels`` (int64[4]), ``phases`` (tuple of str) and one
      float32 ``(S, H, W)`` array per stored phase.
    """
    import tensorflow as tf

    ex = tf.train.Example.FromString(serialized)
    f = ex.features.feature
    version = int(f[KEY_SCHEMA_VERSION].int64_list.value[0])
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"Record schema version {version} is not readable by this code "
            f"(reads version {SCHEMA_VERSION})."
        )
    shape = tuple(int(v) for v in f[KEY_SHAPE].int64_list.value)
    phases = tuple(v.decode() for v in f[KEY_PHASES].bytes_list.value)
    out = {
        KEY_SCHEMA_VERSION: version,
        KEY_EXAM_ID: f[KEY_EXAM_ID].bytes_list.value[0].decode(),
        KEY_PATIENT_ID: f[KEY_PATIENT_ID].bytes_list.value[0].decode(),
        KEY_SHAPE: shape,
        KEY_SPACING: np.asarray(f[KEY_SPACING].float_list.value, np.float32),
        KEY_LABELS: np.asarray(f[KEY_LABELS].int64_list.value, np.int64),
        KEY_PHASES: phases,
    }
    for p in phases:
        raw = f[volume_key(p)].bytes_list.value[0]
        out[p] = np.frombuffer(raw, dtype=VOXEL_DTYPE).reshape(shape).astype(np.float32)
    return out


def read_manifest(records_dir: str) -> dict:
    """Loads ``records_dir/manifest.json`` and checks its schema version.

    Raises:
      FileNotFoundError: no manifest (not a converted records directory).
      ValueError: a schema version this code does not read.
    """
    path = os.path.join(records_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {records_dir!r} is not a directory written by "
            "`python -m tfrecords_tools.convert`."
        )
    with open(path) as f:
        manifest = json.load(f)
    version = manifest.get(KEY_SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: record schema version {version} is not readable by this code "
            f"(reads version {SCHEMA_VERSION}); convert the archive again with this version."
        )
    return manifest
