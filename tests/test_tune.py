"""Hyper-parameter search (mri_keras.tune): search space, sweeps, resume, workers, memory."""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import os
import socket
import subprocess
import sys
import weakref

import pytest

from mri_keras import tune_space

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small but real: every setting of the issue is searched, at tiny sizes.
TINY_SPACE = {
    "learning_rate": {"type": "float", "min": 1e-4, "max": 1e-2, "sampling": "log"},
    "width": {"type": "choice", "values": [2, 4]},
    "blocks_per_stage": {"type": "choice", "values": [1, [1, 1, 1, 2]]},
    "stem_kernel": {"type": "choice", "values": [3, 5]},
    "channels_3d": {"type": "choice", "values": [4, 6]},
    "dropout": {"type": "float", "min": 0.0, "max": 0.5, "step": 0.25},
    "crop": {"type": "choice", "values": [None, 0.875, [28, 28]]},
    "flip": {"type": "boolean"},
}


# --------------------------------------------------------------------------- search space


def test_default_space_file_is_the_builtin_default():
    from_file = tune_space.load_search_space(os.path.join(REPO, "configs", "tune_space.json"))
    assert from_file.to_json() == tune_space.load_search_space(None).to_json()
    assert set(from_file.names) == set(tune_space.SETTINGS)
    lr = from_file.to_json()["learning_rate"]
    assert (lr["min"], lr["max"], lr["sampling"]) == (1e-6, 1e-3, "log")


def test_space_values_reach_the_training_config():
    import keras_tuner as kt

    from mri_keras import config as config_lib
    from mri_keras import train_lib

    space = tune_space.parse_search_space(TINY_SPACE)
    # Structured choices travel through keras-tuner as strings and come back decoded.
    params = {p.name: p for p in space.params}
    assert params["blocks_per_stage"].encoded and params["crop"].encoded
    assert not params["width"].encoded
    assert params["blocks_per_stage"].decode("1,1,1,2") == (1, 1, 1, 2)
    assert params["blocks_per_stage"].decode("1") == (1, 1, 1, 1)
    assert params["crop"].decode("none") is None
    assert params["crop"].decode("0.875") == 0.875
    assert params["crop"].decode("28,28") == (28, 28)

    hp = kt.HyperParameters()
    values = space.declare(hp)
    assert set(hp.values) == set(TINY_SPACE)
    base = train_lib.TrainConfig(
        data_dir="/d", model_dir="/m", model=config_lib.ModelConfig(slice_mode="time_distributed")
    )
    values.update(blocks_per_stage=(1, 1, 1, 2), crop=(28, 28), flip=False, learning_rate=3e-4)
    config = tune_space.apply_values(base, values)
    assert config.learning_rate == 3e-4
    assert config.model.blocks_per_stage == (1, 1, 1, 2)
    assert config.model.width == values["width"]
    assert config.model.stem_kernel == values["stem_kernel"]
    assert config.model.channels_3d == values["channels_3d"]
    assert config.model.dropout == values["dropout"]
    assert config.model.slice_mode == "time_distributed"  # Not searched: the base value stays.
    assert config.input.crop == (28, 28) and config.input.flip is False


@pytest.mark.parametrize(
    "space, expected",
    [
        (
            {"stem_kernel": {"type": "choice", "values": [3, 4]}},
            "entry 'stem_kernel': value 4 is not an odd int",
        ),
        ({"stem_kernel": {"type": "int", "min": 3, "max": 7}}, "even 'step'"),
        (
            {"learning_rate": {"type": "float", "min": 1e-3, "max": 1e-6, "sampling": "log"}},
            "'min' (0.001) must be smaller than 'max' (1e-06)",
        ),
        (
            {"learning_rate": {"type": "float", "min": 0, "max": 1e-3, "sampling": "log"}},
            "entry 'learning_rate': min 0 is not a number in (0, 1)",
        ),
        (
            {"dropout": {"type": "float", "min": 0.0, "max": 1.5}},
            "entry 'dropout': max 1.5 is not a number in [0, 1)",
        ),
        ({"widht": {"type": "choice", "values": [8]}}, "unknown search-space entry 'widht'"),
        ({"width": {"type": "choice", "values": []}}, "'values' must be a non-empty list"),
        ({"width": {"type": "choice", "values": [8, 8]}}, "must not repeat"),
        ({"width": {"type": "float", "min": 1, "max": 2}}, "type 'float' is not allowed here"),
        ({"width": {"type": "choice", "values": [8, 0]}}, "value 0 is not an int >= 1"),
        ({"flip": {"type": "boolean", "defualt": True}}, "unknown keys ['defualt']"),
        (
            {"blocks_per_stage": {"type": "choice", "values": [[2, 2, 2]]}},
            "[2, 2, 2] is not an int >= 1 or a list of 4 ints",
        ),
        ({"crop": {"type": "choice", "values": [1.5]}}, "value 1.5 is not null, a fraction"),
        ({"crop": {"type": "choice", "values": [[0, 4]]}}, "value [0, 4] is not null, a fraction"),
        ({"crop": {"type": "fixed", "value": 1}}, "value 1 is not null, a fraction"),
        (
            {"init": {"type": "choice", "values": ["glorot", "orthogonal"]}},
            "value \"orthogonal\" is not one of ['glorot', 'he_zero_residual']",
        ),
        ({"flip": {"type": "fixed", "value": 1}}, "value 1 is not true or false"),
        ({"channels_3d": {"type": "fixed"}}, "type 'fixed' needs ['value']"),
        ({"channels_3d": [32, 64]}, "must be an object"),
        ([1, 2], "must be a JSON object keyed by setting name"),
        ({}, "has no entries"),
    ],
)
def test_bad_search_space_entry_gets_a_clear_error(space, expected):
    with pytest.raises(tune_space.SearchSpaceError) as e:
        tune_space.parse_search_space(space, source="space.json")
    assert expected in str(e.value)
    assert str(e.value).startswith("space.json: ")


def test_bad_search_space_file_stops_the_cli_naming_file_and_entry(tmp_path):
    from mri_keras import tune

    path = tmp_path / "space.json"
    path.write_text(json.dumps({"stem_kernel": {"type": "choice", "values": [3, 6]}}))
    argv = [
        f"--data_dir={tmp_path}",
        f"--model_dir={tmp_path / 'sweep'}",
        f"--search_space={path}",
        "--tuner=random",
    ]
    with pytest.raises(SystemExit) as e:
        tune.run(argv)
    message = str(e.value.code)
    assert message.startswith("mri_keras.tune: error: ")
    assert str(path) in message and "'stem_kernel'" in message and "value 6" in message
    assert not (tmp_path / "sweep").exists()

    path.write_text('{"width": {"type": "choice", "values": [8,]}}')
    with pytest.raises(SystemExit) as e:
        tune.run(argv)
    assert f"{path}: not valid JSON (line 1" in str(e.value.code)


def test_tune_flagfile_works_from_any_working_directory(tmp_path, monkeypatch):
    # configs/tune.flags names configs/t2sub.flags (-> configs/base.flags) and
    # configs/tune_space.json relative to the checkout; all are found from elsewhere.
    from absl import flags as absl_flags

    from mri_keras import flags as flags_lib
    from mri_keras import tune

    monkeypatch.chdir(tmp_path)
    fv = absl_flags.FlagValues()
    tune.define_tune_flags(fv)
    fv(
        flags_lib.expand_flagfiles(
            ["prog", f"--flagfile={REPO}/configs/tune.flags", "--data_dir=d", "--model_dir=m"]
        )
    )
    config = tune.tune_config_from_flags(fv)
    assert config.train.input.input_variant == "t2-t0"
    assert config.search_space == tune_space.load_search_space(
        os.path.join(REPO, "configs", "tune_space.json")
    )


def test_help_lists_the_training_flags_too():
    proc = subprocess.run(
        [sys.executable, "-m", "mri_keras.tune", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    for flag in ("--tuner", "--search_space", "--data_dir", "--model_dir", "--learning_rate"):
        assert f"  {flag}:" in proc.stdout + proc.stderr, flag


def test_records_that_cannot_train_stop_the_cli_before_any_trial(tmp_path):
    from mri_keras import tune

    (tmp_path / "records").mkdir()
    with pytest.raises(SystemExit) as e:
        tune.run(
            [
                f"--data_dir={tmp_path / 'records'}",
                f"--model_dir={tmp_path / 'sweep'}",
                "--tuner=random",
                "--max_trials=1",
            ]
        )
    assert str(e.value.code).startswith("mri_keras.tune: error: data_dir ")
    assert "is empty" in str(e.value.code)
    assert not (tmp_path / "sweep").exists()  # No trials failed, nothing written.
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(SystemExit) as e:
        tune.run([f"--data_dir={tmp_path / 'records'}", f"--model_dir={tmp_path / 'a_file'}"])
    assert "a_file' exists and is not a directory" in str(e.value.code)


def test_distributed_role_from_keras_tuner_environment(monkeypatch):
    from mri_keras import tune_lib

    for name in ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        monkeypatch.delenv(name, raising=False)
    assert tune_lib.tuner_role() == "local"
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    with pytest.raises(ValueError, match=r"KERASTUNER_ORACLE_PORT"):
        tune_lib.tuner_role()
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")
    assert tune_lib.tuner_role() == "chief"
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner3")
    assert tune_lib.tuner_role() == "worker"


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(tuner="grid"), "tuner must be one of"),
        (dict(tuner="random", max_trials=0), "max_trials must be >= 1 for tuner='random'"),
        (dict(max_epochs=0), "max_epochs must be >= 1"),
        (dict(hyperband_factor=1), "hyperband_factor must be >= 2"),
        (dict(num_initial_points=-1), "num_initial_points must be >= 0"),
        (dict(max_retries_per_trial=-1), "max_retries_per_trial must be >= 0"),
        (dict(max_consecutive_failed_trials=0), "max_consecutive_failed_trials must be >= 1"),
        (dict(top_trials=0), "top_trials must be >= 1"),
    ],
)
def test_bad_sweep_settings_are_refused(changes, expected):
    from mri_keras import train_lib, tune_lib

    base = dict(
        train=train_lib.TrainConfig(data_dir="/d", model_dir="/m"),
        search_space=tune_space.load_search_space(None),
    )
    with pytest.raises(ValueError, match=expected):
        tune_lib.TuneConfig(**base, **changes)


def test_overwrite_never_deletes_a_directory_that_is_not_a_sweep(tmp_path):
    from mri_keras import train_lib, tune_lib

    (tmp_path / "notes.txt").write_text("keep me")
    config = tune_lib.TuneConfig(
        train=train_lib.TrainConfig(data_dir="/d", model_dir=str(tmp_path)),
        search_space=tune_space.load_search_space(None),
        overwrite=True,
    )
    with pytest.raises(ValueError, match="refusing to delete"):
        tune_lib.build_tuner(config)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    # Nor starts a sweep inside a training run (or records): refused, nothing written there.
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds a training run or records \(config.json\)"):
        tune_lib.build_tuner(dataclasses.replace(config, overwrite=False))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "notes.txt"]


def test_sweep_flags_are_read_once_by_tune_config(tmp_path):
    from absl import flags

    from mri_keras import constants, tune

    fv = flags.FlagValues()
    tune.define_tune_flags(fv)
    assert fv["tuner"].parser.enum_values == list(constants.TUNERS)
    fv(["mri_keras.tune", "--data_dir=/d", f"--model_dir={tmp_path}", "--epochs=7"])
    assert tune.tune_config_from_flags(fv).max_epochs == 7  # --max_epochs defaults to --epochs.
    fv["max_epochs"].parse("0")  # Not "0 or --epochs": TuneConfig refuses it.
    with pytest.raises(ValueError, match="max_epochs must be >= 1. Received: max_epochs=0"):
        tune.tune_config_from_flags(fv)


# --------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    import train_fixtures

    out = tmp_path_factory.mktemp("records")
    train_fixtures.write_records(str(out), {"train": 4, "val": 4}, slices=(3, 4), size=32)
    return str(out)


@pytest.fixture()
def space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(TINY_SPACE))
    return str(path)


def _sweep_args(records, sweep, space, *extra):
    return [
        f"--data_dir={records}",
        f"--model_dir={sweep}",
        f"--search_space={space}",
        "--max_epochs=1",
        "--shuffle_buffer=4",
        "--noprogress",
        *extra,
    ]


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _runs(sweep):
    """{trial_id: [run log entries]} of a sweep directory."""
    out = {}
    for name in sorted(os.listdir(sweep)):
        log = os.path.join(sweep, name, "runs.jsonl")
        if name.startswith("trial_") and os.path.isfile(log):
            with open(log) as f:
                out[name[len("trial_") :]] = [json.loads(line) for line in f]
    return out


@pytest.mark.slow
def test_random_search_writes_summary_and_best_flags_that_train_then_resumes(
    records, space_file, tmp_path
):
    from mri_keras import run_dir, train, tune

    sweep = str(tmp_path / "sweep")
    # In-process trials keep this test quick; the workers of the distributed test run the
    # command line's default, a child process per trial.
    args = _sweep_args(
        records, sweep, space_file, "--tuner=random", "--max_trials=2", "--noisolate_trials"
    )
    result = tune.run(args)

    rows = _read_csv(os.path.join(sweep, "summary.csv"))
    assert [r["trial_id"] for r in rows] == [r.trial_id for r in result.results]
    assert sorted(r["trial_id"] for r in rows) == ["0", "1"]
    aucs = [float(r["val_malignant_auc"]) for r in rows]
    assert aucs == sorted(aucs, reverse=True) and all(0.0 <= a <= 1.0 for a in aucs)
    assert [r["rank"] for r in rows] == ["1", "2"]
    for row in rows:
        assert set(TINY_SPACE) <= set(row) and row["epochs"] == "1" and row["best_epoch"] == "1"
        # What the summary says was tried is what training ran with, and the reported AUC is
        # training's own model-selection value.
        with open(os.path.join(row["model_dir"], run_dir.CONFIG_NAME)) as f:
            ran = json.load(f)
        assert ran["model"]["width"] == int(row["width"])
        assert ran["model"]["stem_kernel"] == int(row["stem_kernel"])
        assert ran["model"]["channels_3d"] == int(row["channels_3d"])
        assert ",".join(map(str, ran["model"]["blocks_per_stage"])) == row["blocks_per_stage"]
        assert ran["input"]["flip"] == (row["flip"] == "true")
        assert ran["learning_rate"] == pytest.approx(float(row["learning_rate"]), rel=1e-5)
        metrics = run_dir.read_metrics_csv(os.path.join(row["model_dir"], "metrics.csv"))
        assert float(row["val_malignant_auc"]) == pytest.approx(
            metrics[0]["val_malignant_auc"], abs=1e-6
        )

    # The best trial's flagfile trains with mri_keras.train and rebuilds the trial's settings.
    flags_path = os.path.join(sweep, "best_trial.flags")
    assert result.best_flags_path == flags_path
    history = train.run([f"--flagfile={flags_path}"])
    assert history["epoch"] == [1]
    with open(os.path.join(rows[0]["model_dir"], run_dir.CONFIG_NAME)) as f:
        best_ran = json.load(f)
    with open(os.path.join(sweep, "best_trial", run_dir.CONFIG_NAME)) as f:
        retrained = json.load(f)
    assert retrained.pop("model_dir") == os.path.join(sweep, "best_trial")
    best_ran.pop("model_dir")
    assert retrained == best_ran

    # Rerun: nothing left to do, nothing repeated.
    tune.run(args)
    assert {k: len(v) for k, v in _runs(sweep).items()} == {"0": 1, "1": 1}
    # More trials: the sweep continues with new trials only.
    tune.run(
        _sweep_args(
            records, sweep, space_file, "--tuner=random", "--max_trials=3", "--noisolate_trials"
        )
    )
    runs = _runs(sweep)
    assert {k: len(v) for k, v in runs.items()} == {"0": 1, "1": 1, "2": 1}
    assert all(v[0]["status"] == "completed" for v in runs.values())
    assert len(_read_csv(os.path.join(sweep, "summary.csv"))) == 3

    # Resuming with another tuner or space is refused, naming what changed.
    with pytest.raises(SystemExit) as e:
        tune.run(_sweep_args(records, sweep, space_file, "--tuner=bayesian", "--max_trials=3"))
    assert "different settings" in str(e.value.code) and 'was "random"' in str(e.value.code)


@pytest.mark.slow
def test_interrupted_sweep_resumes_the_unfinished_trial(records, space_file, tmp_path):
    import keras

    from mri_keras import run_dir, train_lib, tune_lib
    from mri_keras import tune_space as ts

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt  # As a killed process would, after epoch 1's checkpoint.

    config = tune_lib.TuneConfig(
        train=train_lib.TrainConfig(data_dir=records, model_dir=str(tmp_path / "sweep"), verbose=0),
        search_space=ts.load_search_space(space_file),
        tuner="random",
        max_trials=1,
        max_epochs=2,
        verbose=0,
    )
    with pytest.raises(KeyboardInterrupt):
        tune_lib.run_search(config, callbacks=[Interrupt()])
    result = tune_lib.run_search(config)
    runs = _runs(config.train.model_dir)
    assert list(runs) == ["0"]  # The same trial, not a new one.
    assert [r["status"].split(":")[0] for r in runs["0"]] == ["error", "completed"]
    metrics = run_dir.read_metrics_csv(os.path.join(result.results[0].model_dir, "metrics.csv"))
    # Trained to the end, the first epoch kept from before the interruption.
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert result.rows[0]["epochs"] == 2
    # keras-tuner's own API reaches the trial's best model.
    best = tune_lib.build_tuner(config).get_best_models(1)[0]
    assert isinstance(best, keras.Model) and best.count_params() > 0


@pytest.mark.slow
def test_six_trials_in_one_process_free_their_models_and_bounded_rss(
    records, space_file, tmp_path, monkeypatch
):
    import keras
    import psutil

    from mri_keras import model as model_lib
    from mri_keras import train_lib, tune_lib

    models, rss = [], []
    build = model_lib.build_model

    def tracked_build(config, *args, **kwargs):
        model = build(config, *args, **kwargs)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(model_lib, "build_model", tracked_build)

    class Rss(keras.callbacks.Callback):
        # The tuner deep-copies callbacks per trial; `rss` is reached through the closure.
        def on_train_end(self, logs=None):
            gc.collect()
            rss.append(psutil.Process().memory_info().rss)

    config = tune_lib.TuneConfig(
        train=train_lib.TrainConfig(data_dir=records, model_dir=str(tmp_path / "sweep"), verbose=0),
        search_space=tune_space.load_search_space(space_file),
        tuner="random",
        max_trials=6,
        max_epochs=1,
        verbose=0,
    )
    result = tune_lib.run_search(config, callbacks=[Rss()])
    assert len(result.rows) == 6 and len(rss) == 6
    gc.collect()
    # No trial's model outlives its trial.
    # (Training builds each trial's model, and its export builds one more.)
    assert len(models) >= 6 and not [r for r in models if r() is not None]
    growth_mb = (rss[-1] - rss[0]) / 2**20
    print(f"RSS after each trial (MB): {[round(r / 2**20) for r in rss]}")
    # Measured on CPU: ~11 MB per tiny trial stays behind inside TensorFlow once the models
    # are freed. Bound: 30 MB per trial over trials 2-6 (a leaked model, optimizer or dataset
    # per trial at real sizes is hundreds of MB).
    assert growth_mb < 150, f"RSS grew {growth_mb:.0f} MB over 5 trials"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_chief_and_two_workers_share_four_trials(records, space_file, tmp_path):
    sweep = str(tmp_path / "sweep")
    logs = str(tmp_path / "logs")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        TUNE_LOG_DIR=logs,
        KERASTUNER_ORACLE_PORT=str(_free_port()),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [
            os.path.join(REPO, "scripts", "tune_distributed.sh"),
            "2",
            *_sweep_args(records, sweep, space_file, "--tuner=random", "--max_trials=4"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )

    def diagnostics():
        logs_text = (
            "".join(
                f"\n--- {n}\n{open(os.path.join(logs, n)).read()[-4000:]}"
                for n in sorted(os.listdir(logs))
            )
            if os.path.isdir(logs)
            else ""
        )
        runs_text = json.dumps(_runs(sweep), indent=1) if os.path.isdir(sweep) else "no sweep"
        return f"{proc.stdout}\n{proc.stderr}\nruns: {runs_text}{logs_text}"

    assert proc.returncode == 0, diagnostics()
    runs = _runs(sweep)
    assert sorted(runs) == ["0", "1", "2", "3"], diagnostics()
    # Every trial ran exactly once, on a worker (the chief only serves the oracle).
    assert all(len(v) == 1 and v[0]["status"] == "completed" for v in runs.values()), diagnostics()
    assert {v[0]["tuner_id"] for v in runs.values()} <= {"tuner0", "tuner1"}, diagnostics()
    for trial_id in runs:
        with open(os.path.join(sweep, f"trial_{trial_id}", "trial.json")) as f:
            assert json.load(f)["status"] == "COMPLETED", diagnostics()
    assert len(_read_csv(os.path.join(sweep, "summary.csv"))) == 4, diagnostics()
    assert os.path.isfile(os.path.join(sweep, "best_trial.flags"))
    assert "Top trials" in proc.stdout, diagnostics()
