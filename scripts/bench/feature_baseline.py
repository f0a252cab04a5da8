"""A hand-made enhancement feature as a reference for the network on the synthetic cohort.

Per breast: the maximum over the exam of a 5 x 5 in-plane box filter of t2 - t0 (rescaled
voxel values), taken on that side of the image (columns are patient right -> left, LPS) and in
front of the chest wall (the anterior ``--anterior`` share of the rows; the synthetic chest wall
lies at 42-52% of the rows at the midline). No training: the score is the feature itself, so
its breast-level AUC is what "the enhancing lesion is the brightest thing in front of the
chest wall" alone is worth. A network that has learned the task should come close to it.

  python scripts/bench/feature_baseline.py --data_dir=RECORDS --splits=val,test

Prints one JSON line per split: breast-level malignant and benign AUC of the feature with
patient-bootstrap 95% CIs (the evaluation's own `metrics.auc_with_ci`).
"""

import json
import sys

import numpy as np
from absl import app, flags
from scipy import ndimage

from mri_keras import metrics as metrics_lib
from tfrecords_tools.records import Records

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Records directory.", required=True)
flags.DEFINE_list("splits", ["val", "test"], "Splits to score.")
flags.DEFINE_float("anterior", 0.40, "Share of the rows (from the front) that is searched.")
flags.DEFINE_integer("box", 5, "In-plane box filter size in voxels.")
flags.DEFINE_integer("n_bootstrap", 2000, "Patient-bootstrap resamples for the CIs.")


def side_scores(t0: np.ndarray, t2: np.ndarray, anterior: float, box: int):
    """(right, left) feature values of one exam; arrays are (S, H, W) rescaled voxels."""
    sub = ndimage.uniform_filter(t2 - t0, size=(1, box, box), mode="nearest")
    rows = max(1, int(round(sub.shape[1] * anterior)))
    front = sub[:, :rows, :]
    half = sub.shape[2] // 2
    return float(front[:, :, :half].max()), float(front[:, :, half:].max())


def score_split(data_dir: str, split: str, anterior: float, box: int):
    """Per exam: labels (N, 4), feature scores (N, 4) in the labels' order, patient ids."""
    labels, scores, patients = [], [], []
    for _, exam in Records.open(data_dir).iter_numpy((split,)):
        right, left = side_scores(exam["t0"], exam["t2"], anterior, box)
        # LABELS order: left_benign, left_malignant, right_benign, right_malignant.
        scores.append([left, left, right, right])
        labels.append([int(v) for v in exam["labels"]])
        patients.append(exam["patient_id"])
    return np.asarray(labels), np.asarray(scores), np.asarray(patients)


def main(argv):
    del argv
    for split in FLAGS.splits:
        labels, scores, patients = score_split(FLAGS.data_dir, split, FLAGS.anterior, FLAGS.box)
        line = {
            "bench": "feature_baseline",
            "split": split,
            "exams": int(len(labels)),
            "anterior": FLAGS.anterior,
            "box": FLAGS.box,
        }
        for task in ("malignant", "benign"):
            result = metrics_lib.auc_with_ci(
                labels, scores, patients, task=task, n_bootstrap=FLAGS.n_bootstrap, seed=0
            )
            line[f"{task}_auc"] = round(result["auc"], 4)
            line[f"{task}_ci"] = [round(result["ci_low"], 4), round(result["ci_high"], 4)]
            line[f"{task}_positive_breasts"] = result["positives"]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(app.run(main))
