"""Decision curve: net benefit of the model vs treat-all / treat-none."""

import csv
import io

import numpy as np
import pytest

from mri_keras import decision_curve


def test_net_benefit_by_hand():
    y = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    s = [0.9, 0.3, 0.6, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    curve = decision_curve.net_benefit(y, s, thresholds=[0.25, 0.5])
    # pt 0.25 (odds 1/3): called 0.9, 0.3, 0.6 -> TP 2, FP 1 -> 2/10 - 1/10 / 3
    # pt 0.5 (odds 1): called 0.9, 0.6 -> TP 1, FP 1 -> 0
    assert curve["model"] == pytest.approx([0.2 - 0.1 / 3, 0.0])
    assert curve["treat_all"] == pytest.approx([0.2 - 0.8 / 3, 0.2 - 0.8])
    assert curve["treat_none"] == [0.0, 0.0] and curve["prevalence"] == pytest.approx(0.2)
    assert curve["true_positives"] == [2, 1] and curve["false_positives"] == [1, 1]
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        decision_curve.net_benefit(y, s, thresholds=[0.0, 0.5])


def test_perfect_model_gains_prevalence_and_useless_one_never_beats_both():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.2).astype(int)
    perfect = decision_curve.net_benefit(y, y * 0.99 + 0.005)
    assert perfect["model"] == pytest.approx([y.mean()] * 99)
    assert decision_curve.useful_range(perfect) == [[0.01, 0.99]]
    noise = decision_curve.net_benefit(y, np.full(400, y.mean()))
    # A constant at the prevalence equals treat-all below it and treat-none above: never better.
    assert decision_curve.useful_range(noise) == []


def test_breast_level_curve_csv_and_plot(tmp_path):
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 4)) < 0.3).astype(int)
    probs = np.clip(labels * 0.5 + rng.random((60, 4)) * 0.5, 0, 1)
    curve = decision_curve.decision_curve(labels, probs)
    assert curve["n"] == 120 and len(curve["threshold"]) == 99
    assert curve["threshold"][0] == 0.01 and curve["threshold"][-1] == 0.99
    rows = list(csv.DictReader(io.StringIO(decision_curve.to_csv(curve))))
    assert len(rows) == 99 and float(rows[49]["threshold"]) == pytest.approx(0.5)
    assert float(rows[49]["model"]) == pytest.approx(curve["model"][49], abs=1e-6)
    path = tmp_path / "dc.png"
    decision_curve.plot_decision_curve(curve, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000
