"""Left-right flip test-time averaging, measured: breast-level AUCs of a trained model on a split
with and without it (a probe for issue 13's recipe choice; `evaluate --tta` is issue 16).

For each ``MODEL_DIR:RECORDS:SPLIT`` argument the model's best.keras scores every exam as
training validates it (``input_pipeline.make_dataset``, unaugmented) and once more with the
volume mirrored left-right, whose four probabilities are then swapped back between the sides
(the left breast of the mirrored exam is the right breast of the exam). The averaged
probabilities are what a flip TTA reports. Prints one JSON line per argument: the malignant
breast-level AUC without and with the averaging (95% patient-bootstrap CIs) and of the
mirrored pass alone.

Usage::

    python scripts/bench/tta_probe.py RUN_A:RECORDS:val RUN_B:RECORDS:val [--n_bootstrap=2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mri_keras import constants  # noqa: E402

# Column of each label in the mirrored exam's output: left_x <-> right_x.
SWAP = [
    constants.LABELS.index(name.replace("left", "?").replace("right", "left").replace("?", "right"))
    for name in constants.LABELS
]


def swap_sides(probs: np.ndarray) -> np.ndarray:
    """(N, 4) probabilities of mirrored exams -> the same breasts in the exams' own sides."""
    return np.asarray(probs)[:, SWAP]


def flip_average(probs: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """The flip TTA: the mean of an exam's and its mirror's probabilities, side by side."""
    return (np.asarray(probs) + swap_sides(mirrored)) / 2.0


def score(model_dir: str, records: str, split: str):
    """(labels, patient ids, probabilities, mirrored-exam probabilities) of a split."""
    import tensorflow as tf

    from mri_keras import inference, input_pipeline

    predictor = inference.load_predictor(model_dir, "keras")
    model = predictor.keras_model
    heads = constants.LABELS

    @tf.function(reduce_retracing=True)
    def probs_of(volume):
        out = model(volume, training=False)
        return tf.stack([out[k][:, 1] for k in heads], -1)

    dataset = input_pipeline.make_dataset(
        records, split, predictor.input_config, training=False, with_ids=True
    )
    labels, patients, plain, mirrored = [], [], [], []
    for volume, targets, meta in dataset:
        labels.append(np.stack([targets[k][:, 1].numpy() for k in heads], -1).round())
        patients.extend(v.decode() for v in meta["patient_id"].numpy())
        plain.append(probs_of(volume).numpy())
        mirrored.append(probs_of(tf.reverse(volume, axis=[3])).numpy())  # Axis 3: columns.
    return (
        np.concatenate(labels).astype(np.int64),
        patients,
        np.concatenate(plain),
        np.concatenate(mirrored),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="MODEL_DIR:RECORDS:SPLIT")
    parser.add_argument("--n_bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    from mri_keras import metrics

    for run in args.runs:
        model_dir, records, split = run.rsplit(":", 2)
        labels, patients, plain, mirrored = score(model_dir, records, split)

        def auc(probs):
            r = metrics.auc_with_ci(labels, probs, patients, n_bootstrap=args.n_bootstrap)
            return [round(r[k], 4) for k in ("auc", "ci_low", "ci_high")]

        line = {
            "bench": "tta_probe",
            "model": model_dir,
            "split": split,
            "exams": len(patients),
            "malignant_auc": auc(plain),
            "flip_tta_malignant_auc": auc(flip_average(plain, mirrored)),
            "mirrored_only_malignant_auc": auc(swap_sides(mirrored)),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
