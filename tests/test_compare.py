"""mri_keras.compare: paired AUC comparison of two prediction files (DeLong + bootstrap)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mri_keras import compare, metrics, predictions_io


def _write(path, labels, probs, exam_ids=None, patients=None):
    n = len(labels)
    exam_ids = exam_ids or [f"ex{i:03d}" for i in range(n)]
    patients = patients or [f"pt{i // 2:03d}" for i in range(n)]
    pred = predictions_io.Predictions(exam_ids, patients, labels, probs)
    predictions_io.write_predictions(str(path), pred)
    return pred


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((150, 4)) < 0.3).astype(np.int64)
    good = 1 / (1 + np.exp(-(1.2 * (2 * labels - 1) + rng.normal(size=labels.shape))))
    weak = 1 / (1 + np.exp(-(0.5 * (2 * labels - 1) + rng.normal(size=labels.shape))))
    a = _write(tmp_path / "a" / "test" / "predictions.csv", labels, weak)
    # B written in another exam order: matched by exam id, not by row.
    order = rng.permutation(150)
    b = _write(
        tmp_path / "b" / "test" / "predictions.csv",
        labels[order],
        good[order],
        [a.exam_ids[i] for i in order],
        [a.patient_ids[i] for i in order],
    )
    return tmp_path, a, b


def test_compare_b_minus_a_with_delong_and_bootstrap(pair):
    root, a, b = pair
    out = root / "cmp.json"
    result = compare.compare(
        compare.CompareConfig(
            predictions=(str(root / "a" / "test"), str(root / "b" / "test" / "predictions.csv")),
            n_bootstrap=300,
            seed=2,
            output=str(out),
        )
    )
    b_aligned = b.reindex(a.exam_ids)
    auc_a = metrics.breast_level_auc(a.labels, a.probs)
    auc_b = metrics.breast_level_auc(b.labels, b.probs)
    assert result["auc_a"]["auc"] == pytest.approx(auc_a)
    assert result["auc_b"]["auc"] == pytest.approx(auc_b)
    assert result["difference"] == pytest.approx(auc_b - auc_a)
    y, s_a = metrics.breast_level_arrays(a.labels, a.probs, "malignant")
    _, s_b = metrics.breast_level_arrays(b_aligned.labels, b_aligned.probs, "malignant")
    delong = metrics.delong_test(y, s_a, s_b)
    assert result["delong"]["z"] == pytest.approx(delong["z"])
    assert result["delong"]["p_value"] == pytest.approx(delong["p_value"])
    assert result["delong"]["p_value"] < 0.01 and result["delong"]["z"] > 0
    paired = metrics.paired_auc_difference(
        a.labels, b_aligned.probs, a.probs, a.patient_ids, n_bootstrap=300, seed=2
    )
    assert result["bootstrap"]["ci_low"] == paired["ci_low"] > 0
    assert result["bootstrap"]["p_value"] == paired["p_value"]
    saved = json.load(open(out))
    assert saved["a"]["name"] == "a/test" and saved["b"]["name"] == "b/test"
    assert saved["difference"] == pytest.approx(result["difference"])
    text = compare.format_comparison(result, "a/test", "b/test")
    assert "DeLong" in text and "patient bootstrap" in text and "B - A" in text
    # No patient or exam identifier in the outputs.
    blob = out.read_text() + text
    assert not any(p in blob for p in set(a.patient_ids) | set(a.exam_ids))


def test_a_model_against_itself(pair):
    root, a, _ = pair
    r = compare.compare_predictions(a, a, n_bootstrap=50)
    assert r["difference"] == 0 and r["delong"]["p_value"] == 1.0
    assert r["bootstrap"]["p_value"] == 1.0


def test_refuses_different_exams_or_labels(pair):
    root, a, b = pair
    path_a = str(root / "a" / "test" / "predictions.csv")
    fewer = root / "fewer.csv"
    _write(fewer, a.labels[1:], a.probs[1:], list(a.exam_ids[1:]), list(a.patient_ids[1:]))
    cases = [
        ((path_a, str(fewer)), f"{fewer} lacks exam ex000 of {path_a}"),
        ((str(fewer), path_a), f"{fewer} lacks exam ex000 of {path_a}"),
    ]
    relabelled = a.labels.copy()
    relabelled[7, 1] = 1 - relabelled[7, 1]
    other = root / "other_labels.csv"
    _write(other, relabelled, a.probs, list(a.exam_ids), list(a.patient_ids))
    cases.append(((path_a, str(other)), f"{other}: labels of exam ex007 \\(left_malignant\\)"))
    for paths, match in cases:
        with pytest.raises(ValueError, match=match):
            compare.compare(compare.CompareConfig(predictions=paths, n_bootstrap=5))
    with pytest.raises(ValueError, match="exactly two"):
        compare.CompareConfig(predictions=(path_a,))


def test_cli(pair):
    root, _, _ = pair
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [
        sys.executable,
        "-m",
        "mri_keras.compare",
        f"--predictions={root / 'a' / 'test'}",
        f"--predictions={root / 'b' / 'test'}",
        "--n_bootstrap=200",
        "--task=benign",
        f"--output={root / 'c.json'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "breast-level benign AUC" in proc.stdout and "DeLong" in proc.stdout
    assert json.load(open(root / "c.json"))["task"] == "benign"
    bad = subprocess.run(
        cmd[:3] + [f"--predictions={root / 'absent.csv'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "mri_keras.compare: error:" in bad.stderr
