"""Breast-level and exam-level AUCs, pooled exactly as in the paper.

Breast level: both breasts of every exam are scored independently and pooled into one AUC
(2 scores per exam). Arrays are ``(num_exams, 4)`` in ``constants.LABELS`` order.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as sk_metrics

from mri_keras import constants


def _columns(task: str):
    if task not in constants.TASKS:
        raise ValueError(f"task must be one of {constants.TASKS}. Received: task={task!r}")
    return [constants.LABELS.index(f"{side}_{task}") for side in constants.SIDES]


def breast_level_arrays(labels, probs, task: str):
    """Pools left and right breasts: returns ``(y_true, y_score)`` of length 2 x num_exams.

    Args:
      labels: array-like (N, 4) of 0/1 in LABELS order.
      probs: array-like (N, 4) of probabilities in LABELS order.
      task: str. "malignant" or "benign".
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 2 or labels.shape[1] != len(constants.LABELS):
        raise ValueError(
            f"labels and probs must both be (N, 4). Received: {labels.shape}, {probs.shape}"
        )
    cols = _columns(task)
    # Order: all left breasts, then all right breasts.
    return labels[:, cols].T.reshape(-1), probs[:, cols].T.reshape(-1)


def breast_level_auc(labels, probs, task: str = "malignant") -> float:
    """Breast-level AUC (paper's pooling); NaN when only one class is present."""
    y, s = breast_level_arrays(labels, probs, task)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(sk_metrics.roc_auc_score(y, s))


def exam_level_auc(labels, probs, task: str = "malignant") -> float:
    """Exam-level AUC: an exam is positive if either breast is; its score is the max of both."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    cols = _columns(task)
    y = labels[:, cols].max(axis=1)
    s = probs[:, cols].max(axis=1)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(sk_metrics.roc_auc_score(y, s))
