"""Left-right flip test-time augmentation (mri_keras.tta) on every scoring path: predict_split
over records (Keras model and export), the Predictor on raw phases (Keras and export), evaluate
and predict's settings."""

import json
import os

import eval_fixtures
import numpy as np
import pytest
import tensorflow as tf

from mri_keras import constants, evaluate, export, inference, tta, validation


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    records = str(root / "records")
    exams = eval_fixtures.write_records(records, {"val": 6, "test": 6})
    model_dir = str(root / "run")
    model = eval_fixtures.make_model_dir(model_dir, input_variant="t2-t0", seed=4)
    return {"records": records, "exams": exams, "model_dir": model_dir, "model": model}


def test_mirror_and_sides_back():
    volume = tf.reshape(tf.range(2 * 3 * 4 * 5, dtype=tf.float32), (1, 2, 3, 5, 4))
    mirrored = tta.mirror(volume)
    np.testing.assert_array_equal(mirrored.numpy(), volume.numpy()[:, :, :, ::-1, :])
    one_channel = volume[..., :1]
    np.testing.assert_array_equal(
        tta.mirror(one_channel).numpy(), one_channel.numpy()[..., ::-1, :]
    )
    probs = tf.constant([[0.1, 0.2, 0.3, 0.4]])  # left_benign, left_malignant, right_b, right_m
    np.testing.assert_allclose(tta.sides_back(probs).numpy(), [[0.3, 0.4, 0.1, 0.2]])
    assert constants.LABELS == ("left_benign", "left_malignant", "right_benign", "right_malignant")
    with pytest.raises(ValueError, match="tta must be one of"):
        tta.check_mode("crop")


def _plain_and_mirrored(model, records):
    """Per exam: the model's positive probabilities on the preprocessed exam and its mirror,
    computed here with numpy flips (independent of mri_keras.tta)."""
    predictor = inference.load_predictor(os.path.dirname(records) + "/run", "keras")
    ds = validation.validation_dataset(records, "test", predictor.input_config)
    plain, mirrored, ids = [], [], []
    for volume, _, meta in ds:
        for i in range(volume.shape[0]):
            v = volume[i : i + 1]
            for target, x in ((plain, v), (mirrored, v.numpy()[:, :, :, ::-1])):
                out = model(tf.constant(x), training=False)
                target.append([float(out[k].numpy()[0, 1]) for k in constants.LABELS])
        ids.extend(e.decode() for e in meta["exam_id"].numpy())
    return ids, np.array(plain), np.array(mirrored)


def test_flip_averages_the_exam_and_its_mirror_with_sides_swapped(setup):
    ids, plain, mirrored = _plain_and_mirrored(setup["model"], setup["records"])
    # The mirrored exam's left outputs are the exam's right breast.
    swapped = mirrored[:, [2, 3, 0, 1]]
    expected = (plain + swapped) / 2
    keras_pred = inference.load_predictor(setup["model_dir"], "keras")
    none = validation.predict_split(keras_pred, setup["records"], "test")
    flip = validation.predict_split(keras_pred, setup["records"], "test", tta_mode="flip")
    assert list(flip.exam_ids) == ids
    np.testing.assert_allclose(none.probs, plain, atol=1e-5)
    np.testing.assert_allclose(flip.probs, expected, atol=1e-5)
    assert np.abs(flip.probs - none.probs).max() > 1e-4  # the mirror really is another input
    # The export's flip signatures give the same numbers from serialized records.
    export_pred = inference.load_predictor(setup["model_dir"], "export")
    from_export = validation.predict_split(export_pred, setup["records"], "test", tta_mode="flip")
    assert from_export.exam_ids == flip.exam_ids
    np.testing.assert_allclose(from_export.probs, flip.probs, atol=1e-5)
    # A Predictor made for flip uses it without being told again.
    flip_pred = inference.load_predictor(setup["model_dir"], "export", tta_mode="flip")
    np.testing.assert_allclose(
        validation.predict_split(flip_pred, setup["records"], "test").probs, flip.probs, atol=1e-5
    )


def test_flip_tta_is_mirror_equivariant_on_raw_phases(setup):
    """Scoring a mirrored exam with flip TTA gives the original's figures, sides swapped: the
    averaging treats both breasts alike. Holds for the Keras model and for the export."""
    exam = setup["exams"]["test"][1]
    phases = {p: exam["volumes"][p] for p in ("t0", "t2")}
    mirrored = {p: v[:, :, ::-1].copy() for p, v in phases.items()}
    results = {}
    for fmt in ("keras", "export"):
        predictor = inference.load_predictor(setup["model_dir"], fmt, tta_mode="flip")
        probs, probs_of_mirror = predictor(phases), predictor(mirrored)
        np.testing.assert_allclose(probs_of_mirror, probs[[2, 3, 0, 1]], atol=1e-5)
        results[fmt] = probs
        plain = inference.load_predictor(setup["model_dir"], fmt)(phases)
        assert np.abs(plain - probs).max() > 1e-4
    np.testing.assert_allclose(results["keras"], results["export"], atol=1e-5)
    loaded = export.load_exported(os.path.join(setup["model_dir"], "export"))
    np.testing.assert_allclose(loaded.predict_phases(phases, "flip"), results["export"], atol=1e-5)


def test_evaluate_records_the_mode(setup, tmp_path):
    summaries = {}
    for mode in ("none", "flip"):
        out = str(tmp_path / mode)
        summaries[mode] = evaluate.evaluate(
            evaluate.EvalConfig(
                model=setup["model_dir"],
                data_dir=setup["records"],
                output_dir=out,
                n_bootstrap=20,
                tta=mode,
            )
        )
        with open(os.path.join(out, "metrics.json")) as f:
            assert json.load(f)["tta"] == mode
    with pytest.raises(ValueError, match="tta must be one of"):
        evaluate.EvalConfig(model="m", data_dir="d", output_dir="o", tta="flips")


def test_an_export_without_flip_signatures_is_refused_clearly():
    class Old:
        signatures = {"serving_default": object(), "serving_example": object()}

    assert export.signature(Old(), "/runs/a/export", "serving_example") is not None
    with pytest.raises(ValueError, match=r"/runs/a/export has no serving_example_flip.*export"):
        export.signature(Old(), "/runs/a/export", "serving_example", "flip")
