"""Training through the real entry point on tiny records: outputs, selection, resume, export,
bad input. Distributed runs (mirrored replicas, multi-worker) are in test_train_distributed.py.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import train_fixtures
from absl import flags as absl_flags

from mri_keras import config as config_lib
from mri_keras import export as export_lib
from mri_keras import flags as flags_lib
from mri_keras import model as model_lib
from mri_keras import run_dir, train, train_data, train_lib, validation
from tfrecords_tools import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = list(train_fixtures.TINY_FLAGS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("records"))
    train_fixtures.write_records(path)
    return path


def _argv(data_dir, model_dir, *extra):
    return [f"--data_dir={data_dir}", f"--model_dir={model_dir}", *TINY, *extra]


def _config(argv):
    fv = absl_flags.FlagValues()
    flags_lib.define_flags(fv)
    fv(["mri_keras.train", *argv])
    return flags_lib.train_config_from_flags(fv)


def _event_tags(logdir):
    tags = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.fixture(scope="module")
def two_epoch_run(data_dir, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("run2"))
    history = train.run(_argv(data_dir, model_dir, "--epochs=2"))
    return model_dir, history


def test_one_epoch_run_writes_every_output(data_dir, tmp_path, capsys):
    model_dir = str(tmp_path / "run1")
    history = train.run(_argv(data_dir, model_dir, "--epochs=1"))
    out = capsys.readouterr().out
    assert "OneDeviceStrategy, 1 replica(s)" in out
    assert "train 6, val 4, test 2" in out
    assert "t2-t0 (phases t0, t2)" in out
    n_params = model_lib.build_model(
        config_lib.ModelConfig(width=4, blocks_per_stage=(1, 1, 1, 1), channels_3d=8, stem_kernel=3)
    ).count_params()
    assert f"{n_params:,} parameters" in out
    assert "Epoch 1/1" in out and os.path.join(model_dir, "export") in out

    assert history["epoch"] == [1] and history["best_epoch"] == 1
    rows = run_dir.read_metrics_csv(os.path.join(model_dir, "metrics.csv"))
    assert [r["epoch"] for r in rows] == [1]
    assert rows[0]["val_malignant_auc"] == pytest.approx(history["val_malignant_auc"][0])
    assert os.path.isfile(os.path.join(model_dir, "best.keras"))
    assert os.path.isfile(os.path.join(model_dir, "export", "saved_model.pb"))
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["model"]["width"] == 4
    tags = _event_tags(os.path.join(model_dir, "tensorboard"))
    for key in ("loss", "val_loss", "val_malignant_auc", "val_benign_auc"):
        assert tags[key] == [1]
    assert len(tags["batch_loss"]) == 6  # 6 training exams, one per step.


def test_two_epoch_run_keeps_best_epoch(two_epoch_run):
    model_dir, history = two_epoch_run
    assert history["epoch"] == [1, 2]
    for key in ("loss", "val_loss", "val_malignant_auc", "val_benign_auc"):
        assert len(history[key]) == 2 and all(np.isfinite(history[key])), key
    aucs, losses = history["val_malignant_auc"], history["val_loss"]
    # The selection rule: higher AUC; on a tie, lower validation loss; then the earlier epoch.
    later_wins = aucs[1] > aucs[0] + 1e-9 or (
        abs(aucs[1] - aucs[0]) <= 1e-9 and losses[1] < losses[0]
    )
    assert history["best_epoch"] == (2 if later_wins else 1)
    assert history["best_val_malignant_auc"] == aucs[history["best_epoch"] - 1]
    rows = run_dir.read_metrics_csv(os.path.join(model_dir, "metrics.csv"))
    assert [r["epoch"] for r in rows] == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in rows], history["loss"], rtol=1e-12)
    meta = export_lib.read_metadata(os.path.join(model_dir, "export"))
    assert meta["best_epoch"] == history["best_epoch"]
    assert meta["input_variant"] == "t2-t0" and meta["phases"] == ["t0", "t2"]
    # best.keras holds the best epoch: its val AUC is the recorded one.
    model = keras.models.load_model(os.path.join(model_dir, "best.keras"))
    scored = validation.predict_split(
        model, _data_dir_of(model_dir), "val", config_lib.InputConfig()
    )
    assert validation.validation_metrics(scored.labels, scored.probs)[
        "val_malignant_auc"
    ] == pytest.approx(history["best_val_malignant_auc"])
    assert not glob.glob(os.path.join(model_dir, "best.keras.epoch-*"))


def _data_dir_of(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["data_dir"]


def test_rerun_of_finished_run_changes_nothing(two_epoch_run, capsys):
    model_dir, history = two_epoch_run
    data_dir = _data_dir_of(model_dir)
    before = os.path.getmtime(os.path.join(model_dir, "export", "saved_model.pb"))
    again = train.run(_argv(data_dir, model_dir, "--epochs=2"))
    assert "Epoch " not in capsys.readouterr().out
    assert again["epoch"] == [1, 2] and again["best_epoch"] == history["best_epoch"]
    assert again["loss"] == history["loss"]
    assert os.path.getmtime(os.path.join(model_dir, "export", "saved_model.pb")) == before


def test_export_parity_for_both_signatures(two_epoch_run):
    model_dir, _ = two_epoch_run
    data_dir = _data_dir_of(model_dir)
    model = keras.models.load_model(os.path.join(model_dir, "best.keras"))
    scored = validation.predict_split(model, data_dir, "val", config_lib.InputConfig())
    ids, probs = list(scored.exam_ids), scored.probs

    records = [r.numpy() for r in tf.data.TFRecordDataset(glob.glob(f"{data_dir}/val-*"))]
    by_id = {schema.decode_example_numpy(r)["exam_id"]: r for r in records}
    saved = tf.saved_model.load(os.path.join(model_dir, "export"))
    assert set(saved.signatures) == set(export_lib.SIGNATURES)

    raw = [by_id[i] for i in ids]
    out = saved.signatures["serving_example"](examples=tf.constant(raw))
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, atol=1e-5)
    assert [v.decode() for v in out["exam_id"].numpy()] == ids
    np.testing.assert_allclose(out["left_malignant"].numpy(), probs[:, 1], atol=1e-5)

    for i, exam_id in enumerate(ids):
        exam = schema.decode_example_numpy(by_id[exam_id])
        serve = saved.signatures["serving_default"]
        res = serve(t0=tf.constant(exam["t0"]), t2=tf.constant(exam["t2"]))
        np.testing.assert_allclose(res["probabilities"].numpy(), probs[i], atol=1e-5)
        np.testing.assert_allclose(res["right_malignant"].numpy(), probs[i, 3], atol=1e-5)

    loaded = export_lib.load_exported(os.path.join(model_dir, "export"))
    assert loaded.phases == ("t0", "t2") and loaded.labels == schema.LABELS
    exam = schema.decode_example_numpy(by_id[ids[0]])
    np.testing.assert_allclose(loaded.predict_phases(exam), probs[0], atol=1e-5)
    np.testing.assert_allclose(loaded.predict_examples(raw)["probabilities"], probs, atol=1e-5)
    with pytest.raises(ValueError, match="missing \\['t2'\\]"):
        loaded.predict_phases({"t0": exam["t0"]})


def test_train_fraction_subsamples_whole_patients(data_dir, tmp_path, capsys):
    exams = [{"exam_id": f"e{i}", "patient_id": f"p{i // 2}"} for i in range(20)]
    ids, patients = train_data.select_train_exams(exams, 0.3, seed=1)
    assert patients == 3 and len(ids) == 6
    assert len({i for i in ids} & {f"e{2 * k}" for k in range(10)}) == 3  # both exams per patient
    assert train_data.select_train_exams(exams, 0.3, seed=1) == (ids, patients)
    assert train_data.select_train_exams(exams, 1.0, seed=1) == (None, 10)

    class CountSteps(keras.callbacks.Callback):
        steps = 0

        def on_train_batch_end(self, batch, logs=None):
            CountSteps.steps += 1

    config = _config(_argv(data_dir, str(tmp_path / "frac"), "--epochs=1", "--train_fraction=0.5"))
    train_lib.train(config, extra_callbacks=[CountSteps()])
    # 3 training patients with 2 exams each: round(1.5) = 2 patients, 4 exams, 4 steps.
    assert CountSteps.steps == 4
    assert "training on 4 exams of 2 patients" in capsys.readouterr().out


def test_callbacks_stop_training_and_repeated_runs_in_one_process(data_dir, tmp_path):
    seen = []

    class StopAfterFirst(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, dict(logs)))
            self.model.stop_training = True

    config = _config(_argv(data_dir, str(tmp_path / "a"), "--epochs=3", "--progress=false"))
    history = train_lib.train(config, extra_callbacks=[StopAfterFirst()])
    assert history["epoch"] == [1] and [e for e, _ in seen] == [0]
    assert seen[0][1]["val_malignant_auc"] == history["val_malignant_auc"][0]
    assert os.path.isdir(os.path.join(tmp_path, "a", "export"))

    keras.backend.clear_session()
    config_b = _config(_argv(data_dir, str(tmp_path / "b"), "--epochs=1", "--progress=false"))
    history_b = train_lib.train(config_b)
    assert history_b["epoch"] == [1]
    assert os.path.isfile(os.path.join(tmp_path, "b", "best.keras"))


# --------------------------------------------------------------------------- bad input


def _expect_error(argv, *fragments):
    with pytest.raises(SystemExit) as info:
        train.run(argv)
    message = str(info.value.code)
    assert message.startswith("mri_keras.train: error:"), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _records(path, **kwargs):
    train_fixtures.write_records(str(path), {"train": 2, "val": 2}, **kwargs)
    return str(path)


def test_bad_data_dirs(tmp_path):
    model_dir = str(tmp_path / "run")
    _expect_error(_argv(str(tmp_path / "nope"), model_dir), "nope", "does not exist")
    os.makedirs(tmp_path / "empty")
    _expect_error(_argv(str(tmp_path / "empty"), model_dir), "is empty", "tfrecords_tools.convert")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    _expect_error(_argv(str(tmp_path / "junk"), model_dir), "manifest.json not found")

    no_val = str(tmp_path / "noval")
    train_fixtures.write_records(no_val, {"train": 2, "val": 0})
    _expect_error(_argv(no_val, model_dir), "Split 'val'", "no exams", "validation")
    assert not os.path.exists(model_dir)  # Nothing written before the data is checked.

    missing_shard = _records(tmp_path / "gone")
    os.remove(glob.glob(os.path.join(missing_shard, "train-*"))[0])
    _expect_error(
        _argv(missing_shard, model_dir), "train-00000-of-00001.tfrecord", "does not exist"
    )


def test_unreadable_schema_versions(tmp_path):
    model_dir = str(tmp_path / "run")
    future = schema.SCHEMA_VERSION + 1
    manifest_future = _records(tmp_path / "m2")
    train_fixtures.edit_manifest(manifest_future, lambda m: m.update(schema_version=future))
    _expect_error(_argv(manifest_future, model_dir), f"schema version {future}", "not readable")

    records_future = _records(tmp_path / "r2", schema_version=future)
    current = schema.SCHEMA_VERSION
    train_fixtures.edit_manifest(records_future, lambda m: m.update(schema_version=current))
    _expect_error(
        _argv(records_future, model_dir), "train-00000-of-00001.tfrecord", f"version {future}"
    )


def test_input_variant_needing_missing_phases(tmp_path):
    data = _records(tmp_path / "t0t1", phases=("t0", "t1"))
    msg = _expect_error(_argv(data, str(tmp_path / "run"), "--input=t2sub"), "'t2-t0'", "['t2']")
    assert "t0', 't1'" in msg
    # The manifest may claim a phase the records lack: the first record is checked too.
    train_fixtures.edit_manifest(data, lambda m: m.update(phases=list(schema.PHASES)))
    _expect_error(_argv(data, str(tmp_path / "run"), "--input=t3"), "stores only", "'t1'")


def test_model_dir_with_other_settings(data_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    saved = _config(_argv(data_dir, model_dir, "--epochs=2"))
    run_dir.prepare_model_dir(saved)
    msg = _expect_error(
        _argv(data_dir, model_dir, "--width=8", "--learning_rate=0.01", "--epochs=7"),
        "holds a run with other settings",
        "model.width: saved 4, now 8",
        "learning_rate: saved 0.001, now 0.01",
        "--overwrite",
    )
    assert "epochs" not in msg  # More epochs continue the run.
    # Same settings (other epochs): resumable.
    assert run_dir.prepare_model_dir(_config(_argv(data_dir, model_dir, "--epochs=9")))
    # --overwrite starts over: the old run's files go.
    for name in ("metrics.csv", "best.keras"):
        (tmp_path / "run" / name).write_text("old")
    os.makedirs(tmp_path / "run" / "checkpoints")
    other = _config(_argv(data_dir, model_dir, "--width=8", "--overwrite"))
    assert run_dir.prepare_model_dir(other) is False
    assert sorted(os.listdir(model_dir)) == ["config.json"]
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["model"]["width"] == 8
    # Checkpoints without config.json: settings unknown.
    os.remove(os.path.join(model_dir, "config.json"))
    os.makedirs(os.path.join(model_dir, "checkpoints"))
    _expect_error(_argv(data_dir, model_dir), "no config.json")


@pytest.mark.parametrize(
    "flag, fragment",
    [
        ("--crop=abc", "--crop"),
        ("--crop=1.5", "--crop"),
        ("--blocks=1,1", "--blocks must be 4 positive ints"),
        ("--percentiles=99,1", "--percentiles"),
        ("--slice_buckets=0,8", "--slice_buckets"),
        ("--strategy=tpu", "strategy"),
        ("--train_fraction=0", "train_fraction"),
    ],
)
def test_bad_flag_values(data_dir, tmp_path, flag, fragment):
    _expect_error(_argv(data_dir, str(tmp_path / "run"), flag), fragment)


def test_stray_arguments_are_rejected(data_dir, tmp_path):
    _expect_error([*_argv(data_dir, str(tmp_path / "run")), "extra"], "unexpected")


def test_crop_flag_forms():
    assert flags_lib._parse_crop("") is None
    assert flags_lib._parse_crop("0.875") == 0.875
    assert flags_lib._parse_crop("224,192") == (224, 192)
    assert flags_lib._parse_crop("96") == (96, 96)


def test_model_selection_rule():
    nan = float("nan")
    assert validation.is_improvement(0.5, None)
    assert validation.is_improvement(0.6, 0.5) and not validation.is_improvement(0.5, 0.5)
    assert not validation.is_improvement(nan, 0.5) and validation.is_improvement(0.1, nan)
    assert validation.is_improvement(nan, nan)  # Without any AUC, the latest epoch is kept.


# --------------------------------------------------------------------------- fault tolerance

_KILLER = """
import os, signal, sys
import keras
from absl import flags as absl_flags
from mri_keras import flags as flags_lib, train_lib

class KillInEpoch2(keras.callbacks.Callback):
    epoch = 0
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == 2:
            os.kill(os.getpid(), signal.SIGKILL)

fv = absl_flags.FlagValues()
flags_lib.define_flags(fv)
fv(["train", *sys.argv[1:]])
train_lib.train(flags_lib.train_config_from_flags(fv), extra_callbacks=[KillInEpoch2()])
"""


def _subprocess(args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_killed_run_resumes_at_the_interrupted_epoch(data_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    argv = _argv(data_dir, model_dir, "--epochs=3")
    killed = _subprocess(["-c", _KILLER, *argv])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "Epoch 2/3" in killed.stdout
    ckpts = os.path.join(model_dir, "checkpoints")
    assert tf.train.latest_checkpoint(ckpts).endswith("ckpt-1")
    before = run_dir.read_metrics_csv(os.path.join(model_dir, "metrics.csv"))
    assert [r["epoch"] for r in before] == [1]

    resumed = _subprocess(["-m", "mri_keras.train", *argv])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from ckpt-1" in resumed.stdout
    assert "Epoch 1/3" not in resumed.stdout and "Epoch 2/3" in resumed.stdout
    assert "Finished 3 epoch(s) of 3" in resumed.stdout
    after = run_dir.read_metrics_csv(os.path.join(model_dir, "metrics.csv"))
    assert [r["epoch"] for r in after] == [1, 2, 3] and after[0] == before[0]

    # Same bookkeeping as a run never interrupted (each epoch's data stream is seeded).
    reference = train.run(_argv(data_dir, str(tmp_path / "ref"), "--epochs=3", "--progress=false"))
    np.testing.assert_allclose([r["loss"] for r in after], reference["loss"], rtol=1e-4)
    np.testing.assert_allclose(
        [r["val_malignant_auc"] for r in after], reference["val_malignant_auc"], atol=1e-6
    )
    meta = export_lib.read_metadata(os.path.join(model_dir, "export"))
    assert meta["best_epoch"] == reference["best_epoch"]


@pytest.mark.parametrize(
    "name, variant",
    [
        ("t0", "t0"),
        ("t1", "t1"),
        ("t2", "t2"),
        ("t3", "t3"),
        ("t1sub", "t1-t0"),
        ("t2sub", "t2-t0"),
        ("t3sub", "t3-t0"),
    ],
)
def test_table1_flagfiles_hold_the_paper_recipe(name, variant, monkeypatch):
    monkeypatch.chdir(REPO)  # Flagfiles include configs/base.flags relative to the checkout.
    config = _config([f"--flagfile=configs/{name}.flags", "--data_dir=d", "--model_dir=m"])
    assert config.input.input_variant == variant
    assert config.model == config_lib.ModelConfig()  # The paper's model, 11,611,785 params.
    assert (config.epochs, config.learning_rate) == (50, 1e-5)
    assert config.input.flip and config.input.crop == 0.875 and config.strategy == "auto"
    # Later flags override the flagfile.
    assert (
        _config(
            [f"--flagfile=configs/{name}.flags", "--data_dir=d", "--model_dir=m", "--epochs=3"]
        ).epochs
        == 3
    )


@pytest.mark.slow
def test_speed_and_memory_options_train_and_export_float32(data_dir, tmp_path):
    # bfloat16 compute, slice-chunked recomputation and XLA with one shape bucket (8x40x40:
    # every tiny exam is padded into it, so XLA compiles once).
    model_dir = str(tmp_path / "fast")
    history = train.run(
        _argv(
            data_dir,
            model_dir,
            "--epochs=1",
            "--mixed_precision=bfloat16",
            "--remat=2",
            "--jit_compile",
            "--slice_buckets=8",
            "--size_buckets=40",
            "--progress=false",
        )
    )
    assert history["epoch"] == [1] and np.isfinite(history["loss"][0])
    with open(os.path.join(model_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"]["dtype_policy"] == "mixed_bfloat16" and saved["jit_compile"]
    meta = export_lib.read_metadata(os.path.join(model_dir, "export"))
    assert meta["model_config"]["dtype_policy"] == "float32"
    assert meta["model_config"]["remat_chunk"] == 0
    best = keras.models.load_model(os.path.join(model_dir, "best.keras"))
    assert "trunk_remat" not in [layer.name for layer in best.layers]
    assert {w.dtype for w in best.weights} == {"float32"}
    loaded = export_lib.load_exported(os.path.join(model_dir, "export"))
    records = [r.numpy() for r in tf.data.TFRecordDataset(glob.glob(f"{data_dir}/val-*"))]
    probs = loaded.predict_examples(records)["probabilities"]
    assert probs.shape == (4, 4) and np.all((probs >= 0) & (probs <= 1))


def test_demo_flagfile_shrinks_whatever_it_is_layered_over(monkeypatch):
    monkeypatch.chdir(REPO)
    alone = _config(["--flagfile=configs/demo.flags", "--data_dir=d", "--model_dir=m"])
    assert alone.input.input_variant == "t2-t0" and alone.model.width < 64
    layered = _config(
        [
            "--flagfile=configs/t1sub.flags",
            "--flagfile=configs/demo.flags",
            "--data_dir=d",
            "--model_dir=m",
        ]
    )
    assert layered.input.input_variant == "t1-t0"  # The image comes from the paper flagfile.
    assert layered.model == alone.model and layered.epochs == alone.epochs
    assert layered.input.crop is None and layered.input.flip


def test_flagfiles_work_from_any_working_directory(tmp_path, monkeypatch):
    # configs/t2sub.flags includes configs/base.flags relative to the checkout: found from
    # elsewhere too (relative to the including flagfile's directory or a parent of it).
    monkeypatch.chdir(tmp_path)
    argv = flags_lib.expand_flagfiles(
        [
            "prog",
            f"--flagfile={REPO}/configs/t2sub.flags",
            "--data_dir=d",
            "--model_dir=m",
            "--epochs=3",
        ]
    )
    config = _config(argv[1:])
    assert config.input.input_variant == "t2-t0" and config.model == config_lib.ModelConfig()
    assert (config.epochs, config.learning_rate) == (3, 1e-5)  # Later flags still win.
    _expect_error(
        ["--flagfile=no_such.flags", "--data_dir=d", "--model_dir=m"],
        "Unable to open flagfile",
        "no_such.flags",
    )
    (tmp_path / "loop.flags").write_text("--flagfile=loop.flags\n")
    _expect_error(["--flagfile=loop.flags"], "circular")


def test_trains_on_a_converted_synthetic_cohort_without_leaking_identifiers(
    tiny_cohort, tmp_path, capsys
):
    from tfrecords_tools import convert_lib

    records = str(tmp_path / "records")
    result = convert_lib.convert(
        convert_lib.ConvertConfig(
            dicom_root=tiny_cohort.root,
            labels=tiny_cohort.labels_csv,
            output_dir=records,
            pseudonym_key_file=str(tmp_path / "private" / "key"),
            num_workers=1,
            progress=False,
        )
    )
    assert result.ok
    model_dir = str(tmp_path / "run")
    history = train.run(_argv(records, model_dir, "--epochs=1", "--input=t3sub"))
    out = capsys.readouterr().out
    assert history["epoch"] == [1]
    for name in ("metrics.csv", "best.keras", os.path.join("export", "saved_model.pb")):
        assert os.path.isfile(os.path.join(model_dir, name)), name
    # Nothing the run writes or prints names a patient.
    texts = [out]
    for path in glob.glob(os.path.join(model_dir, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                texts.append(f.read().decode("latin-1"))
    for identifier in tiny_cohort.identifiers.distinctive:
        assert not any(identifier in text for text in texts), identifier
