"""mri_keras.predict and mri_keras.heatmap on synthetic DICOM exams.

One tiny model is trained for one epoch with train_lib on a converted synthetic cohort whose
exams use several acquisition geometries, so "predict from the DICOM folder" and "evaluate
from the TFRecord" must agree after reorientation.
"""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mri_keras import heatmap, inference, predict, validation
from tfrecords_tools.records import Records

VARIANTS = ("standard", "reversed_cols", "descending_slices", "sagittal")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mri_keras import config as config_lib
    from mri_keras import train_lib
    from tfrecords_tools import convert_lib, synthetic

    root = tmp_path_factory.mktemp("predict")
    cohort = synthetic.generate_cohort(
        str(root / "cohort"), 4, seed=3, slices=6, rows=32, cols=40, variants=VARIANTS, workers=1
    )
    records = str(root / "records")
    convert_lib.convert(
        convert_lib.ConvertConfig(
            dicom_root=cohort.root,
            labels=cohort.labels_csv,
            output_dir=records,
            num_workers=1,
            progress=False,
        ),
        stream=open(os.devnull, "w"),
    )
    with open(str(root / "records_private" / "id_map.csv")) as f:
        folder_of = {r["exam_id"]: r["exam"] for r in csv.DictReader(f)}
    model_dir = str(root / "run")
    train_lib.train(
        train_lib.TrainConfig(
            data_dir=records,
            model_dir=model_dir,
            epochs=1,
            learning_rate=1e-3,
            verbose=0,
            model=config_lib.ModelConfig(
                width=4, blocks_per_stage=(1, 1, 1, 1), channels_3d=8, stem_kernel=3
            ),
            input=config_lib.InputConfig(input_variant="t2sub"),
        )
    )
    variant_of = {e.exam: e.variant for e in cohort.exams}
    return {
        "root": root,
        "cohort": cohort,
        "records": records,
        "folder_of": folder_of,
        "model_dir": model_dir,
        "export": os.path.join(model_dir, "export"),
        "variant_of": variant_of,
    }


def _record_predictions(run):
    predictor = inference.load_predictor(run["export"])
    out = {}
    for split in ("train", "val", "test"):
        p = validation.predict_split(predictor, run["records"], split)
        out.update({e: p.probs[i] for i, e in enumerate(p.exam_ids)})
    return predictor, out


@pytest.mark.slow
def test_predict_on_dicom_equals_evaluate_on_records(run):
    predictor, from_records = _record_predictions(run)
    assert set(from_records) == set(run["folder_of"])
    seen_variants = set()
    for exam_id, folder in run["folder_of"].items():
        result = predict.predict_exam(
            predict.PredictConfig(
                model=run["export"], exam_dir=os.path.join(run["cohort"].root, folder)
            ),
            predictor=predictor,
        )
        got = [
            result[side][task]
            for side, task in (
                ("left", "benign"),
                ("left", "malignant"),
                ("right", "benign"),
                ("right", "malignant"),
            )
        ]
        np.testing.assert_allclose(got, from_records[exam_id], atol=1e-6, err_msg=folder)
        assert result["input"] == "t2-t0" and result["slices"] == 6
        seen_variants.add(run["variant_of"][folder])
    assert seen_variants == set(VARIANTS)


@pytest.mark.slow
def test_predict_cli_prints_json_without_identifiers_and_rejects_bad_folders(run, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    exam = next(e for e in run["cohort"].exams if e.variant == "sagittal")
    heat_dir = tmp_path / "heat"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mri_keras.predict",
            f"--model={run['export']}",
            f"--exam_dir={os.path.join(run['cohort'].root, exam.exam)}",
            f"--heatmap_dir={heat_dir}",
            "--top_slices=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result["left"]) == {"benign", "malignant"} and set(result["right"]) == {
        "benign",
        "malignant",
    }
    assert result["input"] == "t2-t0" and result["slices"] == exam.shape[0]
    assert len(result["heatmap"]["png"]) == 2
    for png in result["heatmap"]["png"]:
        assert os.path.getsize(png) > 1000
    assert np.load(heat_dir / "heatmap.npy").shape == tuple(exam.shape)
    identifiers = [str(v) for v in _flatten(run["cohort"].identifiers) if len(str(v)) >= 6]
    assert identifiers
    for ident in identifiers:
        assert ident not in proc.stdout and ident not in proc.stderr, ident

    bad = tmp_path / "not_an_exam"
    bad.mkdir()
    (bad / "notes.txt").write_text("not DICOM")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mri_keras.predict",
            f"--model={run['export']}",
            f"--exam_dir={bad}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == predict.EXIT_BAD_EXAM
    assert "no DICOM images" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    proc = subprocess.run(  # --model naming a folder without a model: a message, no traceback.
        [sys.executable, "-m", "mri_keras.predict", f"--model={bad}", f"--exam_dir={bad}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"mri_keras.predict: error: No model at '{bad}'" in proc.stderr


def _flatten(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _flatten(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _flatten(v)
    else:
        yield obj


@pytest.mark.slow
def test_heatmap_has_exam_shape_and_canonical_orientation(run, tmp_path):
    """The heatmap from a DICOM folder in any acquisition geometry equals the heatmap computed
    on the converter's canonical record of the same exam, voxel for voxel."""
    from tfrecords_tools import dicom_reader

    predictor = inference.load_predictor(run["export"])
    model = inference.load_keras_model(predictor.location.keras_path)
    records = {e["exam_id"]: e for _, e in Records.open(run["records"]).iter_numpy()}
    by_folder = {folder: e for e, folder in run["folder_of"].items()}
    for variant in ("reversed_cols", "sagittal", "descending_slices"):
        folder = next(f for f, v in run["variant_of"].items() if v == variant)
        out = tmp_path / variant
        method = "hirescam" if variant == "sagittal" else "gradient"
        result = predict.predict_exam(
            predict.PredictConfig(
                model=run["export"],
                exam_dir=os.path.join(run["cohort"].root, folder),
                heatmap_dir=str(out),
                top_slices=1,
                heatmap_method=method,
            ),
            predictor=predictor,
        )
        from_dicom = np.load(result["heatmap"]["npy"])
        exam_shape = dicom_reader.load_exam(os.path.join(run["cohort"].root, folder)).shape
        assert from_dicom.shape == exam_shape == tuple(result["shape"])
        assert from_dicom.dtype == np.float32
        assert 0.0 <= from_dicom.min() and from_dicom.max() <= 1.0
        record = records[by_folder[folder]]
        from_record, _ = heatmap.exam_saliency(
            model, {p: record[p] for p in predictor.phases}, predictor.input_config, method=method
        )
        np.testing.assert_allclose(from_dicom, from_record, atol=1e-4, err_msg=variant)


def _blob_model():
    """Input -> 4x4 in-plane average pool ('block3d_out') -> global max -> heads: the
    malignant log-odds grow with the brightest pooled cell, so saliency must sit on it."""
    import keras
    from keras import layers

    from mri_keras import constants

    volume = keras.Input((None, None, None, 1), name="volume")
    x = layers.AveragePooling3D((1, 4, 4), padding="same")(volume)
    x = layers.ReLU(name="block3d_out")(x)  # (batch, S, H/4, W/4, 1)
    g = layers.GlobalMaxPooling3D()(x)
    outputs = {}
    for label in constants.LABELS:
        dense = layers.Dense(2, activation="softmax", name=label)
        outputs[label] = dense(g)
        dense.set_weights([np.array([[-1.0, 1.0]], np.float32), np.zeros(2, np.float32)])
    return keras.Model(volume, outputs)


@pytest.mark.parametrize("method", heatmap.METHODS)
def test_saliency_lands_on_the_blob_with_the_input_axes(method):
    model = _blob_model()
    volume = np.zeros((5, 16, 32, 1), np.float32)
    volume[1, 4:8, 24:28] = 3.0  # slice 1, upper rows, patient-left columns (cols > W/2)
    volume[3, 8:12, 0:4] = 1.0  # a weaker blob elsewhere
    heat = heatmap.saliency(model, volume, target="malignant", method=method)
    assert heat.shape == (5, 16, 32)
    s, r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert s == 1 and 4 <= r < 8 and 24 <= c < 28, (s, r, c)
    assert heat.max() == pytest.approx(1.0)
    assert heatmap.most_salient_slices(heat, 2)[0] == 1


def test_heatmap_needs_the_keras_model(tmp_path):
    import shutil

    import eval_fixtures

    eval_fixtures.make_model_dir(str(tmp_path / "run"))
    export_only = tmp_path / "only" / "export"
    shutil.copytree(tmp_path / "run" / "export", export_only)
    with pytest.raises(FileNotFoundError, match="best.keras"):
        predict.predict_exam(
            predict.PredictConfig(
                model=str(export_only), exam_dir=str(tmp_path), heatmap_dir=str(tmp_path / "h")
            )
        )
    with pytest.raises(ValueError, match="target"):
        predict.PredictConfig(model="m", exam_dir="e", heatmap_target="spleen")
    (tmp_path / "a_file").write_text("keep")  # --heatmap_dir naming a file: refused up front.
    with pytest.raises(ValueError, match="a_file' exists and is not a directory"):
        predict.predict_exam(
            predict.PredictConfig(
                model=str(tmp_path / "run"),
                exam_dir=str(tmp_path),
                heatmap_dir=str(tmp_path / "a_file"),
            )
        )
    assert (tmp_path / "a_file").read_text() == "keep"


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_input_config_comes_from_the_two_files_the_project_writes(tmp_path):
    from mri_keras import constants

    run_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "run" / "export")
    both = inference.ModelLocation(export_dir=export_dir, keras_path=None, model_dir=run_dir)
    # The export's metadata wins (it is what the SavedModel preprocesses with) ...
    _write_json(
        os.path.join(export_dir, constants.EXPORT_METADATA_PATH),
        {"input_variant": "t1-t0", "input_config": {"input_variant": "t1-t0", "crop": [8, 8]}},
    )
    _write_json(
        os.path.join(run_dir, constants.CONFIG_NAME),
        {"input": {"input_variant": "t3", "normalization": "percentile", "new_field": 1}},
    )
    config = inference.load_input_config(both)
    assert (config.input_variant, config.crop) == ("t1-t0", (8, 8))
    # ... and a run without an export reads config.json (keys it does not know are ignored).
    keras_only = inference.ModelLocation(export_dir=None, keras_path=None, model_dir=run_dir)
    config = inference.load_input_config(keras_only)
    assert (config.input_variant, config.normalization) == ("t3", "percentile")


def test_missing_input_config_names_the_directory_and_the_expected_files(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    _write_json(os.path.join(run_dir, "config.json"), {"model": {}})  # No "input".
    location = inference.ModelLocation(
        export_dir=os.path.join(run_dir, "export"), keras_path=None, model_dir=run_dir
    )
    with pytest.raises(FileNotFoundError) as e:
        inference.load_input_config(location)
    message = str(e.value)
    assert f"model in {run_dir} expects" in message
    assert os.path.join(run_dir, "export", "assets.extra", "mri_keras.json") in message
    assert os.path.join(run_dir, "config.json") + " (with an 'input' object)" in message
    _write_json(os.path.join(run_dir, "config.json"), {"input": {"crop": 1.5}})
    with pytest.raises(ValueError, match=r"config.json: 'input' is not a valid input config: crop"):
        inference.load_input_config(location)


def _worklist_csv(run, tmp_path):
    """The cohort's exams as a worklist CSV (paths relative to the cohort), plus one folder
    that is not an exam, third."""
    bad = tmp_path / "not_an_exam"
    bad.mkdir(exist_ok=True)
    (bad / "notes.txt").write_text("not DICOM")
    folders = sorted(run["folder_of"].values())
    rows = folders[:2] + [str(bad)] + folders[2:]
    path = tmp_path / "worklist.csv"
    path.write_text("exam,comment\n" + "".join(f"{r},x\n" for r in rows))
    return path, rows


def test_worklist_scores_every_exam_once_and_lists_failures(run, tmp_path):
    from mri_keras import worklist

    predictor, from_records = _record_predictions(run)
    exam_of_folder = {folder: exam_id for exam_id, folder in run["folder_of"].items()}
    path, rows = _worklist_csv(run, tmp_path)
    items = worklist.read_worklist(str(path), dicom_root=run["cohort"].root)
    assert [i.name for i in items] == rows
    out = tmp_path / "scores.csv"
    log = io.StringIO()
    config = predict.PredictConfig(model=run["export"], exam_dir="")
    summary = worklist.predict_worklist(config, items, str(out), predictor=predictor, log=log)
    assert summary["exams"] == len(rows) and summary["scored"] == len(rows) - 1
    assert [f["exam"] for f in summary["failed"]] == [rows[2]]
    assert "no DICOM images" in summary["failed"][0]["error"]
    assert summary["exams_per_s"] > 0
    assert f"scored {len(rows) - 1} of {len(rows)} exams (1 failed)" in log.getvalue()
    assert not os.path.exists(str(out) + ".partial")
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert [r["exam"] for r in written] == rows  # worklist order, one row per exam
    for row in written:
        if row["exam"] == rows[2]:
            assert row["status"] == "failed" and "no DICOM images" in row["error"]
            assert row["left_malignant"] == ""
            continue
        assert row["status"] == "ok" and row["error"] == ""
        got = [float(row[label]) for label in ("left_benign", "left_malignant")]
        got += [float(row[label]) for label in ("right_benign", "right_malignant")]
        np.testing.assert_allclose(got, from_records[exam_of_folder[row["exam"]]], atol=1e-5)
        assert row["input"] == "t2-t0" and row["tta"] == "none" and row["slices"] == "6"
    # An existing output is never overwritten.
    before = out.read_bytes()
    with pytest.raises(worklist.WorklistError, match="exists"):
        worklist.predict_worklist(config, items, str(out), predictor=predictor, log=log)
    assert out.read_bytes() == before


def test_worklist_folder_and_csv_errors(run, tmp_path):
    from mri_keras import worklist

    items = worklist.read_worklist(run["cohort"].root, depth=2)  # ROOT/patient/exam
    assert sorted(i.name for i in items) == sorted(run["folder_of"].values())
    assert all(os.path.isdir(i.exam_dir) for i in items)
    with pytest.raises(worklist.WorklistError, match="no exam folders 4 level"):
        worklist.read_worklist(run["cohort"].root, depth=4)
    with pytest.raises(worklist.WorklistError, match="does not exist"):
        worklist.read_worklist(str(tmp_path / "absent.csv"))
    no_column = tmp_path / "no_column.csv"
    no_column.write_text("folder\nP0000/E1\n")
    with pytest.raises(worklist.WorklistError, match=r"no_column.csv: no exam column"):
        worklist.read_worklist(str(no_column))
    empty_entry = tmp_path / "empty_entry.csv"
    empty_entry.write_text("exam\nP0000/E1\n\n ,\n")
    with pytest.raises(worklist.WorklistError, match=r"empty_entry.csv, row 3: empty 'exam'"):
        worklist.read_worklist(str(empty_entry))


@pytest.mark.slow
def test_predict_cli_worklist_streams_json_lines_with_flip_tta(run, tmp_path):
    path, rows = _worklist_csv(run, tmp_path)
    heat_dir = tmp_path / "heat"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mri_keras.predict",
            f"--model={run['export']}",
            f"--worklist={path}",
            f"--dicom_root={run['cohort'].root}",
            "--tta=flip",
            f"--heatmap_dir={heat_dir}",
            "--top_slices=1",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        timeout=600,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]  # Some exams failed, the rest scored.
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["exam"] for r in lines] == rows
    assert [r["status"] for r in lines].count("failed") == 1
    ok = [r for r in lines if r["status"] == "ok"]
    assert all(r["tta"] == "flip" and os.path.isfile(r["heatmap"]["npy"]) for r in ok)
    assert len({r["heatmap"]["npy"] for r in ok}) == len(ok)  # one folder per exam
    assert "exams/s" in proc.stderr and "failed: " in proc.stderr and "Traceback" not in proc.stderr
    identifiers = [str(v) for v in _flatten(run["cohort"].identifiers) if len(str(v)) >= 6]
    for ident in identifiers:
        assert ident not in proc.stdout and ident not in proc.stderr, ident
