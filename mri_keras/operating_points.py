"""Operating points of a breast-level classifier: what a reader of a radiology study asks.

Two kinds, both breast-level (the paper's pooling: both breasts of every exam scored
independently) and both with patient-bootstrap CIs (`metrics.bootstrap_distribution`):

- **Threshold-free**: the sensitivity reachable at specificity >= 0.80 / 0.90 / 0.95 and the
  specificity reachable at sensitivity >= 0.95, read off the empirical ROC curve of the split
  itself (the best achievable point, no interpolation between thresholds). Optimistic by
  construction: the threshold is chosen on the data it is scored on.
- **A threshold chosen on validation, applied unchanged to test**: the highest threshold whose
  validation sensitivity reaches the target (``sensitivity:0.95``), or the lowest whose
  validation specificity does (``specificity:0.90``). A breast is called positive when its
  probability is >= the threshold. Reported: the threshold, sensitivity, specificity, PPV, NPV
  and TP/FP/TN/FN on both splits, with test CIs at the fixed threshold. PPV and NPV depend on
  the split's prevalence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mri_keras import metrics as metrics_lib

SPECIFICITY_TARGETS = (0.80, 0.90, 0.95)
SENSITIVITY_TARGETS = (0.95,)
METRICS = ("sensitivity", "specificity")
DEFAULT_OPERATING_POINT = "sensitivity:0.95"
_EPS = 1e-12  # Rates are ratios of counts: compare with a tolerance, not exactly.


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """A target for choosing a threshold on validation.

    Attributes:
      metric: str. "sensitivity" or "specificity": the rate that must reach ``target``.
      target: float in (0, 1].
    """

    metric: str
    target: float

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(
                f"operating point metric must be one of {METRICS}. Received: {self.metric!r}"
            )
        if not 0.0 < self.target <= 1.0:
            raise ValueError(
                f"operating point target must be in (0, 1]. Received: {self.metric}:{self.target}"
            )

    def __str__(self) -> str:
        return f"{self.metric}:{self.target:g}"


def parse_operating_point(text: str) -> OperatingPoint:
    """Parses ``"sensitivity:0.95"`` or ``"specificity:0.90"``.

    Raises:
      ValueError: the text is not ``METRIC:TARGET``, naming what was received.
    """
    metric, sep, target = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        value = float(target)
    except ValueError:
        raise ValueError(
            "operating point must look like sensitivity:0.95 or specificity:0.90. "
            f"Received: {text!r}"
        ) from None
    return OperatingPoint(metric.strip().lower(), value)


def _roc(y, s, sample_weight=None):
    """``(fpr, tpr, thresholds)`` with every threshold kept (a chosen threshold must be a real
    cut between two scores), or None with one class only."""
    roc = metrics_lib.WeightedRoc(y, s)
    curve = roc(sample_weight)
    return None if curve is None else (*curve, roc.thresholds)


def _sensitivity_at(fpr, tpr, specificity: float) -> float:
    return float(tpr[fpr <= 1.0 - specificity + _EPS].max())


def _specificity_at(fpr, tpr, sensitivity: float) -> float:
    return float(1.0 - fpr[tpr >= sensitivity - _EPS].min())


def sensitivity_at_specificity(y_true, y_score, specificity: float, sample_weight=None) -> float:
    """Highest sensitivity of any threshold whose specificity is >= ``specificity``."""
    curve = _roc(y_true, y_score, sample_weight)
    return float("nan") if curve is None else _sensitivity_at(curve[0], curve[1], specificity)


def specificity_at_sensitivity(y_true, y_score, sensitivity: float, sample_weight=None) -> float:
    """Highest specificity of any threshold whose sensitivity is >= ``sensitivity``."""
    curve = _roc(y_true, y_score, sample_weight)
    return float("nan") if curve is None else _specificity_at(curve[0], curve[1], sensitivity)


def _key(value: float) -> str:
    return f"{value:.2f}"


def threshold_free_points(
    labels,
    probs,
    patient_ids,
    task: str = "malignant",
    specificities=SPECIFICITY_TARGETS,
    sensitivities=SENSITIVITY_TARGETS,
    n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = metrics_lib.DEFAULT_CONFIDENCE,
) -> dict:
    """Sensitivity at fixed specificities and specificity at fixed sensitivities, with CIs.

    Args:
      labels: array-like (N, 4) in LABELS order.
      probs: array-like (N, 4) in LABELS order.
      patient_ids: sequence (N,), one per exam.
      task: str. "malignant" or "benign". Defaults to "malignant".
      specificities: targets for sensitivity-at-specificity. Defaults to 0.80, 0.90, 0.95.
      sensitivities: targets for specificity-at-sensitivity. Defaults to 0.95.
      n_bootstrap, seed, confidence: as in `metrics.auc_with_ci` (same resampling).

    Returns:
      dict ``sensitivity_at_specificity`` and ``specificity_at_sensitivity``, each keyed by
      the target (``"0.90"``) with ``{value, ci_low, ci_high}``; ``n_valid_resamples``,
      ``confidence``, ``definition``.
    """
    y, s, exam_of_sample = metrics_lib.level_arrays(labels, probs, task, "breast")
    patient_ids = metrics_lib.check_patient_ids(labels, patient_ids)

    roc = metrics_lib.WeightedRoc(y, s)

    def statistic(w=None):
        curve = roc(w)
        if curve is None:
            return [float("nan")] * (len(specificities) + len(sensitivities))
        out = [_sensitivity_at(*curve, sp) for sp in specificities]
        return out + [_specificity_at(*curve, se) for se in sensitivities]

    point = statistic()
    values = metrics_lib.bootstrap_distribution(
        statistic, patient_ids, exam_of_sample, n_bootstrap, seed
    )
    low, high = metrics_lib.percentile_interval(values, confidence)
    names = [("sensitivity_at_specificity", t) for t in specificities]
    names += [("specificity_at_sensitivity", t) for t in sensitivities]
    out = {"sensitivity_at_specificity": {}, "specificity_at_sensitivity": {}}
    for i, (group, target) in enumerate(names):
        out[group][_key(target)] = {
            "value": float(point[i]),
            "ci_low": float(low[i]),
            "ci_high": float(high[i]),
        }
    out.update(
        n_valid_resamples=int(values.shape[0]),
        confidence=confidence,
        definition=(
            "best point of the split's own empirical ROC curve meeting the target "
            "(no interpolation); breast level"
        ),
    )
    return out


def choose_threshold(y_true, y_score, operating_point: OperatingPoint) -> float:
    """The threshold meeting ``operating_point`` on these samples (positive: score >= it).

    For a sensitivity target: the highest threshold whose sensitivity reaches it (the most
    specific such rule). For a specificity target: the lowest threshold whose specificity
    reaches it (the most sensitive such rule); when no threshold calls anything positive
    without breaking the target, a threshold just above the highest score.

    Raises:
      ValueError: the samples lack positives or negatives.
    """
    y = np.asarray(y_true)
    s = np.asarray(y_score, np.float64)
    curve = _roc(y, s)
    if curve is None:
        raise ValueError(
            f"cannot choose a threshold at {operating_point}: the samples hold "
            f"{int(y.sum())} positive(s) and {int(y.size - y.sum())} negative(s)"
        )
    fpr, tpr, thresholds = curve
    if operating_point.metric == "sensitivity":
        index = int(np.argmax(tpr >= operating_point.target - _EPS))
    else:
        index = int(np.nonzero(fpr <= 1.0 - operating_point.target + _EPS)[0].max())
    threshold = float(thresholds[index])
    if not np.isfinite(threshold):  # sklearn's first threshold (nothing positive) is inf
        threshold = float(np.nextafter(s.max(), np.inf))
    return threshold


def _rates(tp, fp, tn, fn):
    def ratio(a, b):
        return a / b if b > 0 else float("nan")

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def confusion_at_threshold(y_true, y_score, threshold: float, sample_weight=None) -> dict:
    """TP/FP/TN/FN and sensitivity, specificity, PPV, NPV of ``score >= threshold``.

    Counts are weighted sums with ``sample_weight`` (integers without). Rates are NaN where
    their denominator is 0.
    """
    y = np.asarray(y_true).astype(bool)
    called = np.asarray(y_score, np.float64) >= threshold
    w = np.ones(y.shape) if sample_weight is None else np.asarray(sample_weight, np.float64)
    counts = {
        "tp": w[called & y].sum(),
        "fp": w[called & ~y].sum(),
        "tn": w[~called & ~y].sum(),
        "fn": w[~called & y].sum(),
    }
    if sample_weight is None:
        counts = {k: int(v) for k, v in counts.items()}
    return {**counts, **_rates(counts["tp"], counts["fp"], counts["tn"], counts["fn"])}


def validation_threshold(
    val_predictions,
    test_predictions,
    operating_point: OperatingPoint | str = DEFAULT_OPERATING_POINT,
    task: str = "malignant",
    n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = metrics_lib.DEFAULT_CONFIDENCE,
) -> dict:
    """Chooses a breast-level threshold on validation and applies it unchanged to test.

    Args:
      val_predictions: `predictions_io.Predictions` of the validation split.
      test_predictions: `predictions_io.Predictions` of the test split (or None: only the
        validation figures).
      operating_point: OperatingPoint or its text (``"sensitivity:0.95"``).
      task: str. Defaults to "malignant".
      n_bootstrap, seed, confidence: for the test CIs (patients resampled, threshold fixed).

    Returns:
      dict ``operating_point`` (text), ``task``, ``chosen_on`` ("val"), ``threshold``,
      ``val`` (confusion counts and rates), ``test`` (the same plus ``ci`` per rate:
      ``{sensitivity: {ci_low, ci_high, n_valid_resamples}, ...}``) or None.
    """
    if isinstance(operating_point, str):
        operating_point = parse_operating_point(operating_point)
    y_val, s_val = metrics_lib.breast_level_arrays(
        val_predictions.labels, val_predictions.probs, task
    )
    threshold = choose_threshold(y_val, s_val, operating_point)
    out = {
        "operating_point": str(operating_point),
        "task": task,
        "level": "breast",
        "chosen_on": "val",
        "rule": "positive when probability >= threshold",
        "threshold": threshold,
        "val": confusion_at_threshold(y_val, s_val, threshold),
        "test": None,
    }
    if test_predictions is None:
        return out
    y, s, exam_of_sample = metrics_lib.level_arrays(
        test_predictions.labels, test_predictions.probs, task, "breast"
    )
    test = confusion_at_threshold(y, s, threshold)
    test["ci"] = {}
    for rate in ("sensitivity", "specificity", "ppv", "npv"):
        # Each rate on the resamples where it is defined (PPV needs a called positive...);
        # the same draws for all four (one seed).
        values = metrics_lib.bootstrap_distribution(
            lambda w, rate=rate: confusion_at_threshold(y, s, threshold, sample_weight=w)[rate],
            test_predictions.patient_ids,
            exam_of_sample,
            n_bootstrap,
            seed,
        )[:, 0]
        low, high = metrics_lib.percentile_interval(values, confidence)
        test["ci"][rate] = {
            "ci_low": float(low),
            "ci_high": float(high),
            "n_valid_resamples": int(values.size),
        }
    test["confidence"] = confidence
    out["test"] = test
    return out


def format_rate(value: float, ci: dict | None = None, digits: int = 3) -> str:
    """``0.912 (0.881-0.940)``; ``n/a`` for NaN."""
    if value is None or np.isnan(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci and ci.get("ci_low") is not None and not np.isnan(ci["ci_low"]):
        text += f" ({ci['ci_low']:.{digits}f}-{ci['ci_high']:.{digits}f})"
    return text


def format_threshold_free(points: dict, task: str) -> list:
    """Text lines of a `threshold_free_points` result."""
    lines = []
    for target, r in points["sensitivity_at_specificity"].items():
        lines.append(f"{task} sensitivity at specificity >= {target}: {format_rate(r['value'], r)}")
    for target, r in points["specificity_at_sensitivity"].items():
        lines.append(f"{task} specificity at sensitivity >= {target}: {format_rate(r['value'], r)}")
    return lines


def format_validation_threshold(result: dict) -> list:
    """Text lines of a `validation_threshold` result."""
    lines = [
        f"{result['task']} threshold {result['threshold']:.4g} chosen on val at "
        f"{result['operating_point']} (positive when probability >= threshold)"
    ]
    for split in ("val", "test"):
        r = result[split]
        if r is None:
            continue
        ci = r.get("ci", {})
        lines.append(
            f"  {split}: sensitivity {format_rate(r['sensitivity'], ci.get('sensitivity'))}, "
            f"specificity {format_rate(r['specificity'], ci.get('specificity'))}, "
            f"PPV {format_rate(r['ppv'], ci.get('ppv'))}, "
            f"NPV {format_rate(r['npv'], ci.get('npv'))}"
            f"; TP {r['tp']:g} FP {r['fp']:g} TN {r['tn']:g} FN {r['fn']:g}"
        )
    return lines
