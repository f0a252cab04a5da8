"""Tiny records and model directories for the evaluation/prediction tests.

The model is untrained (seeded random weights): these tests check plumbing and agreement
between code paths, which needs distinct outputs per exam, not a good model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from tfrecords_tools import schema

TINY_MODEL = dict(width=4, blocks_per_stage=(1, 1, 1, 1), channels_3d=8, stem_kernel=3)


def write_records(out_dir, counts=None, *, size=32, seed=0):
    """Writes one shard per split + manifest.json; patients have 1-2 exams.

    Returns:
      dict split -> list of exams (exam_id, patient_id, labels, volumes).
    """
    import tensorflow as tf

    counts = counts or {"train": 4, "val": 6, "test": 8}
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "phases": list(schema.PHASES),
        "labels": list(schema.LABELS),
        "splits": {},
        "num_failures": 0,
    }
    all_exams = {}
    for split in schema.SPLITS:
        exams = []
        for i in range(counts.get(split, 0)):
            shape = (3 + i % 3, size, size + 4 * (i % 2))
            labels = [int(v) for v in rng.random(4) < 0.5]
            labels[1], labels[3] = i % 2, int(i % 4 == 0)  # both classes in every split
            labels[0] = int(i % 3 == 0)
            base = rng.normal(100, 20, size=shape).astype(np.float32)
            volumes = {
                p: base + k * rng.normal(30, 10, size=shape).astype(np.float32)
                for k, p in enumerate(schema.PHASES)
            }
            exams.append(
                {
                    "exam_id": f"{split}{i:02d}",
                    "patient_id": f"{split}p{i // 2}",
                    "labels": labels,
                    "volumes": volumes,
                    "shape": list(shape),
                }
            )
        name = schema.SHARD_PATTERN.format(split=split, index=0, count=1)
        with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as writer:
            for e in exams:
                writer.write(
                    schema.encode_example(
                        e["exam_id"], e["patient_id"], e["volumes"], (3.0, 1.0, 1.0), e["labels"]
                    )
                )
        manifest["splits"][split] = {
            "shards": [name],
            "num_exams": len(exams),
            "num_patients": len({e["patient_id"] for e in exams}),
            "exams": [
                {k: e[k] for k in ("exam_id", "patient_id", "labels", "shape")} for e in exams
            ],
        }
        all_exams[split] = exams
    with open(os.path.join(out_dir, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    return all_exams


def make_model_dir(model_dir, input_variant="t2-t0", normalization="zscore", seed=0, export=True):
    """A training-run-like MODEL_DIR: best.keras, export/ and config.json."""
    import keras

    from mri_keras import config as config_lib
    from mri_keras import export as export_lib
    from mri_keras import model as model_lib

    keras.utils.set_random_seed(seed)
    model_config = config_lib.ModelConfig(**TINY_MODEL)
    input_config = config_lib.InputConfig(input_variant=input_variant, normalization=normalization)
    model = model_lib.build_model(model_config)
    os.makedirs(model_dir, exist_ok=True)
    model.save(os.path.join(model_dir, "best.keras"))
    if export:
        export_lib.export_model(
            model, os.path.join(model_dir, "export"), input_config, model_config=model_config
        )
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(
            {
                "input": json.loads(json.dumps(dataclasses.asdict(input_config))),
                "model": json.loads(json.dumps(dataclasses.asdict(model_config))),
            },
            f,
        )
    return model
