"""Calibration of the breast-level probabilities: how far to trust "p = 0.8".

- `calibration_summary`: per task (malignant, benign), breast level, the expected
  calibration error (ECE) over equal-width bins (10 by default; the bins are stated in the
  output) and the Brier score (``sklearn.metrics.brier_score_loss``).
- `plot_reliability`: a reliability diagram of both tasks (``sklearn.calibration``'s
  ``calibration_curve``), with the breasts per bin as a histogram below.
- Temperature scaling (Guo et al. 2017), one temperature per task. Every head of the model is
  a 2-class softmax, so its positive probability is ``p = sigmoid(z1 - z0)``: dividing both
  logits by T is exactly ``p' = sigmoid(logit(p) / T)``, which needs only ``p``. T is fitted on
  validation by minimising the negative log-likelihood over the pooled left and right breasts
  of that task; both sides' heads share it. T > 1 softens over-confident outputs; the ranking,
  and so every AUC, is unchanged.

``calibration.json`` (written beside ``best.keras`` by ``evaluate --calibrate``)::

    {"schema_version": 1, "method": "temperature_scaling", "labels": [...LABELS...],
     "fitted_on": {"split": "val", "n_breasts": 192, "n_exams": 96},
     "temperature": {"malignant": 1.7, "benign": 1.2},
     "nll": {"malignant": {"before": 0.41, "after": 0.33}, "benign": {...}},
     "probability_clip": 1e-07}
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from mri_keras import constants
from mri_keras import metrics as metrics_lib

SCHEMA_VERSION = 1
FILENAME = "calibration.json"
RELIABILITY_FILENAME = "reliability.png"
DEFAULT_BINS = 10
# Probabilities are clipped to [EPS, 1 - EPS] before the logit: a float32 softmax saturates
# to exactly 0 or 1, whose logit is infinite (about float32's resolution near 1).
PROBABILITY_CLIP = 1e-7
_T_BOUNDS = (1e-2, 1e2)


def expected_calibration_error(y_true, y_prob, n_bins: int = DEFAULT_BINS) -> float:
    """ECE over equal-width bins of [0, 1]: sum over bins of (share of samples) x |mean
    predicted probability - observed positive rate|.

    A probability on an inner bin edge goes to the lower bin, as in
    ``sklearn.calibration.calibration_curve(strategy="uniform")``; empty bins count 0.
    """
    y = np.asarray(y_true, np.float64).reshape(-1)
    p = np.asarray(y_prob, np.float64).reshape(-1)
    if y.size == 0:
        return float("nan")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1. Received: n_bins={n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.searchsorted(edges[1:-1], p)  # the binning of calibration_curve
    sum_p = np.bincount(bin_of, weights=p, minlength=n_bins)
    sum_y = np.bincount(bin_of, weights=y, minlength=n_bins)
    return float(np.sum(np.abs(sum_p - sum_y)) / y.size)


def calibration_summary(labels, probs, n_bins: int = DEFAULT_BINS) -> dict:
    """Breast-level ECE and Brier score of both tasks.

    Args:
      labels: array-like (N, 4) in LABELS order.
      probs: array-like (N, 4) in LABELS order.
      n_bins: int. Equal-width bins for the ECE. Defaults to 10.

    Returns:
      dict ``{task: {ece, brier, mean_probability, observed_rate, n_breasts}}`` plus
      ``bins`` (``{"n_bins", "strategy": "uniform", "edges"}``) and ``level``.
    """
    from sklearn import metrics as sk

    out = {}
    for task in ("malignant", "benign"):
        y, p = metrics_lib.breast_level_arrays(labels, probs, task)
        out[task] = {
            "ece": expected_calibration_error(y, p, n_bins),
            "brier": float(sk.brier_score_loss(y, p, pos_label=1)) if y.size else float("nan"),
            "mean_probability": float(p.mean()) if p.size else float("nan"),
            "observed_rate": float(y.mean()) if y.size else float("nan"),
            "n_breasts": int(y.size),
        }
    out["bins"] = {
        "n_bins": int(n_bins),
        "strategy": "uniform",
        "edges": [round(float(e), 6) for e in np.linspace(0, 1, n_bins + 1)],
    }
    out["level"] = "breast"
    return out


def plot_reliability(labels, probs, path: str, n_bins: int = DEFAULT_BINS, title: str = ""):
    """Reliability diagram of both tasks (observed rate vs mean probability per bin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5, 6), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    for task, color in (("malignant", "tab:red"), ("benign", "tab:blue")):
        y, p = metrics_lib.breast_level_arrays(labels, probs, task)
        if y.size == 0:
            continue
        observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
        ece = expected_calibration_error(y, p, n_bins)
        ax.plot(predicted, observed, "o-", color=color, label=f"{task} (ECE {ece:.3f})")
        hist.hist(p, bins=edges, color=color, alpha=0.4, label=task)
    ax.set_ylabel("observed positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title((title or "Breast-level reliability") + f"\n{n_bins} equal-width bins", fontsize=9)
    hist.set_xlabel("predicted probability")
    hist.set_ylabel("breasts")
    hist.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Temperature scaling.


@dataclasses.dataclass(frozen=True)
class Calibration:
    """One temperature per task, fitted on one split.

    Attributes:
      temperature: dict task -> float > 0 (``p' = sigmoid(logit(p) / T)``).
      fitted_on: dict ``split`` (or None), ``n_breasts``, ``n_exams``.
      nll: dict task -> ``{"before", "after"}``: mean NLL per breast on the fitting data.
      warnings: tuple of str. E.g. a temperature stopped at the search bound.
    """

    temperature: dict
    fitted_on: dict
    nll: dict
    warnings: tuple = ()

    def __post_init__(self):
        for task in constants.TASKS:
            t = self.temperature.get(task)
            if not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
                raise ValueError(f"temperature of {task!r} must be a positive number, got {t!r}")

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "method": "temperature_scaling",
            "labels": list(constants.LABELS),
            "fitted_on": dict(self.fitted_on),
            "temperature": {t: float(self.temperature[t]) for t in constants.TASKS},
            "nll": {t: dict(self.nll.get(t, {})) for t in constants.TASKS},
            "probability_clip": PROBABILITY_CLIP,
            "warnings": list(self.warnings),
        }


def _logit(p):
    p = np.clip(np.asarray(p, np.float64), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    return np.log(p) - np.log1p(-p)


def _nll(y, z, temperature: float) -> float:
    """Mean binary NLL of ``sigmoid(z / T)`` (stable: log(1 + e^x) via logaddexp)."""
    x = z / temperature
    return float(np.mean(np.logaddexp(0.0, x) - y * x))


def fit_temperature(labels, probs, *, split: str | None = None) -> Calibration:
    """Fits one temperature per task by minimising the breast-level NLL.

    Args:
      labels: array-like (N, 4) of 0/1 in LABELS order (validation exams).
      probs: array-like (N, 4) in LABELS order (the model's uncalibrated output).
      split: optional name of the split fitted on (recorded in ``fitted_on``).

    Returns:
      Calibration. The search is bounded to T in [0.01, 100] (log scale).

    Raises:
      ValueError: no exams, or a task whose breasts are all of one class (T would run off to
        a bound).
    """
    from scipy import optimize

    labels = np.asarray(labels)
    probs = np.asarray(probs, np.float64)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise ValueError(f"fit_temperature needs (N, 4) arrays with N >= 1; got {labels.shape}")
    temperature, nll, warnings = {}, {}, []
    for task in constants.TASKS:
        y, p = metrics_lib.breast_level_arrays(labels, probs, task)
        if len(np.unique(y)) < 2:
            raise ValueError(
                f"cannot fit a {task} temperature: all {y.size} breasts are "
                f"{'positive' if y.all() else 'negative'}"
            )
        z = _logit(p)
        result = optimize.minimize_scalar(
            lambda log_t, y=y, z=z: _nll(y, z, np.exp(log_t)),
            bounds=np.log(_T_BOUNDS),
            method="bounded",
            options={"xatol": 1e-6},
        )
        temperature[task] = float(np.exp(result.x))
        nll[task] = {"before": _nll(y, z, 1.0), "after": _nll(y, z, temperature[task])}
        low, high = _T_BOUNDS
        if not low * 1.01 < temperature[task] < high / 1.01:
            warnings.append(
                f"the {task} temperature stopped at the search bound ({temperature[task]:.3g}): "
                + (
                    "the outputs carry almost no information on this split (T -> infinity "
                    "flattens them to the base rate)"
                    if temperature[task] > 1
                    else "the outputs are far too cautious or the split is tiny"
                )
            )
    fitted_on = {"split": split, "n_breasts": int(2 * labels.shape[0]), "n_exams": len(labels)}
    return Calibration(temperature, fitted_on, nll, tuple(warnings))


def apply_temperature(probs, calibration: Calibration) -> np.ndarray:
    """Calibrated probabilities: ``sigmoid(logit(p) / T_task)`` per column.

    Args:
      probs: array-like (N, 4) (or (4,)) of positive-class probabilities in LABELS order.
      calibration: Calibration (from `fit_temperature` or `load_calibration`).

    Returns:
      float64 array of the same shape.
    """
    probs = np.asarray(probs, np.float64)
    if probs.shape[-1] != len(constants.LABELS):
        raise ValueError(
            f"probs must have {len(constants.LABELS)} columns in LABELS order "
            f"{constants.LABELS}. Received shape: {probs.shape}"
        )
    from scipy import special

    return special.expit(_logit(probs) / temperature_vector(calibration))


def temperature_vector(calibration: Calibration | None) -> np.ndarray:
    """float64 ``(4,)``: each label's task temperature in LABELS order (ones for None)."""
    if calibration is None:
        return np.ones(len(constants.LABELS))
    return np.array([calibration.temperature[label.split("_")[1]] for label in constants.LABELS])


def save_calibration(path: str, calibration: Calibration) -> str:
    """Writes ``calibration.json`` (a directory gets the file inside); returns the path."""
    from tfrecords_tools import fileio

    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    fileio.atomic_write_text(path, json.dumps(calibration.to_dict(), indent=2) + "\n")
    return path


def load_calibration(path: str) -> Calibration:
    """Reads a ``calibration.json`` (or a directory holding one).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not JSON, another schema version, another label order, or a missing or
        non-positive temperature; the message names the file.
    """
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (written by mri_keras.evaluate --calibrate).")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return from_dict(data, path)


def from_dict(data, source: str = "calibration") -> Calibration:
    """A Calibration from ``Calibration.to_dict()`` output (a calibration.json's content, or
    the copy an export's metadata holds).

    Raises:
      ValueError: not an object, another schema version, another label order, or a missing
        or non-positive temperature; the message names ``source``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{source}: schema_version {data.get('schema_version')!r} is not the supported "
            f"{SCHEMA_VERSION}"
        )
    if data.get("method") != "temperature_scaling":
        raise ValueError(f"{source}: method {data.get('method')!r} is not temperature_scaling")
    if data.get("labels", list(constants.LABELS)) != list(constants.LABELS):
        raise ValueError(f"{source}: labels {data.get('labels')} differ from {constants.LABELS}")
    temperature = data.get("temperature")
    if not isinstance(temperature, dict):
        raise ValueError(f"{source}: no 'temperature' object")
    try:
        return Calibration(
            temperature={t: temperature.get(t) for t in constants.TASKS},
            fitted_on=data.get("fitted_on", {}),
            nll=data.get("nll", {}),
            warnings=tuple(data.get("warnings", ())),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
