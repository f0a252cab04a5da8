"""report.html: one self-contained page, rendered in headless Chromium with every image."""

import os
import re

import browser
import numpy as np
import pytest

from mri_keras import (
    calibration,
    decision_curve,
    evaluate,
    metrics,
    operating_points,
    predictions_io,
    report,
)

needs_browser = pytest.mark.skipif(
    browser.chromium() is None,
    reason="no headless browser: /usr/bin/chromium is not installed "
    "(apt-get install chromium; .ci/run installs it where apt is available)",
)


def _predictions(n, seed, prefix):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < 0.3).astype(np.int64)
    probs = 1 / (1 + np.exp(-(2.0 * (2 * labels - 1) + rng.normal(size=(n, 4)))))
    return predictions_io.Predictions(
        [f"{prefix}exam{i:03d}" for i in range(n)],
        [f"{prefix}patient{i // 2:03d}" for i in range(n)],
        labels,
        probs,
    )


@pytest.fixture
def evaluation_dir(tmp_path):
    """An evaluation directory with every section and figure of the page."""
    val, test = _predictions(60, 1, "v"), _predictions(80, 2, "t")
    summary = {"name": "demo <model>", "split": "test", **evaluate.summarize(test, 100)}
    summary["partial_auc"] = {
        t: metrics.partial_auc_with_ci(test.labels, test.probs, test.patient_ids, t, n_bootstrap=50)
        for t in ("malignant", "benign")
    }
    summary["operating_points"] = {
        t: operating_points.threshold_free_points(
            test.labels, test.probs, test.patient_ids, t, n_bootstrap=50
        )
        for t in ("malignant", "benign")
    }
    summary["validation_threshold"] = {
        "malignant": operating_points.validation_threshold(val, test, n_bootstrap=50)
    }
    summary["calibration"] = calibration.calibration_summary(test.labels, test.probs)
    calib = calibration.fit_temperature(val.labels, val.probs, split="val")
    calibrated = calibration.apply_temperature(test.probs, calib)
    summary["calibrated"] = {
        "temperature": calib.temperature,
        "fitted_on": calib.fitted_on,
        "calibration": calibration.calibration_summary(test.labels, calibrated),
    }
    curve = decision_curve.decision_curve(test.labels, test.probs)
    summary["decision_curve"] = {
        "task": "malignant",
        "prevalence": curve["prevalence"],
        "useful_range": decision_curve.useful_range(curve),
    }
    out = str(tmp_path / "eval")
    evaluate.write_report(out, test, summary)
    calibration.plot_reliability(test.labels, test.probs, os.path.join(out, "reliability.png"))
    decision_curve.plot_decision_curve(curve, os.path.join(out, "decision_curve.png"))
    return out, summary, test


def test_evaluation_page_holds_every_section_and_no_identifier(evaluation_dir):
    out, summary, test = evaluation_dir
    path = report.write_evaluation_report(out, summary)
    text = open(path, encoding="utf-8").read()
    for heading in ("Discrimination", "Operating points", "Calibration", "Decision curve"):
        assert f"<h2>{heading}</h2>" in text
    assert metrics.format_auc(summary["breast_level"]["malignant"]).split(" ")[0] in text
    assert "McClish-standardised" in text and "chosen on val at sensitivity:0.95" in text
    assert "ECE calibrated" in text and "10 equal-width bins" in text
    assert "demo &lt;model&gt;" in text  # escaped
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) == 3
    # Self-contained: no external resource of any kind.
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "http" not in text
    assert not any(i in text for i in set(test.exam_ids) | set(test.patient_ids))


def test_experiment_page_renders_markdown_tables():
    md = (
        "Breast-level AUC on the test split\n\n| Image | Benign AUC | Malignant AUC |\n"
        "|---|---|---|\n| t0 | 0.61 (0.5-0.7) | 0.70 |\n| *Ensembles* | | |\n\n"
        "- Mean of a <b>: +0.010\n"
    )
    html = report.markdown_to_html(md)
    assert "<th>Image</th>" in html and "<td>t0</td>" in html
    assert "<td><i>Ensembles</i></td>" in html and "<li>Mean of a &lt;b&gt;: +0.010</li>" in html
    assert "|---" not in html and "<p>Breast-level AUC on the test split</p>" in html


@needs_browser
def test_pages_render_in_chromium_with_every_image(evaluation_dir, tmp_path):
    out, summary, _ = evaluation_dir
    path = report.write_evaluation_report(out, summary)
    assert browser.rendered_images(path, str(tmp_path)) == (3, 3)
    page = report.write_experiment_report(
        str(tmp_path),
        "Table 1",
        [("Table 1", "| a | b |\n|---|---|\n| 1 | 2 |\n")],
        [("ROC", os.path.join(out, "roc.png"))],
    )
    assert browser.rendered_images(page, str(tmp_path)) == (1, 1)
    # The check can fail: a corrupt image is not counted as loaded.
    broken = tmp_path / "broken.html"
    text = open(page, encoding="utf-8").read()
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/=]{20}", "base64,AAAA", text, count=1))
    assert browser.rendered_images(str(broken), str(tmp_path)) == (1, 0)


def test_non_png_figures_are_refused(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="fake.png is not a PNG"):
        report.png_data_uri(str(fake))
