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


# --------------------------------------------------------------------------------------------
# Bootstrap confidence intervals, resampled by patient.
#
# A patient often has several exams (and every exam two breasts); these are not independent
# samples, so the bootstrap draws *patients* with replacement and every drawn patient brings
# all of its exams (and both breasts of each) along. A resample is represented by integer
# multiplicities per exam, which lets the AUC be computed on the original arrays with weights
# instead of materialising the repeated arrays.

DEFAULT_N_BOOTSTRAP = 2000
DEFAULT_CONFIDENCE = 0.95


def patient_bootstrap_weights(patient_ids, n_bootstrap: int = DEFAULT_N_BOOTSTRAP, seed: int = 0):
    """Yields per-exam multiplicities of patient-level bootstrap resamples.

    Each resample draws as many patients as there are distinct patients, uniformly with
    replacement; an exam's multiplicity is the number of times its patient was drawn, so all
    exams of a patient always move together.

    Args:
      patient_ids: sequence (N,) of patient ids, one per exam.
      n_bootstrap: int. Number of resamples. Defaults to 2000.
      seed: int. Seed of the numpy Generator; the same seed gives the same resamples.

    Yields:
      int64 arrays (N,): how many times each exam appears in the resample.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1. Received: n_bootstrap={n_bootstrap}")
    patient_ids = np.asarray(patient_ids)
    if patient_ids.ndim != 1 or patient_ids.size == 0:
        raise ValueError(
            f"patient_ids must be a non-empty 1-D sequence. Received shape: {patient_ids.shape}"
        )
    _, exam_to_patient = np.unique(patient_ids, return_inverse=True)
    num_patients = int(exam_to_patient.max()) + 1
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, num_patients, size=num_patients)
        per_patient = np.bincount(drawn, minlength=num_patients)
        yield per_patient[exam_to_patient]


def patient_bootstrap_indices(patient_ids, n_bootstrap: int = DEFAULT_N_BOOTSTRAP, seed: int = 0):
    """Patient-level bootstrap resamples as exam index arrays.

    Same resamples as `patient_bootstrap_weights` (same seed, same draws), expanded to indices:
    exam ``i`` appears ``weights[i]`` times.

    Args:
      patient_ids: sequence (N,) of patient ids, one per exam.
      n_bootstrap: int. Number of resamples. Defaults to 2000.
      seed: int. Seed; the same seed gives the same resamples.

    Returns:
      list of ``n_bootstrap`` int64 index arrays into the exams.
    """
    n = len(patient_ids)
    return [
        np.repeat(np.arange(n), w)
        for w in patient_bootstrap_weights(patient_ids, n_bootstrap, seed)
    ]


def bootstrap_distribution(
    statistic,
    patient_ids,
    exam_of_sample,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
) -> np.ndarray:
    """Values of a statistic over patient-bootstrap resamples: the one resampling loop.

    Every CI of this package (AUCs, differences, operating points, partial AUC) comes from
    here, so all of them resample patients the same way and, for one seed, on the same draws.

    Args:
      statistic: callable ``(sample_weights) -> float or sequence of floats``, evaluated on
        the original samples with per-sample multiplicities (NaN where undefined, e.g. a
        resample without positives).
      patient_ids: sequence (N,) of patient ids, one per exam.
      exam_of_sample: int array (n,): the exam of every sample (a breast-level sample array
        holds two samples per exam).
      n_bootstrap: int. Resamples. Defaults to 2000.
      seed: int. Bootstrap seed. Defaults to 0.

    Returns:
      float array (n_valid, k): one row per resample on which every value is defined (the
      others are skipped); k = 1 for a scalar statistic.
    """
    exam_of_sample = np.asarray(exam_of_sample, np.int64)
    rows = []
    for exam_weights in patient_bootstrap_weights(patient_ids, n_bootstrap, seed):
        value = np.atleast_1d(np.asarray(statistic(exam_weights[exam_of_sample]), np.float64))
        if not np.any(np.isnan(value)):
            rows.append(value)
    if not rows:
        k = np.atleast_1d(np.asarray(statistic(np.ones(exam_of_sample.shape)))).size
        return np.zeros((0, k))
    return np.stack(rows)


def percentile_interval(values, confidence: float = DEFAULT_CONFIDENCE):
    """Percentile interval ``(low, high)`` of bootstrap values along axis 0 (NaN if none).

    Args:
      values: array (n,) or (n, k) of bootstrap values.
      confidence: float in (0, 1). Defaults to 0.95.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1). Received: confidence={confidence}")
    values = np.asarray(values, np.float64)
    if values.shape[0] == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan.copy()
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail], axis=0)
    return low, high


def _binary_scores(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Flat int64 0/1 labels and float64 scores, checked: same length, finite scores."""
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true and y_score differ in length: {y.shape} vs {s.shape}")
    if np.any((y != 0) & (y != 1)):
        raise ValueError("y_true must be 0/1.")
    if not np.all(np.isfinite(s)):
        raise ValueError("y_score holds NaN or infinite values.")
    return y, s


class _WeightedAuc:
    """AUC of fixed (y_true, y_score) under varying non-negative sample weights.

    Scores are sorted once; each call is O(n). Ties count one half, so with unit weights the
    result equals ``sklearn.metrics.roc_auc_score`` (the Mann-Whitney statistic).
    """

    def __init__(self, y_true, y_score):
        y, s = _binary_scores(y_true, y_score)
        self._pos = y.astype(np.float64)
        self._neg = 1.0 - self._pos
        _, self._inv = np.unique(s, return_inverse=True)
        self._num_unique = int(self._inv.max()) + 1 if s.size else 0

    def __call__(self, weights=None) -> float:
        w = np.ones_like(self._pos) if weights is None else np.asarray(weights, np.float64)
        pos = np.bincount(self._inv, weights=w * self._pos, minlength=self._num_unique)
        neg = np.bincount(self._inv, weights=w * self._neg, minlength=self._num_unique)
        total_pos, total_neg = pos.sum(), neg.sum()
        if total_pos <= 0 or total_neg <= 0:
            return float("nan")
        neg_below = np.cumsum(neg) - neg
        return float(np.sum(pos * (neg_below + 0.5 * neg)) / (total_pos * total_neg))


class WeightedRoc:
    """Empirical ROC curve of fixed (y_true, y_score) under varying sample weights.

    Scores are sorted once; each call is O(n), which is what lets the bootstrap of operating
    points and partial AUCs afford thousands of resamples (``sklearn.metrics.roc_curve``
    re-validates and re-sorts on every call: ~20x slower here, measured). With unit weights
    the curve equals ``roc_curve(y, s, drop_intermediate=False)``; with integer weights, that
    of the repeated samples (a threshold whose samples all have weight 0 repeats the previous
    point, which changes no maximum, minimum or area).
    """

    def __init__(self, y_true, y_score):
        y, s = _binary_scores(y_true, y_score)
        unique, inverse = np.unique(s, return_inverse=True)  # ascending
        self._pos = y.astype(np.float64)
        self._index = (unique.size - 1) - inverse.reshape(-1)  # rank from the highest score
        self._size = unique.size
        # Threshold k calls positive every score >= it; the first calls nothing positive.
        self.thresholds = np.concatenate([[np.inf], unique[::-1]])

    def __call__(self, weights=None):
        """``(fpr, tpr)`` arrays aligned with ``self.thresholds``; None when the (weighted)
        sample lacks positives or negatives."""
        w = np.ones_like(self._pos) if weights is None else np.asarray(weights, np.float64)
        pos = np.bincount(self._index, weights=w * self._pos, minlength=self._size)
        neg = np.bincount(self._index, weights=w * (1.0 - self._pos), minlength=self._size)
        tps = np.concatenate([[0.0], np.cumsum(pos)])
        fps = np.concatenate([[0.0], np.cumsum(neg)])
        if tps[-1] <= 0 or fps[-1] <= 0:
            return None
        return fps / fps[-1], tps / tps[-1]


def weighted_auc(y_true, y_score, weights=None) -> float:
    """ROC AUC with optional per-sample weights (integer weights = repeated samples).

    Args:
      y_true: array-like (n,) of 0/1.
      y_score: array-like (n,) of scores.
      weights: optional array-like (n,) of non-negative weights. Defaults to all ones.

    Returns:
      The AUC, or NaN when the (weighted) sample lacks positives or negatives.
    """
    return _WeightedAuc(y_true, y_score)(weights)


def level_arrays(labels, probs, task: str, level: str = "breast"):
    """``(y_true, y_score, exam_of_sample)`` of breast- or exam-level samples.

    Args:
      labels: array-like (N, 4) of 0/1 in LABELS order.
      probs: array-like (N, 4) in LABELS order.
      task: str. "malignant" or "benign".
      level: str. "breast" (2 samples per exam: all left breasts, then all right ones, as in
        `breast_level_arrays`) or "exam" (max over both breasts). Defaults to "breast".

    Returns:
      ``y`` (n,), ``s`` (n,) and ``exam_of_sample`` (n,), the row of the exam each sample
      belongs to (what the patient bootstrap resamples by).
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    n = labels.shape[0] if labels.ndim else 0
    if level == "breast":
        y, s = breast_level_arrays(labels, probs, task)
        exam_of_sample = np.tile(np.arange(n), len(constants.SIDES))  # left block, right block
    elif level == "exam":
        cols = _columns(task)
        y, s = labels[:, cols].max(axis=1), probs[:, cols].max(axis=1)
        exam_of_sample = np.arange(n)
    else:
        raise ValueError(f"level must be 'breast' or 'exam'. Received: level={level!r}")
    return y, s, exam_of_sample


def check_patient_ids(labels, patient_ids) -> np.ndarray:
    """``patient_ids`` as an array, after checking it has one entry per exam row."""
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (np.asarray(labels).shape[0],):
        raise ValueError(
            f"patient_ids must have one entry per exam ({np.asarray(labels).shape[0]}). "
            f"Received shape: {patient_ids.shape}"
        )
    return patient_ids


def auc_with_ci(
    labels,
    probs,
    patient_ids,
    task: str = "malignant",
    level: str = "breast",
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """AUC with a percentile bootstrap confidence interval, resampling patients.

    Args:
      labels: array-like (N, 4) of 0/1 in LABELS order, one row per exam.
      probs: array-like (N, 4) of probabilities in LABELS order.
      patient_ids: sequence (N,) of patient ids (pseudonyms), one per exam.
      task: str. "malignant" or "benign". Defaults to "malignant".
      level: str. "breast" (the paper's pooling, 2 scores per exam) or "exam" (max over the
        breasts). Defaults to "breast".
      n_bootstrap: int. Resamples. Defaults to 2000.
      seed: int. Bootstrap seed. Defaults to 0.
      confidence: float in (0, 1). Defaults to 0.95.

    Returns:
      dict with ``auc`` (point estimate on all data), ``ci_low``, ``ci_high``, ``std``
      (bootstrap standard error), ``confidence``, ``n_bootstrap``, ``n_valid_resamples``
      (resamples holding both classes; the others are skipped), ``seed``, ``positives`` and
      ``negatives``. CI values are NaN when no resample is valid.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1). Received: confidence={confidence}")
    y, s, exam_of_sample = level_arrays(labels, probs, task, level)
    patient_ids = check_patient_ids(labels, patient_ids)
    auc_fn = _WeightedAuc(y, s)
    values = bootstrap_distribution(auc_fn, patient_ids, exam_of_sample, n_bootstrap, seed)[:, 0]
    low, high = percentile_interval(values, confidence)
    if values.size:
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    else:
        std = float("nan")
    return {
        "auc": auc_fn(),
        "ci_low": float(low),
        "ci_high": float(high),
        "std": std,
        "confidence": confidence,
        "n_bootstrap": int(n_bootstrap),
        "n_valid_resamples": int(values.size),
        "seed": int(seed),
        "positives": int(np.sum(y)),
        "negatives": int(np.size(y) - np.sum(y)),
    }


def format_auc(result: dict, digits: int = 3) -> str:
    """Formats an `auc_with_ci` result as ``0.912 (0.881-0.940)``."""
    point, low, high = result["auc"], result["ci_low"], result["ci_high"]
    if np.isnan(point):
        return "n/a"
    if np.isnan(low):
        return f"{point:.{digits}f}"
    return f"{point:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def _delong_components(y, scores):
    """Structural components of the Mann-Whitney AUC (Sun & Xu 2014's fast form).

    Args:
      y: int array (n,) of 0/1.
      scores: float array (k, n): k models' scores of the same samples.

    Returns:
      ``aucs`` (k,), ``v10`` (k, m) per positive and ``v01`` (k, n_neg) per negative.
    """
    from scipy import stats

    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    # Midranks (ties count one half): within positives, within negatives, and over both.
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # share of negatives each positive outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # share of positives that outrank each negative
    return aucs, v10, v01


def delong_test(y_true, score_a, score_b, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """DeLong's test of two correlated ROC AUCs on the same samples (fast form, Sun & Xu 2014).

    DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of the two AUCs from the
    structural components of the Mann-Whitney statistic; Sun & Xu (2014, IEEE Signal Process.
    Lett. 21:1389) compute those from midranks in O(n log n). The test treats the samples as
    independent: at breast level the two breasts of an exam (and a patient's several exams)
    are correlated, so the paired patient bootstrap of `paired_auc_difference` is the
    clustering-aware companion.

    Args:
      y_true: array-like (n,) of 0/1.
      score_a: array-like (n,). Model a's scores.
      score_b: array-like (n,). Model b's scores (same samples).
      confidence: float. Level of the normal-approximation CI of the difference.
        Defaults to 0.95.

    Returns:
      dict ``auc_a``, ``auc_b``, ``difference`` (b - a), ``se`` (of the difference), ``z``,
      ``p_value`` (two-sided), ``ci_low``, ``ci_high``, ``confidence``. With one class only,
      everything is NaN; with zero variance (e.g. identical scores) z is NaN and p is 1 when
      the difference is 0.
    """
    from scipy import stats

    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    a = np.asarray(score_a, np.float64).reshape(-1)
    b = np.asarray(score_b, np.float64).reshape(-1)
    if not y.size == a.size == b.size:
        raise ValueError(f"y_true and the scores differ in length: {y.size}, {a.size}, {b.size}")
    scores = np.stack([a, b])
    if np.any((y != 0) & (y != 1)):
        raise ValueError("y_true must be 0/1.")
    nan = float("nan")
    m, n = int(y.sum()), int(y.size - y.sum())
    if m < 1 or n < 1:
        keys = ("auc_a", "auc_b", "difference", "se", "z", "p_value", "ci_low", "ci_high")
        return {**dict.fromkeys(keys, nan), "confidence": confidence}
    aucs, v10, v01 = _delong_components(y, scores)
    s10 = np.cov(v10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    contrast = np.array([-1.0, 1.0])
    variance = float(contrast @ cov @ contrast)
    difference = float(aucs[1] - aucs[0])
    se = float(np.sqrt(max(variance, 0.0)))
    if se > 0:
        z = difference / se
        p = float(2.0 * stats.norm.sf(abs(z)))
    else:
        z, p = nan, (1.0 if difference == 0 else 0.0)
    half = float(stats.norm.ppf(0.5 + confidence / 2.0)) * se
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "difference": difference,
        "se": se,
        "z": float(z),
        "p_value": p,
        "ci_low": difference - half,
        "ci_high": difference + half,
        "confidence": confidence,
    }


def paired_auc_difference(
    labels,
    probs_a,
    probs_b,
    patient_ids,
    task: str = "malignant",
    level: str = "breast",
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """AUC(a) - AUC(b) of two models on the same exams: paired patient bootstrap and DeLong.

    Both models are scored on the same resamples, so the CI of the difference accounts for
    their correlation (much narrower than comparing two separate CIs). The one paired
    comparison of the package: ``mri_keras.compare``, the ensembles and the experiment
    tables all call it.

    Args:
      labels: array-like (N, 4). Shared labels.
      probs_a: array-like (N, 4). Model a's probabilities (same exam order).
      probs_b: array-like (N, 4). Model b's probabilities.
      patient_ids: sequence (N,) of patient ids.
      task, level, n_bootstrap, seed, confidence: as in `auc_with_ci`.

    Returns:
      dict with ``difference`` (point estimate, a - b), ``ci_low``, ``ci_high``, ``p_value``
      (two-sided, from the bootstrap distribution: twice the smaller tail share around 0,
      at least 1 / valid resamples), ``n_valid_resamples``, ``auc_a``, ``auc_b``,
      ``confidence``, ``seed`` and ``delong``: `delong_test` of the same difference (a - b,
      its CI and p; samples treated as independent).
    """
    y, s_a, exam_of_sample = level_arrays(labels, probs_a, task, level)
    _, s_b, _ = level_arrays(labels, probs_b, task, level)
    patient_ids = check_patient_ids(labels, patient_ids)
    auc_a, auc_b = _WeightedAuc(y, s_a), _WeightedAuc(y, s_b)
    diffs = bootstrap_distribution(
        lambda w: auc_a(w) - auc_b(w), patient_ids, exam_of_sample, n_bootstrap, seed
    )[:, 0]
    low, high = percentile_interval(diffs, confidence)
    if diffs.size:
        p = 2.0 * min(np.mean(diffs <= 0.0), np.mean(diffs >= 0.0))
        p = float(min(1.0, max(p, 1.0 / diffs.size)))
    else:
        p = float("nan")
    # DeLong's difference is b - a; flipped so both read a - b.
    delong = delong_test(y, s_b, s_a, confidence)
    point_a, point_b = auc_a(), auc_b()
    return {
        "difference": float(point_a - point_b),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": p,
        "n_valid_resamples": int(diffs.size),
        "auc_a": float(point_a),
        "auc_b": float(point_b),
        "confidence": confidence,
        "seed": int(seed),
        "delong": {k: delong[k] for k in ("difference", "se", "z", "p_value", "ci_low", "ci_high")},
    }


# --------------------------------------------------------------------------------------------
# Partial AUC over the high-specificity part of the ROC curve.

DEFAULT_MAX_FPR = 0.2  # specificity >= 0.8


def _partial_area(fpr, tpr, max_fpr: float) -> dict:
    """Standardised and raw partial area of a ROC curve (see `partial_auc`)."""
    stop = int(np.searchsorted(fpr, max_fpr, "right"))
    if stop < len(fpr):
        # Cut at max_fpr by linear interpolation, as scikit-learn does.
        cut = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
        fpr, tpr = np.append(fpr[:stop], max_fpr), np.append(tpr[:stop], cut)
    raw = float(np.trapezoid(tpr, fpr))
    min_area, max_area = 0.5 * max_fpr**2, max_fpr
    return {
        "standardized": float(0.5 * (1 + (raw - min_area) / (max_area - min_area))),
        "raw": raw,
    }


def _check_max_fpr(max_fpr: float) -> None:
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1]. Received: max_fpr={max_fpr}")


def partial_auc(y_true, y_score, max_fpr: float = DEFAULT_MAX_FPR, sample_weight=None) -> dict:
    """Partial area under the ROC curve for false-positive rates in ``[0, max_fpr]``.

    Args:
      y_true: array-like (n,) of 0/1.
      y_score: array-like (n,).
      max_fpr: float in (0, 1]. Defaults to 0.2 (specificity >= 0.8).
      sample_weight: optional array-like (n,) of non-negative weights (integer weights =
        repeated samples).

    Returns:
      dict ``standardized``: McClish (1989) standardised pAUC, 0.5 for a chance curve and 1
      for a perfect one, equal to ``sklearn.metrics.roc_auc_score(..., max_fpr=max_fpr)``;
      ``raw``: the unstandardised area, in ``[0, max_fpr]``. NaN with one class only.
    """
    _check_max_fpr(max_fpr)
    curve = WeightedRoc(y_true, y_score)(sample_weight)
    if curve is None:
        return {"standardized": float("nan"), "raw": float("nan")}
    return _partial_area(*curve, max_fpr)


def partial_auc_with_ci(
    labels,
    probs,
    patient_ids,
    task: str = "malignant",
    max_fpr: float = DEFAULT_MAX_FPR,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """Breast-level partial AUC (specificity >= 1 - max_fpr) with patient-bootstrap CIs.

    Args:
      labels, probs, patient_ids, task, n_bootstrap, seed, confidence: as in `auc_with_ci`.
      max_fpr: float. Defaults to 0.2.

    Returns:
      dict ``standardized`` and ``raw`` (as `partial_auc`), each ``{value, ci_low,
      ci_high}``, plus ``max_fpr``, ``min_specificity``, ``standardization`` ("McClish"),
      ``n_valid_resamples``, ``confidence``.
    """
    _check_max_fpr(max_fpr)
    y, s, exam_of_sample = level_arrays(labels, probs, task, "breast")
    patient_ids = check_patient_ids(labels, patient_ids)
    roc = WeightedRoc(y, s)

    def statistic(w=None):
        curve = roc(w)
        if curve is None:
            return [float("nan"), float("nan")]
        r = _partial_area(*curve, max_fpr)
        return [r["standardized"], r["raw"]]

    point = dict(zip(("standardized", "raw"), statistic()))

    values = bootstrap_distribution(statistic, patient_ids, exam_of_sample, n_bootstrap, seed)
    low, high = percentile_interval(values, confidence)
    return {
        "standardized": {
            "value": point["standardized"],
            "ci_low": float(low[0]),
            "ci_high": float(high[0]),
        },
        "raw": {"value": point["raw"], "ci_low": float(low[1]), "ci_high": float(high[1])},
        "max_fpr": float(max_fpr),
        "min_specificity": float(1.0 - max_fpr),
        "standardization": "McClish",
        "n_valid_resamples": int(values.shape[0]),
        "confidence": confidence,
    }
