"""Tiny records directories for the training tests, written with the record schema directly.

Each exam's post-contrast phases get a bright blob in a malignant breast (col > W/2 is the
patient's left), so a model can learn something; shapes vary between exams so replicas see
different shapes.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tfrecords_tools import schema

TINY_FLAGS = (
    "--width=4",
    "--blocks=1,1,1,1",
    "--channels_3d=8",
    "--stem_kernel=3",
    "--learning_rate=1e-3",
    "--shuffle_buffer=4",
)


def exam_volumes(rng, shape, labels, phases=schema.PHASES):
    s, h, w = shape
    base = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
    volumes = {}
    for i, phase in enumerate(phases):
        v = base + rng.normal(0.0, 2.0, size=shape).astype(np.float32)
        if phase != "t0":
            for side_index, cols in ((1, slice(w // 2, w)), (3, slice(0, w // 2))):
                if labels[side_index]:  # left_malignant: patient left = high cols.
                    v[s // 3 : s // 3 + 2, h // 3 : h // 3 + 6, cols][..., 3:9] += 60.0 * i
        volumes[phase] = v
    return volumes


def write_records(
    out_dir,
    counts=None,
    *,
    slices=(4, 6),
    size=32,
    phases=schema.PHASES,
    seed=0,
    schema_version=schema.SCHEMA_VERSION,
    shards_per_split=1,
):
    """Writes ``{split}-*.tfrecord`` + manifest.json (interface 3) into ``out_dir``.

    Args:
      counts: dict split -> number of exams (one patient per exam, except train where every
        second patient has two exams). Defaults to train 6, val 4, test 2.
      slices: slice counts cycled through exams.

    Returns:
      The manifest dict.
    """
    import tensorflow as tf

    counts = counts or {"train": 6, "val": 4, "test": 2}
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    manifest = {
        "schema_version": schema_version,
        "phases": list(phases),
        "labels": list(schema.LABELS),
        "splits": {},
        "num_failures": 0,
        "flags": {"synthetic": "tests/train_fixtures.py"},
    }
    index = 0
    for split in schema.SPLITS:
        n = counts.get(split, 0)
        exams = []
        for i in range(n):
            shape = (slices[index % len(slices)], size, size + 2 * (index % 2))
            # Alternate malignant on left/right/none so every split has both classes.
            labels = [0, 0, 0, 0]
            labels[(1, 3, 0, 2)[i % 4]] = 1
            patient = f"{split}-p{i // 2 if split == 'train' else i}"
            exams.append(
                {
                    "exam_id": f"{split}-e{i}",
                    "patient_id": patient,
                    "labels": labels,
                    "shape": list(shape),
                    "volumes": exam_volumes(rng, shape, labels, phases),
                }
            )
            index += 1
        shard_names = []
        for k in range(shards_per_split if n else 0):
            name = schema.SHARD_PATTERN.format(split=split, index=k, count=shards_per_split)
            shard_names.append(name)
            with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as writer:
                for e in exams[k::shards_per_split]:
                    raw = schema.encode_example(
                        e["exam_id"], e["patient_id"], e["volumes"], (3.0, 1.0, 1.0), e["labels"]
                    )
                    if schema_version != schema.SCHEMA_VERSION:
                        ex = tf.train.Example.FromString(raw)
                        ex.features.feature[schema.KEY_SCHEMA_VERSION].int64_list.value[:] = [
                            schema_version
                        ]
                        raw = ex.SerializeToString()
                    writer.write(raw)
        manifest["splits"][split] = {
            "shards": shard_names,
            "num_exams": n,
            "num_patients": len({e["patient_id"] for e in exams}),
            "exams": [
                {k: e[k] for k in ("exam_id", "patient_id", "labels", "shape")} for e in exams
            ],
            "label_counts": {
                label: sum(e["labels"][j] for e in exams) for j, label in enumerate(schema.LABELS)
            },
        }
    with open(os.path.join(out_dir, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def edit_manifest(directory, edit) -> None:
    """Applies ``edit(manifest dict)`` to ``directory/manifest.json`` in place (tests of bad
    records directories)."""
    path = os.path.join(directory, schema.MANIFEST_NAME)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)
