"""The per-breast ``predictions.csv`` shared by evaluate, ensemble and the experiment scripts.

One row per breast, left before right for every exam, exams in the order they were scored::

    exam_id,patient_id,side,benign_prob,malignant_prob,benign_label,malignant_label
    3f9c...,a81e...,left,0.0132,0.9410,0,1
    3f9c...,a81e...,right,0.0211,0.0075,0,0

``exam_id`` and ``patient_id`` are the converter's pseudonyms (never DICOM identifiers).
In memory the same data is a `Predictions`: arrays ``(N, 4)`` in ``constants.LABELS`` order,
the layout `mri_keras.metrics` works on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import numpy as np

from mri_keras import constants
from tfrecords_tools import fileio

COLUMNS = (
    "exam_id",
    "patient_id",
    "side",
    "benign_prob",
    "malignant_prob",
    "benign_label",
    "malignant_label",
)
FILENAME = "predictions.csv"


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Exam-level predictions of one model (or ensemble) on one split.

    Attributes:
      exam_ids: tuple of str (N,). Exam pseudonyms.
      patient_ids: tuple of str (N,). Patient pseudonyms.
      labels: int64 array (N, 4) in LABELS order.
      probs: float64 array (N, 4) of probabilities in LABELS order.
    """

    exam_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    labels: np.ndarray
    probs: np.ndarray

    def __post_init__(self):
        n = len(self.exam_ids)
        labels = np.asarray(self.labels, np.int64).reshape(-1, len(constants.LABELS))
        probs = np.asarray(self.probs, np.float64).reshape(-1, len(constants.LABELS))
        if len(self.patient_ids) != n or labels.shape[0] != n or probs.shape[0] != n:
            raise ValueError(
                "exam_ids, patient_ids, labels and probs must describe the same exams. Received "
                f"{n} exam ids, {len(self.patient_ids)} patient ids, labels {labels.shape}, "
                f"probs {probs.shape}"
            )
        if len(set(self.exam_ids)) != n:
            raise ValueError("exam_ids must be unique.")
        object.__setattr__(self, "exam_ids", tuple(str(e) for e in self.exam_ids))
        object.__setattr__(self, "patient_ids", tuple(str(p) for p in self.patient_ids))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "probs", probs)

    def __len__(self) -> int:
        return len(self.exam_ids)

    def reindex(self, exam_ids) -> Predictions:
        """Returns these predictions in the order of ``exam_ids`` (each must be present)."""
        position = {e: i for i, e in enumerate(self.exam_ids)}
        missing = [e for e in exam_ids if e not in position]
        if missing:
            raise KeyError(f"{len(missing)} exam(s) have no prediction, e.g. {missing[:3]}")
        order = np.asarray([position[e] for e in exam_ids], np.int64)
        return Predictions(
            exam_ids=tuple(exam_ids),
            patient_ids=tuple(self.patient_ids[i] for i in order),
            labels=self.labels[order],
            probs=self.probs[order],
        )


def _column(side: str, task: str) -> int:
    return constants.LABELS.index(f"{side}_{task}")


def write_predictions(path: str, predictions: Predictions) -> None:
    """Writes ``predictions`` as a per-breast CSV (see module docstring)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    ids = zip(predictions.exam_ids, predictions.patient_ids)
    for i, (exam_id, patient_id) in enumerate(ids):
        for side in constants.SIDES:
            b, m = _column(side, "benign"), _column(side, "malignant")
            writer.writerow(
                [
                    exam_id,
                    patient_id,
                    side,
                    f"{predictions.probs[i, b]:.9g}",
                    f"{predictions.probs[i, m]:.9g}",
                    int(predictions.labels[i, b]),
                    int(predictions.labels[i, m]),
                ]
            )
    fileio.atomic_write_text(path, buf.getvalue())


def read_predictions(path: str) -> Predictions:
    """Reads a per-breast predictions CSV written by `write_predictions`.

    Args:
      path: str. A ``predictions.csv`` file, or a directory holding one.

    Raises:
      FileNotFoundError: no such file.
      ValueError: missing columns, a malformed row, or an exam without exactly one left and
        one right row; the message names the file and row.
    """
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (expected a predictions.csv from evaluate).")
    rows = {}
    order = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected {COLUMNS}")
        for line, row in enumerate(reader, start=2):
            exam_id, side = row["exam_id"], row["side"]
            if side not in constants.SIDES:
                raise ValueError(f"{path} line {line}: side must be left or right, got {side!r}")
            try:
                values = {
                    "benign_prob": float(row["benign_prob"]),
                    "malignant_prob": float(row["malignant_prob"]),
                    "benign_label": int(row["benign_label"]),
                    "malignant_label": int(row["malignant_label"]),
                }
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path} line {line}: malformed value ({e})") from None
            for key in ("benign_label", "malignant_label"):
                if values[key] not in (0, 1):
                    raise ValueError(f"{path} line {line}: {key} must be 0 or 1")
            for key in ("benign_prob", "malignant_prob"):
                if not 0.0 <= values[key] <= 1.0:
                    raise ValueError(f"{path} line {line}: {key} must be in [0, 1]")
            if exam_id not in rows:
                rows[exam_id] = {"patient_id": row["patient_id"], "sides": {}}
                order.append(exam_id)
            exam = rows[exam_id]
            if exam["patient_id"] != row["patient_id"]:
                raise ValueError(f"{path} line {line}: exam {exam_id} has two patient ids")
            if side in exam["sides"]:
                raise ValueError(f"{path} line {line}: exam {exam_id} has two {side} rows")
            exam["sides"][side] = values
    labels = np.zeros((len(order), len(constants.LABELS)), np.int64)
    probs = np.zeros((len(order), len(constants.LABELS)), np.float64)
    for i, exam_id in enumerate(order):
        sides = rows[exam_id]["sides"]
        if set(sides) != set(constants.SIDES):
            lacking = sorted(set(constants.SIDES) - set(sides))
            raise ValueError(f"{path}: exam {exam_id} lacks a row for side(s) {lacking}")
        for side in constants.SIDES:
            for task in constants.TASKS:
                labels[i, _column(side, task)] = sides[side][f"{task}_label"]
                probs[i, _column(side, task)] = sides[side][f"{task}_prob"]
    return Predictions(
        exam_ids=tuple(order),
        patient_ids=tuple(rows[e]["patient_id"] for e in order),
        labels=labels,
        probs=probs,
    )
