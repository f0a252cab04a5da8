"""Calibration: ECE, Brier, reliability diagram and temperature scaling (calibration.json)."""

import json

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mri_keras import calibration, constants, metrics


def _overconfident(num_exams, seed, sharpen=3.0):
    """Labels drawn from sigmoid(z), probabilities sigmoid(sharpen * z): over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(num_exams, 4)) - 0.5
    labels = (rng.random((num_exams, 4)) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return labels, 1 / (1 + np.exp(-sharpen * z)), 1 / (1 + np.exp(-z))


def test_ece_by_hand_and_against_sklearns_binning():
    y = [0, 1, 0, 1]
    p = [0.05, 0.15, 0.15, 0.95]
    # bins [0,.1]: |0.05-0| x 1/4; (.1,.2]: |0.15-0.5| x 2/4; (.9,1]: |0.95-1| x 1/4
    assert calibration.expected_calibration_error(y, p) == pytest.approx(0.2)
    assert calibration.expected_calibration_error([1, 0], [0.1, 0.1]) == pytest.approx(0.4)
    assert calibration.expected_calibration_error([1, 0], [0.7, 0.3], n_bins=1) == 0.0
    from sklearn.calibration import calibration_curve

    labels, probs, _ = _overconfident(300, seed=1)
    y, p = metrics.breast_level_arrays(labels, probs, "malignant")
    observed, predicted = calibration_curve(y, p, n_bins=10)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p), minlength=10)
    counts = counts[counts > 0]
    expected = np.sum(counts / y.size * np.abs(observed - predicted))
    assert calibration.expected_calibration_error(y, p) == pytest.approx(expected)


def test_summary_uses_breast_level_pooling_and_sklearn_brier():
    labels, probs, truth = _overconfident(400, seed=2)
    summary = calibration.calibration_summary(labels, probs)
    for task in constants.TASKS:
        y, p = metrics.breast_level_arrays(labels, probs, task)
        assert summary[task]["brier"] == pytest.approx(sk_metrics.brier_score_loss(y, p))
        assert summary[task]["n_breasts"] == 800
    assert summary["bins"]["n_bins"] == 10 and summary["bins"]["strategy"] == "uniform"
    # The true probabilities are better calibrated than the sharpened ones.
    honest = calibration.calibration_summary(labels, truth)
    assert honest["malignant"]["ece"] < 0.5 * summary["malignant"]["ece"]
    assert honest["malignant"]["brier"] < summary["malignant"]["brier"]


def test_temperature_recovers_the_sharpening_and_lowers_nll():
    labels, probs, truth = _overconfident(3000, seed=3, sharpen=3.0)
    calib = calibration.fit_temperature(labels, probs, split="val")
    for task in constants.TASKS:
        assert calib.temperature[task] == pytest.approx(3.0, rel=0.1)
        assert calib.nll[task]["after"] < calib.nll[task]["before"]
    # NLL is at a minimum: a slightly different T is worse.
    y, p = metrics.breast_level_arrays(labels, probs, "malignant")
    z = np.log(p / (1 - p))
    for t in (calib.temperature["malignant"] * 0.97, calib.temperature["malignant"] * 1.03):
        q = 1 / (1 + np.exp(-z / t))
        assert sk_metrics.log_loss(y, q) > calib.nll["malignant"]["after"]
    calibrated = calibration.apply_temperature(probs, calib)
    assert calibrated.shape == probs.shape
    np.testing.assert_allclose(calibrated, truth, atol=0.05)
    # The ranking, and so every AUC, is unchanged.
    for task in constants.TASKS:
        assert metrics.breast_level_auc(labels, calibrated, task) == pytest.approx(
            metrics.breast_level_auc(labels, probs, task)
        )
    assert calib.fitted_on == {"split": "val", "n_breasts": 6000, "n_exams": 3000}


def test_apply_equals_a_softmax_head_with_its_logits_divided_by_t():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 4, size=(50, 4, 2))  # per head: (z0, z1)
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    calib = calibration.Calibration({"malignant": 2.5, "benign": 0.7}, {}, {})
    got = calibration.apply_temperature(softmax[..., 1], calib)
    temps = np.array([0.7, 2.5, 0.7, 2.5])[None, :, None]  # LABELS: benign, malignant, ...
    expected = np.exp(logits / temps) / np.exp(logits / temps).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, expected[..., 1], atol=1e-6)
    # Saturated outputs (float32 softmax gives exactly 0 or 1) stay finite and ordered.
    edge = calibration.apply_temperature(np.array([[0.0, 1.0, 0.5, 1e-12]]), calib)
    assert np.all(np.isfinite(edge)) and 0 < edge[0, 0] < 0.5 < edge[0, 1] < 1


def test_save_load_roundtrip_and_clear_errors(tmp_path):
    labels, probs, _ = _overconfident(200, seed=5)
    calib = calibration.fit_temperature(labels, probs, split="val")
    path = calibration.save_calibration(str(tmp_path), calib)
    assert path == str(tmp_path / "calibration.json")
    data = json.load(open(path))
    assert data["schema_version"] == 1 and data["fitted_on"]["split"] == "val"
    assert data["labels"] == list(constants.LABELS) and set(data["nll"]) == set(constants.TASKS)
    loaded = calibration.load_calibration(str(tmp_path))
    assert loaded.temperature == pytest.approx(calib.temperature)
    np.testing.assert_allclose(
        calibration.apply_temperature(probs, loaded), calibration.apply_temperature(probs, calib)
    )
    bad = tmp_path / "bad.json"
    for content, match in (
        ("{not json", "bad.json: not valid JSON"),
        (json.dumps({**data, "schema_version": 9}), "bad.json: schema_version 9"),
        (json.dumps({**data, "temperature": {"malignant": 1.0}}), "bad.json: temperature of"),
        (json.dumps({**data, "temperature": {"malignant": -1, "benign": 1}}), "positive"),
        (json.dumps({**data, "labels": ["a"]}), "bad.json: labels"),
    ):
        bad.write_text(content)
        with pytest.raises(ValueError, match=match):
            calibration.load_calibration(str(bad))
    with pytest.raises(FileNotFoundError, match="evaluate --calibrate"):
        calibration.load_calibration(str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="all 4 breasts are negative"):
        calibration.fit_temperature(np.zeros((2, 4)), np.full((2, 4), 0.3))
    with pytest.raises(ValueError, match="4 columns"):
        calibration.apply_temperature(np.zeros((3, 2)), calib)


def test_reliability_diagram_is_written(tmp_path):
    labels, probs, _ = _overconfident(100, seed=6)
    path = tmp_path / "reliability.png"
    calibration.plot_reliability(labels, probs, str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_uninformative_outputs_stop_at_the_bound_with_a_warning(tmp_path):
    rng = np.random.default_rng(7)
    labels = np.tile([[0, 1, 1, 0], [1, 0, 0, 1]], (100, 1))  # half of every task positive
    probs = np.repeat(rng.random((100, 4)), 2, axis=0)  # each row once per label: no signal
    calib = calibration.fit_temperature(labels, probs, split="val")
    assert calib.temperature["malignant"] == pytest.approx(100.0, rel=0.01)
    assert any("malignant temperature stopped at the search bound" in w for w in calib.warnings)
    loaded = calibration.load_calibration(calibration.save_calibration(str(tmp_path), calib))
    assert loaded.warnings == calib.warnings
    honest, _, _ = _overconfident(500, seed=8)
    assert calibration.fit_temperature(honest, _overconfident(500, seed=8)[1]).warnings == ()
