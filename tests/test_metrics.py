"""Breast-level AUCs and patient-level bootstrap confidence intervals."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mri_keras import constants, metrics


def _cohort(num_patients, seed=0, exams_per_patient=(1, 3), signal=1.5):
    """Random exams with some signal; returns labels (N,4), probs (N,4), patient ids."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(exams_per_patient[0], exams_per_patient[1] + 1, size=num_patients)
    pids = np.repeat([f"p{i:04d}" for i in range(num_patients)], counts)
    n = len(pids)
    labels = (rng.random((n, 4)) < 0.3).astype(np.int64)
    logits = signal * (2 * labels - 1) + rng.normal(size=(n, 4))
    probs = 1 / (1 + np.exp(-logits))
    return labels, probs, pids


def test_breast_level_auc_equals_sklearn_on_pooled_breasts():
    labels, probs, _ = _cohort(40, seed=1)
    for task in constants.TASKS:
        left = constants.LABELS.index(f"left_{task}")
        right = constants.LABELS.index(f"right_{task}")
        pooled_y = np.concatenate([labels[:, left], labels[:, right]])
        pooled_s = np.concatenate([probs[:, left], probs[:, right]])
        expected = sk_metrics.roc_auc_score(pooled_y, pooled_s)
        assert metrics.breast_level_auc(labels, probs, task) == pytest.approx(expected, abs=1e-12)
        assert metrics.auc_with_ci(
            labels, probs, [str(i) for i in range(len(labels))], task, n_bootstrap=5
        )["auc"] == pytest.approx(expected, abs=1e-12)


def test_weighted_auc_matches_sklearn_with_ties_and_repeats():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=200)
    s = np.round(rng.random(200), 1)  # many ties
    w = rng.integers(0, 4, size=200)
    assert metrics.weighted_auc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
    idx = np.repeat(np.arange(200), w)
    assert metrics.weighted_auc(y, s, w) == pytest.approx(
        sk_metrics.roc_auc_score(y[idx], s[idx]), abs=1e-12
    )
    assert np.isnan(metrics.weighted_auc([1, 1], [0.2, 0.3]))


def test_exam_level_auc_uses_max_over_breasts():
    labels = np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    probs = np.array([[0, 0.9, 0, 0.1], [0, 0.2, 0, 0.3], [0, 0.1, 0, 0.6], [0, 0.7, 0, 0.1]])
    # exam scores (max) 0.9, 0.3, 0.6, 0.7 with labels 1, 0, 1, 0 -> 3 of 4 pairs ordered.
    assert metrics.exam_level_auc(labels, probs) == pytest.approx(0.75)
    result = metrics.auc_with_ci(labels, probs, ["a", "b", "c", "d"], level="exam", n_bootstrap=10)
    assert result["auc"] == pytest.approx(0.75)


def test_resampling_is_by_patient():
    pids = np.array(["a", "a", "a", "b", "c", "c", "d", "e", "e", "e", "e"])
    resamples = metrics.patient_bootstrap_indices(pids, n_bootstrap=300, seed=7)
    exam_counts = {p: int((pids == p).sum()) for p in set(pids)}
    saw_partial_cohort = False
    for idx in resamples:
        multiplicity = np.bincount(idx, minlength=len(pids))
        for p in exam_counts:
            m = multiplicity[pids == p]
            # Every exam of a patient appears equally often: the patient moved as a whole.
            assert np.all(m == m[0]), (p, m)
        # As many patients drawn as exist (a patient with k exams adds k exams per draw).
        drawn = sum(multiplicity[pids == p][0] for p in exam_counts)
        assert drawn == len(exam_counts)
        saw_partial_cohort |= len(set(pids[idx])) < len(exam_counts)
    assert saw_partial_cohort  # it really resamples (some patients left out sometimes)


def test_ci_reproducible_with_seed_and_contains_point_estimate():
    labels, probs, pids = _cohort(60, seed=2)
    a = metrics.auc_with_ci(labels, probs, pids, "malignant", n_bootstrap=500, seed=11)
    b = metrics.auc_with_ci(labels, probs, pids, "malignant", n_bootstrap=500, seed=11)
    c = metrics.auc_with_ci(labels, probs, pids, "malignant", n_bootstrap=500, seed=12)
    assert a == b
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])
    assert a["ci_low"] < a["auc"] < a["ci_high"]
    assert a["n_valid_resamples"] == 500 and a["n_bootstrap"] == 500


def test_ci_narrows_as_data_grows():
    # Nested cohorts: the first 30, 120 and 480 patients of one population (AUC about 0.8).
    labels, probs, pids = _cohort(480, seed=5, signal=0.6)
    widths = []
    for n in (30, 120, 480):
        keep = np.isin(pids, [f"p{i:04d}" for i in range(n)])
        r = metrics.auc_with_ci(labels[keep], probs[keep], pids[keep], "benign", n_bootstrap=400)
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    # Roughly 1/sqrt(n): quadrupling the data about halves the width.
    assert 1.4 < widths[0] / widths[1] < 2.9 and 1.4 < widths[1] / widths[2] < 2.9


def test_patient_resampling_widens_ci_when_exams_are_correlated():
    # Each patient has 6 identical exams: 6x the exams but no extra information. A naive
    # exam-level bootstrap would shrink the CI by ~sqrt(6); resampling patients must not.
    labels, probs, pids = _cohort(50, seed=9, exams_per_patient=(1, 1))
    rep = 6
    labels6, probs6 = np.repeat(labels, rep, axis=0), np.repeat(probs, rep, axis=0)
    by_patient = metrics.auc_with_ci(labels6, probs6, np.repeat(pids, rep), n_bootstrap=400)
    by_exam = metrics.auc_with_ci(labels6, probs6, np.arange(len(labels6)), n_bootstrap=400)
    single = metrics.auc_with_ci(labels, probs, pids, n_bootstrap=400)

    def width(r):
        return r["ci_high"] - r["ci_low"]

    assert width(by_patient) == pytest.approx(width(single), rel=0.25)
    assert width(by_exam) < 0.6 * width(by_patient)


def test_single_class_gives_nan_and_errors_are_clear():
    labels = np.zeros((5, 4), np.int64)
    probs = np.full((5, 4), 0.5)
    r = metrics.auc_with_ci(labels, probs, list("abcde"), n_bootstrap=10)
    assert np.isnan(r["auc"]) and np.isnan(r["ci_low"]) and r["n_valid_resamples"] == 0
    assert metrics.format_auc(r) == "n/a"
    with pytest.raises(ValueError, match="one entry per exam"):
        metrics.auc_with_ci(labels, probs, list("abc"))
    with pytest.raises(ValueError, match="n_bootstrap"):
        list(metrics.patient_bootstrap_weights(list("abc"), n_bootstrap=0))


def test_format_auc():
    assert metrics.format_auc({"auc": 0.91234, "ci_low": 0.88, "ci_high": 0.9401}) == (
        "0.912 (0.880-0.940)"
    )


def test_paired_difference_detects_a_better_model_and_not_a_copy():
    labels, good, pids = _cohort(150, seed=4, signal=1.0)
    rng = np.random.default_rng(0)
    worse = 1 / (1 + np.exp(-(0.4 * (2 * labels - 1) + rng.normal(size=labels.shape))))
    d = metrics.paired_auc_difference(labels, good, worse, pids, n_bootstrap=400)
    assert d["difference"] == pytest.approx(
        metrics.breast_level_auc(labels, good) - metrics.breast_level_auc(labels, worse)
    )
    assert d["ci_low"] > 0 and d["p_value"] < 0.01
    same = metrics.paired_auc_difference(labels, good, good, pids, n_bootstrap=100)
    assert same["difference"] == 0 and same["ci_low"] == 0 == same["ci_high"]
    assert same["p_value"] == 1.0
    # For two correlated models the paired CI of the difference is much narrower than either
    # model's own CI (which is why comparisons must be paired).
    close = 1 / (1 + np.exp(-(np.log(good / (1 - good)) + 0.3 * rng.normal(size=labels.shape))))
    d = metrics.paired_auc_difference(labels, good, close, pids, n_bootstrap=400)
    a = metrics.auc_with_ci(labels, good, pids, n_bootstrap=400)
    assert d["ci_high"] - d["ci_low"] < 0.5 * (a["ci_high"] - a["ci_low"])


def _delong_by_definition(y, a, b):
    """DeLong et al. (1988) written from the definition: the O(m n) kernel matrices."""
    from scipy import stats

    comps = []
    for s in (a, b):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = int(y.sum()), int((1 - y).sum())
    s10 = np.cov(np.stack([c[1] for c in comps]))
    s01 = np.cov(np.stack([c[2] for c in comps]))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (comps[1][0] - comps[0][0]) / np.sqrt(var)
    return comps[1][0] - comps[0][0], z, 2 * stats.norm.sf(abs(z))


def test_delong_matches_the_definition_with_ties():
    rng = np.random.default_rng(21)
    y = (rng.random(300) < 0.35).astype(np.int64)
    a = np.round(0.8 * y + rng.normal(size=300), 1)  # rounded: many ties
    b = np.round(0.4 * y + 0.5 * a + rng.normal(size=300), 1)  # correlated with a
    diff, z, p = _delong_by_definition(y, a, b)
    got = metrics.delong_test(y, a, b)
    assert got["difference"] == pytest.approx(diff, abs=1e-12)
    assert got["auc_a"] == pytest.approx(sk_metrics.roc_auc_score(y, a), abs=1e-12)
    assert got["auc_b"] == pytest.approx(sk_metrics.roc_auc_score(y, b), abs=1e-12)
    assert got["z"] == pytest.approx(z, rel=1e-9)
    assert got["p_value"] == pytest.approx(p, rel=1e-9)
    assert got["ci_low"] == pytest.approx(diff - 1.959963984540054 * got["se"], rel=1e-9)
    assert got["ci_low"] < diff < got["ci_high"]
    # Identical models: no difference, no variance, p = 1.
    same = metrics.delong_test(y, a, a)
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["se"] == 0
    assert np.isnan(metrics.delong_test(np.ones(4), a[:4], b[:4])["p_value"])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.delong_test(y, a, b[:-1])


def test_delong_false_positive_rate_is_nominal():
    # Two equally good, correlated models: p < 0.05 in about 5% of cohorts, not more.
    rng = np.random.default_rng(5)
    rejections = 0
    trials = 400
    for _ in range(trials):
        y = (rng.random(120) < 0.4).astype(np.int64)
        shared = rng.normal(size=120)
        a = y + shared + rng.normal(size=120)
        b = y + shared + rng.normal(size=120)
        rejections += metrics.delong_test(y, a, b)["p_value"] < 0.05
    assert 0.02 < rejections / trials < 0.09


def test_paired_difference_reports_delong_consistent_with_the_bootstrap():
    labels, good, pids = _cohort(150, seed=4, signal=1.0)
    rng = np.random.default_rng(0)
    worse = 1 / (1 + np.exp(-(0.4 * (2 * labels - 1) + rng.normal(size=labels.shape))))
    d = metrics.paired_auc_difference(labels, good, worse, pids, n_bootstrap=400)
    y, s_good = metrics.breast_level_arrays(labels, good, "malignant")
    _, s_worse = metrics.breast_level_arrays(labels, worse, "malignant")
    direct = metrics.delong_test(y, s_worse, s_good)  # b - a = good - worse
    assert d["delong"]["difference"] == pytest.approx(d["difference"], abs=1e-12)
    assert d["delong"]["p_value"] == pytest.approx(direct["p_value"])
    assert d["delong"]["p_value"] < 0.01 and d["delong"]["ci_low"] > 0
    # Two standard errors (analytic and bootstrap) of the same difference roughly agree.
    boot_width = d["ci_high"] - d["ci_low"]
    delong_width = d["delong"]["ci_high"] - d["delong"]["ci_low"]
    assert 0.6 < delong_width / boot_width < 1.6


def test_bootstrap_distribution_skips_undefined_resamples_and_intervals():
    pids = np.array(["a", "b", "c"])
    values = metrics.bootstrap_distribution(
        lambda w: np.nan if w[0] == 0 else w[0], pids, np.arange(3), n_bootstrap=200, seed=1
    )
    assert values.shape[1] == 1 and 0 < values.shape[0] < 200
    assert np.all(values >= 1)
    low, high = metrics.percentile_interval(np.arange(101.0), 0.9)
    assert (low, high) == (pytest.approx(5.0), pytest.approx(95.0))
    low, high = metrics.percentile_interval(np.zeros((0, 2)))
    assert np.isnan(low).all() and low.shape == (2,)


def test_partial_auc_is_sklearns_mcclish_and_the_raw_area():
    labels, probs, pids = _cohort(80, seed=6, signal=0.8)
    y, s = metrics.breast_level_arrays(labels, probs, "malignant")
    got = metrics.partial_auc(y, s, 0.2)
    assert got["standardized"] == pytest.approx(sk_metrics.roc_auc_score(y, s, max_fpr=0.2))
    # Raw area, by a fine Riemann sum of the step/linear ROC curve up to fpr 0.2.
    fpr, tpr, _ = sk_metrics.roc_curve(y, s)
    grid = np.linspace(0, 0.2, 200001)
    assert got["raw"] == pytest.approx(np.trapezoid(np.interp(grid, fpr, tpr), grid), abs=1e-6)
    # Perfect and chance-like ranking: 1 and about 0.5 standardised; 0.2 raw when perfect.
    perfect = metrics.partial_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert perfect == {"standardized": 1.0, "raw": pytest.approx(0.2)}
    # Integer weights are repeated samples.
    w = np.random.default_rng(1).integers(0, 3, size=y.size)
    idx = np.repeat(np.arange(y.size), w)
    assert metrics.partial_auc(y, s, 0.2, sample_weight=w)["raw"] == pytest.approx(
        metrics.partial_auc(y[idx], s[idx], 0.2)["raw"]
    )
    r = metrics.partial_auc_with_ci(labels, probs, pids, n_bootstrap=200, seed=2)
    assert r["standardized"]["value"] == pytest.approx(got["standardized"])
    assert r["standardized"]["ci_low"] < r["standardized"]["value"] < r["standardized"]["ci_high"]
    assert 0 <= r["raw"]["ci_low"] < r["raw"]["value"] < r["raw"]["ci_high"] <= 0.2
    assert r["standardization"] == "McClish" and r["min_specificity"] == pytest.approx(0.8)
    assert np.isnan(metrics.partial_auc([1, 1], [0.3, 0.4])["raw"])


def test_weighted_roc_is_sklearns_curve_and_weights_are_repeats():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, size=300)
    s = np.round(rng.random(300), 2)  # ties
    roc = metrics.WeightedRoc(y, s)
    fpr, tpr = roc()
    ref_fpr, ref_tpr, ref_thr = sk_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_array_equal(roc.thresholds, ref_thr)
    w = rng.integers(0, 3, size=300)
    idx = np.repeat(np.arange(300), w)
    rep_fpr, rep_tpr, _ = sk_metrics.roc_curve(y[idx], s[idx], drop_intermediate=False)
    got = np.unique(np.round(np.stack(roc(w), 1), 12), axis=0)
    want = np.unique(np.round(np.stack([rep_fpr, rep_tpr], 1), 12), axis=0)
    np.testing.assert_allclose(got, want)
    assert roc(y == 0) is None  # only negatives left
