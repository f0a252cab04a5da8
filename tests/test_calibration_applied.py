"""Temperature scaling saved with a model (evaluate --calibrate) and applied where the model is
used: the export's signatures, predict (export and Keras), later evaluations; stale files
ignored."""

import json
import os
import time
import types

import eval_fixtures
import numpy as np
import pytest
import tensorflow as tf

from mri_keras import calibration, evaluate, export, inference, input_pipeline, predict, validation


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    records = str(root / "records")
    exams = eval_fixtures.write_records(records, {"val": 10, "test": 6})
    model_dir = str(root / "run")
    eval_fixtures.make_model_dir(model_dir, input_variant="t2-t0", seed=7)
    raw = validation.predict_split(inference.load_predictor(model_dir, "keras"), records, "test")
    configs = [
        evaluate.EvalConfig(
            model=model_dir,
            data_dir=records,
            split=split,
            output_dir=str(root / "eval" / split),
            n_bootstrap=20,
            calibrate=True,
        )
        for split in ("val", "test")
    ]
    summaries = evaluate.evaluate_splits(configs)
    return {
        "root": root,
        "records": records,
        "exams": exams,
        "model_dir": model_dir,
        "raw": raw,
        "summaries": summaries,
    }


def test_calibrate_saves_the_temperatures_and_builds_them_into_the_export(calibrated_run):
    model_dir = calibrated_run["model_dir"]
    saved = calibration.load_calibration(model_dir)
    meta = export.read_metadata(os.path.join(model_dir, "export"))
    assert meta["calibration"] == saved.to_dict()
    assert meta["signatures"] == list(export.SIGNATURES)
    assert meta["input_config"]["input_variant"] == "t2-t0"
    raw = calibrated_run["raw"]
    # The export's serving_example: probabilities scaled, the model's own kept beside them.
    loaded = export.load_exported(os.path.join(model_dir, "export"))
    records = list(input_pipeline.serialized_records(calibrated_run["records"], "test", "t2-t0"))
    out = loaded.saved.signatures["serving_example"](examples=tf.stack(records))
    np.testing.assert_allclose(out["probabilities_uncalibrated"].numpy(), raw.probs, atol=1e-5)
    np.testing.assert_allclose(
        out["probabilities"].numpy(), calibration.apply_temperature(raw.probs, saved), atol=1e-5
    )
    assert not np.allclose(out["probabilities"].numpy(), raw.probs, atol=1e-4)
    # Evaluation of the recalibrated export still scores the model's own probabilities.
    again = validation.predict_split(
        inference.load_predictor(model_dir, "export"), calibrated_run["records"], "test"
    )
    np.testing.assert_allclose(again.probs, raw.probs, atol=1e-5)
    test_summary = calibrated_run["summaries"][1]
    assert test_summary["calibrated"]["temperature"] == saved.temperature
    assert test_summary["calibrated"]["in_sample"] is False


def test_predict_applies_the_saved_calibration_with_either_format(calibrated_run):
    model_dir = calibrated_run["model_dir"]
    saved = calibration.load_calibration(model_dir)
    exam = calibrated_run["exams"]["test"][2]
    fake = types.SimpleNamespace(volumes=exam["volumes"], spacing=(3.0, 1.0, 1.0))
    results = {}
    for fmt in ("export", "keras"):
        predictor = inference.load_predictor(model_dir, fmt)
        assert predictor.calibration == saved
        config = predict.PredictConfig(model=model_dir, exam_dir="", model_format=fmt)
        result = predict.score_exam(config, predictor, fake)
        assert result["calibrated"] is True and result["temperature"] == saved.temperature
        raw = predictor({p: exam["volumes"][p] for p in predictor.phases})
        expected = calibration.apply_temperature(raw, saved)
        got = [result[s][t] for s, t in (("left", "benign"), ("left", "malignant"))]
        got += [result[s][t] for s, t in (("right", "benign"), ("right", "malignant"))]
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert result["uncalibrated"]["left"]["malignant"] == pytest.approx(raw[1], abs=1e-6)
        results[fmt] = got
    np.testing.assert_allclose(results["export"], results["keras"], atol=1e-5)


def test_later_evaluations_report_the_saved_calibration(calibrated_run, tmp_path):
    out = str(tmp_path / "test")
    summary = evaluate.evaluate(
        evaluate.EvalConfig(
            model=calibrated_run["model_dir"],
            data_dir=calibrated_run["records"],
            output_dir=out,
            n_bootstrap=20,
            model_format="keras",
        )
    )
    saved = calibration.load_calibration(calibrated_run["model_dir"])
    assert summary["calibrated"]["temperature"] == saved.temperature
    assert summary["calibrated"]["file"].endswith("calibration.json")
    with open(os.path.join(out, "metrics.json")) as f:
        assert "calibrated" in json.load(f)


def test_a_calibration_older_than_the_weights_is_ignored(tmp_path):
    model_dir = str(tmp_path / "run")
    eval_fixtures.make_model_dir(model_dir, export=False)
    fitted = calibration.Calibration(
        temperature={"benign": 1.5, "malignant": 0.8}, fitted_on={"split": "val"}, nll={}
    )
    calibration.save_calibration(os.path.join(model_dir, calibration.FILENAME), fitted)
    assert (
        inference.load_predictor(model_dir, "keras").calibration.temperature == fitted.temperature
    )
    later = time.time() + 10
    os.utime(os.path.join(model_dir, "best.keras"), (later, later))  # retrained since
    assert inference.load_predictor(model_dir, "keras").calibration is None
