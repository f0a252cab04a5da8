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
voxel_dtype        bytes[1]   dtype of every ``volume/<phase>``: one of ``VOXEL_DTYPES``
volume/<phase>     bytes[1]   raw voxels of that phase, little-endian, C order ``(S, H, W)``
rescale/<phase>    bytes[1]   16 bytes: float64 little-endian ``(slope, intercept)``
=================  =========  ==============================================================

The voxel value of a phase is ``float32(float64(v) * slope + intercept)`` for each stored
``v`` (``voxel_values``): the DICOM rescale (RescaleSlope/RescaleIntercept), applied at read
time in float64 and rounded once to float32 - exactly what the DICOM reader computes. With
``slope = 1, intercept = 0`` the stored values are the voxel values.

Voxel dtype, chosen by measurement (BENCHMARKS.md, "Voxel dtype"): the converter stores the
scanner's own integers (``int16`` or ``uint16``, whichever holds every stored value of the
exam) with the phase's rescale, so a record is the size of the DICOM pixel data and exact.
``float32`` (already rescaled, identity rescale) is the fallback for exams whose rescale varies
from slice to slice within a phase (some Philips series) or whose stored values are not 16-bit
integers. Rejected: float32 for every exam (twice the bytes to write, store and read: a
4 x 96 x 256 x 256 exam is 100.7 MB instead of 50.3 MB; on the development VM writing it was
the largest cost of conversion after decoding), float16 (overflows at 65504, steps of 2 above
2048, which shows in subtraction images) and integers re-quantised with a per-slice scale
(off by up to 0.02).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 2

# Labels, always in this order (heads, losses, metrics and CSV columns key off this tuple).
LABELS = ("left_benign", "left_malignant", "right_benign", "right_malignant")
# Breast sides in label order (left first).
SIDES = ("left", "right")
# DCE phases: t0 pre-contrast, t1..t3 first/second/third post-contrast.
PHASES = ("t0", "t1", "t2", "t3")
SPLITS = ("train", "val", "test")

# Stored voxel dtypes (little-endian), by name as written in ``voxel_dtype``.
VOXEL_DTYPES = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2"), "uint16": np.dtype("<u2")}
IDENTITY_RESCALE = (1.0, 0.0)

KEY_SCHEMA_VERSION = "schema_version"
KEY_EXAM_ID = "exam_id"
KEY_PATIENT_ID = "patient_id"
KEY_SHAPE = "shape"
KEY_SPACING = "spacing"
KEY_LABELS = "labels"
KEY_PHASES = "phases"
KEY_VOXEL_DTYPE = "voxel_dtype"
VOLUME_KEY_PREFIX = "volume/"
RESCALE_KEY_PREFIX = "rescale/"

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.csv"
SHARD_PATTERN = "{split}-{index:05d}-of-{count:05d}.tfrecord"


def volume_key(phase: str) -> str:
    """Returns the feature key holding the voxels of ``phase``."""
    if phase not in PHASES:
        raise ValueError(f"Unknown phase {phase!r}; expected one of {PHASES}.")
    return VOLUME_KEY_PREFIX + phase


def rescale_key(phase: str) -> str:
    """Returns the feature key holding the ``(slope, intercept)`` of ``phase``."""
    return RESCALE_KEY_PREFIX + volume_key(phase)[len(VOLUME_KEY_PREFIX) :]


def voxel_dtype_name(volumes: Mapping[str, np.ndarray]) -> str:
    """The ``VOXEL_DTYPES`` name the volumes are stored as.

    16-bit integer volumes (either byte order) are stored as they are; anything else
    (float or other integer types) as float32. Raises ValueError when the phases would be
    stored as different dtypes.
    """
    names = set()
    for v in volumes.values():
        dt = np.asarray(v).dtype
        names.add({("i", 2): "int16", ("u", 2): "uint16"}.get((dt.kind, dt.itemsize), "float32"))
    if len(names) != 1:
        raise ValueError(f"All phases must share one voxel dtype. Received: {sorted(names)}")
    return names.pop()


def rescale_bytes(slope: float, intercept: float) -> bytes:
    """The 16-byte ``rescale/<phase>`` value."""
    return np.asarray([slope, intercept], "<f8").tobytes()


def voxel_values(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored voxels -> float32 voxel values, as every reader of the records computes them."""
    if slope == 1.0 and intercept == 0.0:
        return np.asarray(stored).astype(np.float32)
    return (np.asarray(stored, np.float64) * np.float64(slope) + np.float64(intercept)).astype(
        np.float32
    )


def checked_rescale(phases, rescale) -> dict:
    """``rescale`` completed with ``IDENTITY_RESCALE`` and checked (for the encoders)."""
    rescale = dict(rescale or {})
    unknown = set(rescale) - set(phases)
    if unknown:
        raise ValueError(f"rescale given for phases not stored: {sorted(unknown)}")
    out = {}
    for p in phases:
        slope, intercept = (float(v) for v in rescale.get(p, IDENTITY_RESCALE))
        if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0.0:
            raise ValueError(
                f"rescale of {p} must be finite with a non-zero slope. "
                f"Received: {(slope, intercept)}"
            )
        out[p] = (slope, intercept)
    return out


def encode_example(
    exam_id: str,
    patient_id: str,
    volumes: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    labels: Sequence[int],
    rescale: Mapping[str, Sequence[float]] | None = None,
) -> bytes:
    """Serializes one exam as a ``tf.train.Example``.

    Args:
      exam_id: str. Pseudonymised exam id.
      patient_id: str. Pseudonymised patient id.
      volumes: mapping phase name -> array ``(S, H, W)`` in canonical orientation, all of one
        dtype in ``VOXEL_DTYPES`` (stored as is) and one shape. Stored in ``PHASES`` order.
      spacing: 3 floats, mm along (slice, row, col).
      labels: 4 ints (0/1) in ``LABELS`` order.
      rescale: optional mapping phase -> ``(slope, intercept)`` turning stored values into
        voxel values (see ``voxel_values``); phases not given get ``IDENTITY_RESCALE``.

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
    dtype_name = voxel_dtype_name({p: volumes[p] for p in phases})
    rescale = checked_rescale(phases, rescale)

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
        KEY_VOXEL_DTYPE: _bytes([dtype_name.encode()]),
    }
    for p in phases:
        arr = np.ascontiguousarray(volumes[p], dtype=VOXEL_DTYPES[dtype_name])
        feature[volume_key(p)] = _bytes([arr.tobytes()])
        feature[rescale_key(p)] = _bytes([rescale_bytes(*rescale[p])])
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
        KEY_VOXEL_DTYPE: tf.io.FixedLenFeature([], tf.string),
    }
    for p in phases:
        spec[volume_key(p)] = tf.io.FixedLenFeature([], tf.string)
        spec[rescale_key(p)] = tf.io.FixedLenFeature([], tf.string)
    return spec


def _voxel_dtype_index(dtype_name):
    """Position of a record's ``voxel_dtype`` string in ``VOXEL_DTYPES`` (a graph assertion
    names the value when it is none of them)."""
    import tensorflow as tf

    names = list(VOXEL_DTYPES)
    index = tf.reduce_max(
        tf.where(tf.equal(dtype_name, tf.constant(names)), tf.range(len(names)), -1)
    )
    checked = tf.debugging.Assert(
        index >= 0, ["Record voxel_dtype is not one of", names, "Received:", dtype_name]
    )
    with tf.control_dependencies([checked]):
        return tf.identity(index)


def decode_volume(raw, dtype_name, rescale, shape):
    """One phase's stored bytes -> float32 ``(S, H, W)`` voxel values, with TF ops.

    Args:
      raw: string scalar tensor, the ``volume/<phase>`` bytes.
      dtype_name: string scalar tensor, the record's ``voxel_dtype``.
      rescale: string scalar tensor, the ``rescale/<phase>`` bytes.
      shape: int32[3] tensor.

    Returns:
      float32 ``(S, H, W)``: ``float32(float64(v) * slope + intercept)``, as ``voxel_values``.
    """
    import tensorflow as tf

    def as_float(tf_dtype):
        return lambda: tf.cast(tf.io.decode_raw(raw, tf_dtype, little_endian=True), tf.float32)

    names = list(VOXEL_DTYPES)
    index = _voxel_dtype_index(dtype_name)
    flat = tf.switch_case(index, [as_float(tf.as_dtype(VOXEL_DTYPES[n])) for n in names])
    slope_intercept = tf.io.decode_raw(rescale, tf.float64, little_endian=True)
    slope, intercept = slope_intercept[0], slope_intercept[1]
    identity = tf.logical_and(tf.equal(slope, 1.0), tf.equal(intercept, 0.0))
    branch = tf.where(identity, 0, tf.where(_float32_exact(slope, intercept), 1, 2))
    values = tf.switch_case(
        branch,
        [
            lambda: flat,
            lambda: flat * tf.cast(slope, tf.float32) + tf.cast(intercept, tf.float32),
            lambda: tf.cast(tf.cast(flat, tf.float64) * slope + intercept, tf.float32),
        ],
    )
    return tf.reshape(values, shape)


def decode_stored(raw, dtype_name, rescale, shape):
    """One phase's stored bytes, left as stored, for rescaling elsewhere (e.g. on a GPU).

    No arithmetic on the voxels: 16-bit records give their bytes as int16 (uint16 bitcast, a
    flag says so), float32 records as float32. ``mri_keras.preprocessing`` turns the result
    into voxel values in float32: ``(v + 65536 * (unsigned and v < 0)) * slope + intercept``.

    Args:
      raw, dtype_name, rescale: string scalar tensors, as for ``decode_volume``.
      shape: int32[3] tensor ``(S, H, W)``.

    Returns:
      ``(int16 (S, H, W), float32 (0, H, W), rescale)`` for a 16-bit record, ``(int16 (0, H,
      W), float32 (S, H, W), rescale)`` for a float32 one (the empty one costs nothing and
      concatenating the two along slices gives the stored values whatever the dtype);
      ``rescale`` is float32 ``(3,)``: slope, intercept, 1.0 if stored as uint16 else 0.0.
    """
    import tensorflow as tf

    names = list(VOXEL_DTYPES)
    index = _voxel_dtype_index(dtype_name)
    empty_shape = tf.concat([[0], shape[1:]], 0)
    is_float = tf.equal(index, names.index("float32"))

    def as_int16():
        values = tf.io.decode_raw(raw, tf.int16, little_endian=True)
        return tf.reshape(values, shape), tf.zeros(empty_shape, tf.float32)

    def as_float32():
        values = tf.io.decode_raw(raw, tf.float32, little_endian=True)
        return tf.zeros(empty_shape, tf.int16), tf.reshape(values, shape)

    ints, floats = tf.cond(is_float, as_float32, as_int16)
    slope_intercept = tf.cast(tf.io.decode_raw(rescale, tf.float64, little_endian=True), tf.float32)
    unsigned = tf.cast(tf.equal(index, names.index("uint16")), tf.float32)
    return ints, floats, tf.concat([slope_intercept, [unsigned]], 0)


def _float32_exact(slope, intercept):
    """True where float32 arithmetic gives ``voxel_values``' float64 result for 16-bit values.

    With at most 8 significant bits in ``slope`` (2^-28 <= |slope| < 2^28) every ``v * slope``
    of a 16-bit ``v`` is exact in float32, and with an integer ``intercept`` (|intercept| <
    2^24) the sum is exact in float64, so both paths round the same exact value once. Typical
    rescales (1, 0.5, 1.6875; intercepts 0, -1024) qualify; arbitrary decimal slopes do not
    and take the float64 path.
    """
    import tensorflow as tf

    bits = tf.bitcast(slope, tf.int64)
    few_bits = tf.equal(tf.bitwise.bitwise_and(bits, tf.constant((1 << 45) - 1, tf.int64)), 0)
    magnitude = tf.abs(slope)
    in_range = tf.logical_and(magnitude >= 2.0**-28, magnitude < 2.0**28)
    integer = tf.logical_and(tf.equal(intercept, tf.round(intercept)), tf.abs(intercept) < 2.0**24)
    return tf.logical_and(tf.logical_and(few_bits, in_range), integer)


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
        out[p] = decode_volume(
            parsed[volume_key(p)], parsed[KEY_VOXEL_DTYPE], parsed[rescale_key(p)], shape
        )
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
        KEY_VOXEL_DTYPE: f[KEY_VOXEL_DTYPE].bytes_list.value[0].decode(),
    }
    dtype = VOXEL_DTYPES[out[KEY_VOXEL_DTYPE]]
    for p in phases:
        raw = f[volume_key(p)].bytes_list.value[0]
        slope, intercept = np.frombuffer(f[rescale_key(p)].bytes_list.value[0], "<f8")
        out[p] = voxel_values(np.frombuffer(raw, dtype=dtype).reshape(shape), slope, intercept)
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
