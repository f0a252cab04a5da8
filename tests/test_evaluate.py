"""mri_keras.evaluate: predictions.csv / metrics.json / roc.png from records and a model."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import eval_fixtures
import numpy as np
import pytest

from mri_keras import constants, evaluate, inference, metrics, predictions_io


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    records = str(root / "records")
    exams = eval_fixtures.write_records(records)
    model_dir = str(root / "run")
    model = eval_fixtures.make_model_dir(
        model_dir, input_variant="t3-t0", normalization="percentile"
    )
    return {
        "root": root,
        "records": records,
        "exams": exams,
        "model_dir": model_dir,
        "model": model,
    }


def test_evaluate_writes_breast_rows_metrics_and_roc(setup, tmp_path):
    out = str(tmp_path / "out")
    summary = evaluate.evaluate(
        evaluate.EvalConfig(
            model=setup["model_dir"],
            data_dir=setup["records"],
            split="test",
            output_dir=out,
            n_bootstrap=200,
            seed=3,
        )
    )
    assert summary["model_format"] == "export"
    assert summary["input_variant"] == "t3-t0"  # from the run's saved config, not a default
    with open(os.path.join(out, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    exams = setup["exams"]["test"]
    assert len(rows) == 2 * len(exams)
    assert list(rows[0]) == list(predictions_io.COLUMNS)
    assert [r["side"] for r in rows[:2]] == ["left", "right"]
    assert rows[0]["exam_id"] == exams[0]["exam_id"]
    assert rows[0]["patient_id"] == exams[0]["patient_id"]
    assert int(rows[1]["malignant_label"]) == exams[0]["labels"][3]
    pred = predictions_io.read_predictions(out)
    saved = json.load(open(os.path.join(out, "metrics.json")))
    for task in constants.TASKS:
        auc = saved["breast_level"][task]
        assert auc["auc"] == pytest.approx(metrics.breast_level_auc(pred.labels, pred.probs, task))
        assert auc["n_bootstrap"] == 200 and auc["seed"] == 3
        assert auc["ci_low"] <= auc["auc"] <= auc["ci_high"]
    assert saved["exam_level"]["malignant"]["auc"] == pytest.approx(
        metrics.exam_level_auc(pred.labels, pred.probs)
    )
    assert saved["counts"]["exams"] == len(exams)
    assert saved["counts"]["breasts"] == 2 * len(exams)
    assert saved["counts"]["patients"] == len({e["patient_id"] for e in exams})
    assert saved["counts"]["malignant_breasts"] == sum(
        e["labels"][1] + e["labels"][3] for e in exams
    )
    assert saved["bootstrap"]["resample_unit"] == "patient"
    assert os.path.getsize(os.path.join(out, "roc.png")) > 1000


def test_export_keras_and_training_code_paths_agree(setup, tmp_path):
    from mri_keras import validation

    export_dir = os.path.join(setup["model_dir"], "export")
    by_path = {}
    for name, model, fmt in (
        ("dir", setup["model_dir"], "auto"),
        ("export", export_dir, "auto"),
        ("keras", setup["model_dir"], "keras"),
    ):
        predictor = inference.load_predictor(model, fmt)
        by_path[name] = validation.predict_split(predictor, setup["records"], "val")
    assert inference.load_predictor(export_dir).location.keras_path.endswith("best.keras")
    ref = by_path["dir"]
    for other in ("export", "keras"):
        assert by_path[other].exam_ids == ref.exam_ids
        np.testing.assert_allclose(by_path[other].probs, ref.probs, atol=1e-5)
    # The training loop's own prediction (make_dataset + the Keras model) agrees too.
    predictor = inference.load_predictor(setup["model_dir"])
    scored = validation.predict_split(
        setup["model"], setup["records"], "val", predictor.input_config
    )
    ids, labels, probs = list(scored.exam_ids), scored.labels, scored.probs
    order = [ids.index(e) for e in ref.exam_ids]
    np.testing.assert_allclose(np.asarray(probs)[order], ref.probs, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(labels)[order], ref.labels)
    assert len(set(np.round(ref.probs[:, 1], 6))) > 1  # exams really differ


def test_clear_errors(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at"):
        inference.load_predictor(str(tmp_path))
    (tmp_path / "empty").mkdir()
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("not records")
    for data_dir, error, match in (
        (tmp_path / "absent", FileNotFoundError, "absent' does not exist"),
        (tmp_path / "empty", ValueError, "is empty; convert DICOM exams"),
        (stray, FileNotFoundError, "manifest.json"),
    ):
        with pytest.raises(error, match=match):
            evaluate.evaluate(
                evaluate.EvalConfig(
                    model=setup["model_dir"],
                    data_dir=str(data_dir),
                    output_dir=str(tmp_path / "o"),
                    n_bootstrap=5,
                )
            )
    with pytest.raises(ValueError, match="split"):
        evaluate.EvalConfig(model="m", data_dir="d", output_dir="o", split="dev")
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(ValueError, match="output_dir .*a_file' exists and is not a directory"):
        evaluate.evaluate(
            evaluate.EvalConfig(
                model=setup["model_dir"],
                data_dir=setup["records"],
                output_dir=str(tmp_path / "a_file"),
                n_bootstrap=5,
            )
        )
    assert (tmp_path / "a_file").read_text() == "keep"


def test_cli(setup, tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [
        sys.executable,
        "-m",
        "mri_keras.evaluate",
        f"--model={setup['model_dir']}/export",
        f"--data_dir={setup['records']}",
        "--split=val",
        f"--output_dir={out}",
        "--n_bootstrap=100",
        "--seed=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "breast-level malignant AUC" in proc.stdout
    saved = json.load(open(out / "metrics.json"))
    assert saved["split"] == "val" and saved["bootstrap"]["seed"] == 1
    stray = subprocess.run(cmd + ["stray"], capture_output=True, text=True, env=env, timeout=300)
    assert stray.returncode != 0
    # --model naming a folder without a model (here the records): a message, no traceback.
    bad = subprocess.run(
        cmd + [f"--model={setup['records']}"], capture_output=True, text=True, env=env, timeout=300
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"mri_keras.evaluate: error: No model at '{setup['records']}'" in bad.stderr
    # Several splits with the model loaded once: one sub-directory per split, the same
    # figures as one split at a time.
    both = subprocess.run(
        cmd + ["--split=val,test", f"--output_dir={tmp_path / 'both'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert both.returncode == 0, both.stderr[-2000:]
    for split in ("val", "test"):
        again = json.load(open(tmp_path / "both" / split / "metrics.json"))
        assert again["split"] == split and f" {split} breast-level malignant AUC" in both.stdout
    val_again = json.load(open(tmp_path / "both" / "val" / "metrics.json"))
    assert val_again["breast_level"] == saved["breast_level"]
    typo = subprocess.run(
        cmd + ["--split=val,tset"], capture_output=True, text=True, env=env, timeout=300
    )
    assert typo.returncode != 0 and "split must be" in typo.stderr


def test_val_threshold_on_test_calibration_and_clinical_outputs(setup, tmp_path):
    import shutil

    from mri_keras import calibration, operating_points

    model_dir = str(tmp_path / "run")  # a copy: --calibrate writes calibration.json into it
    shutil.copytree(setup["model_dir"], model_dir)
    configs = [
        evaluate.EvalConfig(
            model=model_dir,
            data_dir=setup["records"],
            split=split,
            output_dir=str(tmp_path / split),
            n_bootstrap=50,
            operating_point="sensitivity:0.5",
            calibrate=True,
        )
        for split in ("test", "val")  # val is evaluated first whatever the order
    ]
    test, val = evaluate.evaluate_splits(configs)
    assert (test["split"], val["split"]) == ("test", "val")
    # calibration.json beside best.keras, fitted on val.
    calib = calibration.load_calibration(os.path.join(model_dir, "calibration.json"))
    assert calib.fitted_on == {"split": "val", "n_breasts": 12, "n_exams": 6}
    assert test["calibrated"]["temperature"] == pytest.approx(calib.temperature)
    assert test["calibrated"]["in_sample"] is False and val["calibrated"]["in_sample"] is True
    # The threshold chosen on val is the one applied to test, unchanged.
    val_pred = predictions_io.read_predictions(str(tmp_path / "val"))
    test_pred = predictions_io.read_predictions(str(tmp_path / "test"))
    y_val, s_val = metrics.breast_level_arrays(val_pred.labels, val_pred.probs, "malignant")
    threshold = operating_points.choose_threshold(
        y_val, s_val, operating_points.OperatingPoint("sensitivity", 0.5)
    )
    chosen = test["validation_threshold"]["malignant"]
    assert chosen["threshold"] == pytest.approx(threshold, abs=1e-8)  # CSV keeps 9 digits
    assert val["validation_threshold"]["malignant"]["threshold"] == chosen["threshold"]
    assert chosen["val"]["sensitivity"] >= 0.5
    y, s = metrics.breast_level_arrays(test_pred.labels, test_pred.probs, "malignant")
    assert chosen["test"]["tp"] == int(((s >= threshold) & (y == 1)).sum())
    assert chosen["test"]["fp"] == int(((s >= threshold) & (y == 0)).sum())
    # Calibrated figures are those of the calibrated probabilities.
    calibrated = calibration.apply_temperature(test_pred.probs, calib)
    expected = calibration.calibration_summary(test_pred.labels, calibrated)
    assert test["calibrated"]["calibration"]["malignant"]["ece"] == pytest.approx(
        expected["malignant"]["ece"]
    )
    # Clinical figures in metrics.json next to the old keys (backward compatible).
    saved = json.load(open(tmp_path / "test" / "metrics.json"))
    for key in ("breast_level", "exam_level", "counts", "bootstrap", "partial_auc"):
        assert key in saved
    assert set(saved["operating_points"]["malignant"]["sensitivity_at_specificity"]) == {
        "0.80",
        "0.90",
        "0.95",
    }
    assert saved["calibration"]["bins"]["n_bins"] == 10
    for name in (
        "reliability.png",
        "reliability_calibrated.png",
        "decision_curve.png",
        "decision_curve.csv",
    ):
        assert os.path.getsize(tmp_path / "test" / name) > 500, name
    page = (tmp_path / "test" / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 4
    assert not any(e["exam_id"] in page for e in setup["exams"]["test"])
    # Only test: threshold-free figures, and the reason for no threshold.
    only = evaluate.evaluate(
        evaluate.EvalConfig(
            model=model_dir,
            data_dir=setup["records"],
            output_dir=str(tmp_path / "only"),
            n_bootstrap=20,
        )
    )
    assert (
        "validation_threshold" not in only
        and "--split=val,test" in (only["validation_threshold_note"])
    )
    with pytest.raises(ValueError, match="validation split"):
        evaluate.evaluate_splits([dataclasses.replace(configs[0], output_dir=str(tmp_path / "x"))])


def test_cli_prints_the_clinical_figures(setup, tmp_path):
    import shutil

    model_dir = str(tmp_path / "run")
    shutil.copytree(setup["model_dir"], model_dir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [
        sys.executable,
        "-m",
        "mri_keras.evaluate",
        f"--model={model_dir}",
        f"--data_dir={setup['records']}",
        "--split=val,test",
        f"--output_dir={tmp_path / 'out'}",
        "--n_bootstrap=30",
        "--operating_point=specificity:0.5",
        "--calibrate",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for text in (
        "test breast-level malignant partial AUC (specificity >= 0.80)",
        "test malignant sensitivity at specificity >= 0.90",
        "chosen on val at specificity:0.5",
        "  test: sensitivity",
        "calibrated (T = ",
        "decision curve (malignant)",
        f"wrote {os.path.join(model_dir, 'calibration.json')}",
        "report.html",
    ):
        assert text in out, text
    bad = subprocess.run(
        cmd[:5] + ["--split=test", "--calibrate", f"--output_dir={tmp_path / 'b'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--calibrate fits the temperatures on the validation split" in bad.stderr
    typo = subprocess.run(
        cmd + ["--operating_point=recall:0.9"], capture_output=True, text=True, env=env, timeout=300
    )
    assert typo.returncode != 0 and "operating point metric must be one of" in typo.stderr
