"""Breast-level operating points: threshold-free figures and a validation-chosen threshold."""

import numpy as np
import pytest

from mri_keras import constants, metrics, operating_points, predictions_io


def _predictions(num_exams, seed, signal=1.2, prefix="e"):
    rng = np.random.default_rng(seed)
    labels = (rng.random((num_exams, 4)) < 0.3).astype(np.int64)
    probs = 1 / (1 + np.exp(-(signal * (2 * labels - 1) + rng.normal(size=(num_exams, 4)))))
    probs = np.round(probs, 2)  # ties, as a real model's rounded outputs have
    exam_ids = [f"{prefix}{i}" for i in range(num_exams)]
    patients = [f"{prefix}p{i // 2}" for i in range(num_exams)]
    return predictions_io.Predictions(exam_ids, patients, labels, probs)


def _brute_force(y, s):
    """(sensitivity, specificity) of every rule `s >= t`, t over all scores and +inf."""
    out = []
    for t in np.append(np.unique(s), np.inf):
        called = s >= t
        out.append((called[y == 1].mean(), (~called[y == 0]).mean(), t))
    return out


def test_threshold_free_points_are_the_best_achievable_rules():
    pred = _predictions(120, seed=1)
    y, s = metrics.breast_level_arrays(pred.labels, pred.probs, "malignant")
    rules = _brute_force(y, s)
    result = operating_points.threshold_free_points(
        pred.labels, pred.probs, pred.patient_ids, n_bootstrap=200, seed=4
    )
    for target in operating_points.SPECIFICITY_TARGETS:
        expected = max(se for se, sp, _ in rules if sp >= target)
        r = result["sensitivity_at_specificity"][f"{target:.2f}"]
        assert r["value"] == pytest.approx(expected)
        assert operating_points.sensitivity_at_specificity(y, s, target) == pytest.approx(expected)
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["ci_low"] < r["ci_high"]
    expected = max(sp for se, sp, _ in rules if se >= 0.95)
    r = result["specificity_at_sensitivity"]["0.95"]
    assert r["value"] == pytest.approx(expected)
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
    # Stricter specificity never buys sensitivity.
    sens = [result["sensitivity_at_specificity"][k]["value"] for k in ("0.80", "0.90", "0.95")]
    assert sens[0] >= sens[1] >= sens[2]
    # Integer weights are repeated samples.
    w = np.random.default_rng(0).integers(0, 3, size=y.size)
    idx = np.repeat(np.arange(y.size), w)
    assert operating_points.sensitivity_at_specificity(y, s, 0.9, sample_weight=w) == pytest.approx(
        operating_points.sensitivity_at_specificity(y[idx], s[idx], 0.9)
    )


def test_choose_threshold_is_the_extreme_rule_meeting_the_target():
    pred = _predictions(100, seed=2)
    y, s = metrics.breast_level_arrays(pred.labels, pred.probs, "malignant")
    rules = _brute_force(y, s)
    op = operating_points.parse_operating_point("sensitivity:0.95")
    t = operating_points.choose_threshold(y, s, op)
    assert t == max(th for se, _, th in rules if se >= 0.95)  # highest threshold that works
    assert (s[y == 1] >= t).mean() >= 0.95
    higher = np.unique(s)[np.unique(s) > t][0]
    assert (s[y == 1] >= higher).mean() < 0.95  # one step higher misses the target
    op = operating_points.parse_operating_point("specificity:0.90")
    t = operating_points.choose_threshold(y, s, op)
    assert t == min(th for _, sp, th in rules if sp >= 0.90)  # lowest threshold that works
    assert (s[y == 0] < t).mean() >= 0.90
    # Specificity 1.0 where the top score is a negative: call nothing positive, finitely.
    t = operating_points.choose_threshold(
        [1, 0], [0.2, 0.9], operating_points.OperatingPoint("specificity", 1.0)
    )
    assert np.isfinite(t) and t > 0.9
    with pytest.raises(ValueError, match="0 positive"):
        operating_points.choose_threshold([0, 0], [0.1, 0.2], op)


def test_confusion_counts_and_rates_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.5, 0.2, 0.6, 0.3, 0.1, 0.5])
    r = operating_points.confusion_at_threshold(y, s, 0.5)  # >= 0.5: 0.9, 0.5, 0.6, 0.5
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 2, 2, 1)
    assert r["sensitivity"] == pytest.approx(2 / 3) and r["specificity"] == pytest.approx(0.5)
    assert r["ppv"] == pytest.approx(0.5) and r["npv"] == pytest.approx(2 / 3)
    none = operating_points.confusion_at_threshold(y, s, 2.0)
    assert np.isnan(none["ppv"]) and none["npv"] == pytest.approx(4 / 7)


def test_validation_threshold_is_applied_unchanged_to_test():
    val, test = _predictions(120, seed=3, prefix="v"), _predictions(150, seed=4, prefix="t")
    result = operating_points.validation_threshold(
        val, test, "specificity:0.90", n_bootstrap=300, seed=1
    )
    y_val, s_val = metrics.breast_level_arrays(val.labels, val.probs, "malignant")
    t = operating_points.choose_threshold(
        y_val, s_val, operating_points.OperatingPoint("specificity", 0.9)
    )
    assert result["threshold"] == t and result["chosen_on"] == "val"
    assert result["val"]["specificity"] >= 0.9
    y, s = metrics.breast_level_arrays(test.labels, test.probs, "malignant")
    called = s >= t
    assert result["test"]["tp"] == int((called & (y == 1)).sum())
    assert result["test"]["fp"] == int((called & (y == 0)).sum())
    assert result["test"]["tn"] + result["test"]["fn"] == int((~called).sum())
    assert result["test"]["tp"] + result["test"]["fn"] == int(y.sum())
    for rate in ("sensitivity", "specificity", "ppv", "npv"):
        ci = result["test"]["ci"][rate]
        assert ci["ci_low"] <= result["test"][rate] <= ci["ci_high"]
        assert ci["ci_low"] < ci["ci_high"]
    benign = operating_points.validation_threshold(val, None, "sensitivity:0.8", task="benign")
    assert benign["test"] is None and benign["val"]["sensitivity"] >= 0.8
    text = "\n".join(operating_points.format_validation_threshold(result))
    assert "chosen on val at specificity:0.9" in text and "test: sensitivity" in text


@pytest.mark.parametrize(
    "text, match",
    [
        ("sensitivity", "must look like"),
        ("sensitivity:high", "must look like"),
        ("recall:0.9", "metric must be one of"),
        ("specificity:1.5", r"in \(0, 1\]"),
    ],
)
def test_bad_operating_points_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        operating_points.parse_operating_point(text)


def test_labels_order_is_the_one_of_constants():
    # The malignant task reads the *_malignant columns only.
    labels = np.zeros((4, 4), np.int64)
    probs = np.zeros((4, 4))
    m = constants.LABELS.index("left_malignant")
    labels[:2, m] = 1
    probs[:, m] = [0.9, 0.8, 0.1, 0.2]
    r = operating_points.threshold_free_points(labels, probs, list("abcd"), n_bootstrap=20)
    assert r["sensitivity_at_specificity"]["0.95"]["value"] == 1.0
