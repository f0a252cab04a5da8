"""Writes ``schema.encode_example``'s exact bytes without its three copies of the voxels.

``schema.encode_example`` builds a ``tf.train.Example`` (copying each volume into ``bytes``,
again into the protobuf, and once more when serializing). For a 4 x 96 x 256 x 256 exam that
is 300 MB of copies, which costs more than decoding the DICOM files. Here the protobuf wire
format of the same message is written directly: small headers around zero-copy views of the
voxel arrays, joined once.

``schema`` stays the single definition of the record: ``encode_record`` checks once per
process, on a small example covering every feature type, that its bytes equal
``schema.encode_example``'s (deterministic serialization), and falls back to
``schema.encode_example`` if they ever differ (for instance after a schema change).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from tfrecords_tools import schema


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload_len: int) -> bytes:
    """Tag and length of a length-delimited field (the payload follows)."""
    return _varint((field << 3) | 2) + _varint(payload_len)


def _bytes_feature(values: Sequence) -> tuple:
    """Feature{bytes_list{value...}} as (parts, length)."""
    parts, inner = [], 0
    for v in values:
        head = _len_field(1, len(v))
        parts += [head, v]
        inner += len(head) + len(v)
    head = _len_field(1, inner)  # Feature.bytes_list = 1
    return [head] + parts, len(head) + inner


def _packed_feature(field: int, payload: bytes) -> tuple:
    body = _len_field(1, len(payload)) + payload if payload else b""
    head = _len_field(field, len(body))
    return [head, body], len(head) + len(body)


def _float_feature(values: Sequence[float]) -> tuple:
    return _packed_feature(2, struct.pack(f"<{len(values)}f", *values))  # float_list = 2


def _int64_feature(values: Sequence[int]) -> tuple:
    payload = b"".join(_varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values)
    return _packed_feature(3, payload)  # int64_list = 3


def encode_parts(
    exam_id: str,
    patient_id: str,
    volumes: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    labels: Sequence[int],
    rescale: Mapping[str, Sequence[float]] | None = None,
) -> list:
    """The serialized example as a list of buffers (voxels as zero-copy views).

    Same arguments and checks as ``schema.encode_example``.
    """
    phases = [p for p in schema.PHASES if p in volumes]
    unknown = set(volumes) - set(schema.PHASES)
    if unknown or not phases:
        raise ValueError(f"volumes must be keyed by {schema.PHASES}. Received: {sorted(volumes)}")
    shape = np.shape(volumes[phases[0]])
    if len(shape) != 3 or any(np.shape(volumes[p]) != shape for p in phases):
        raise ValueError(
            f"All phases must share one (S, H, W) grid. Received: "
            f"{ {p: np.shape(volumes[p]) for p in phases} }"
        )
    labels = [int(v) for v in labels]
    if len(labels) != len(schema.LABELS) or any(v not in (0, 1) for v in labels):
        raise ValueError(f"labels must be 4 values in {{0,1}}. Received: {labels}")
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values. Received: {spacing}")
    dtype_name = schema.voxel_dtype_name({p: volumes[p] for p in phases})
    rescale = schema.checked_rescale(phases, rescale)

    features = {
        schema.KEY_SCHEMA_VERSION: _int64_feature([schema.SCHEMA_VERSION]),
        schema.KEY_EXAM_ID: _bytes_feature([exam_id.encode()]),
        schema.KEY_PATIENT_ID: _bytes_feature([patient_id.encode()]),
        schema.KEY_SHAPE: _int64_feature([int(s) for s in shape]),
        schema.KEY_SPACING: _float_feature([float(s) for s in spacing]),
        schema.KEY_LABELS: _int64_feature(labels),
        schema.KEY_PHASES: _bytes_feature([p.encode() for p in phases]),
        schema.KEY_VOXEL_DTYPE: _bytes_feature([dtype_name.encode()]),
    }
    for p in phases:
        arr = np.ascontiguousarray(volumes[p], dtype=schema.VOXEL_DTYPES[dtype_name])
        features[schema.volume_key(p)] = _bytes_feature([memoryview(arr).cast("B")])
        features[schema.rescale_key(p)] = _bytes_feature([schema.rescale_bytes(*rescale[p])])

    entries, total = [], 0
    for key in sorted(features, key=lambda k: k.encode()):  # Deterministic: map keys sorted.
        feat_parts, feat_len = features[key]
        k = key.encode()
        key_field = _len_field(1, len(k)) + k
        value_head = _len_field(2, feat_len)
        entry_len = len(key_field) + len(value_head) + feat_len
        entry_head = _len_field(1, entry_len)  # Features.feature (map entry) = 1
        entries += [entry_head, key_field, value_head] + feat_parts
        total += len(entry_head) + entry_len
    return [_len_field(1, total)] + entries  # Example.features = 1


@functools.cache
def matches_schema() -> bool:
    """True when ``encode_parts`` gives exactly ``schema.encode_example``'s bytes."""
    rng = np.random.default_rng(0)
    for phases, dtype, rescale in (
        (schema.PHASES, np.float32, None),
        (schema.PHASES[:1], np.float32, None),
        (schema.PHASES, np.int16, {"t0": (0.75, -16.0), "t2": (2.0, 0.0)}),
        (schema.PHASES[:2], np.uint16, {"t1": (1.5, 8.0)}),
    ):
        volumes = {p: (rng.normal(size=(2, 3, 5)) * 1e3).astype(dtype) for p in phases}
        args = ("E0123abc", "P9876fed", volumes, (3.0, 0.7, 0.6875), (0, 1, 1, 0), rescale)
        if b"".join(encode_parts(*args)) != schema.encode_example(*args):
            return False
    return True


def encode_record(
    exam_id: str,
    patient_id: str,
    volumes: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    labels: Sequence[int],
    rescale: Mapping[str, Sequence[float]] | None = None,
) -> bytes:
    """``schema.encode_example(...)``, byte for byte, with one copy of the voxels."""
    if not matches_schema():
        return schema.encode_example(exam_id, patient_id, volumes, spacing, labels, rescale)
    return b"".join(encode_parts(exam_id, patient_id, volumes, spacing, labels, rescale))
