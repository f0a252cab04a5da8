"""Training options beyond the paper (issue 13): initialisation, GroupNorm, learning-rate
schedule with warm-up, a true per-epoch permutation of the training exams, the tie rule of
model selection, and the flags/tuner plumbing of each. The paper flagfiles keep the paper's
settings (tests/test_train.py checks those)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import train_fixtures
from absl import flags as absl_flags

from mri_keras import config as config_lib
from mri_keras import flags as flags_lib
from mri_keras import (
    input_pipeline,
    run_dir,
    schedules,
    train,
    train_data,
    train_lib,
    tune_lib,
    tune_space,
    validation,
)
from mri_keras import model as model_lib
from tfrecords_tools import memory

TINY_MODEL = dict(width=4, blocks_per_stage=(1, 1, 1, 1), channels_3d=8, stem_kernel=3)


def _config(argv):
    fv = absl_flags.FlagValues()
    flags_lib.define_flags(fv)
    fv(["mri_keras.train", *argv])
    return flags_lib.train_config_from_flags(fv)


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("norm", ["none", "group"])
def test_zero_residual_blocks_are_the_identity_at_init(norm):
    keras.utils.set_random_seed(0)
    blocks = model_lib._Blocks("he_zero_residual", norm, 4)
    inputs = keras.Input((None, None, 8))
    block = keras.Model(inputs, model_lib.apply_basic_block(inputs, 8, 1, "b", blocks=blocks))
    x = np.abs(np.random.default_rng(0).normal(size=(2, 9, 7, 8))).astype("float32")
    np.testing.assert_array_equal(block(x).numpy(), x)  # relu(x + 0) == x for x >= 0.

    volume = keras.Input((None, None, None, 16))
    block3d = keras.Model(volume, model_lib.apply_residual_block_3d(volume, 16, "c", blocks=blocks))
    v = np.abs(np.random.default_rng(1).normal(size=(1, 3, 4, 5, 16))).astype("float32")
    np.testing.assert_array_equal(block3d(v).numpy(), v)

    # Glorot (the paper's) blocks are not: their residual branch starts non-zero.
    glorot = keras.Model(inputs, model_lib.apply_basic_block(inputs, 8, 1, "g"))
    assert np.abs(glorot(x).numpy() - x).max() > 1e-3


def test_init_and_norm_options_build_and_keep_activations_alive():
    x = np.random.default_rng(0).standard_normal((1, 6, 64, 64, 1)).astype("float32")
    rms = {}
    for init in ("glorot", "he_zero_residual"):
        for norm in ("none", "group"):
            keras.utils.set_random_seed(0)
            model = model_lib.build_model(  # The demo's model size.
                config_lib.ModelConfig(
                    width=16, blocks_per_stage=(1, 1, 1, 1), channels_3d=32, init=init, norm=norm
                )
            )
            features = keras.Model(model.input, model.get_layer("global_max_pool").input)
            rms[init, norm] = float(np.sqrt(np.mean(features(x).numpy() ** 2)))
            has_gn = any(
                isinstance(layer, keras.layers.GroupNormalization)
                for layer in model.get_layer("trunk").layers + model.layers
            )
            assert has_gn == (norm == "group")
    # He init with identity blocks keeps the signal at O(1) where Glorot shrinks it (measured
    # at this size: RMS ~3.5 against ~0.04).
    assert rms["he_zero_residual", "none"] > 10 * rms["glorot", "none"]
    assert all(v > 0 for v in rms.values())


def test_group_norm_statistics_are_per_exam():
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(config_lib.ModelConfig(**TINY_MODEL, norm="group"))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 4, 32, 32, 1)).astype("float32")
    b = (5.0 * rng.normal(size=(1, 4, 32, 32, 1)) + 3.0).astype("float32")
    both = model(np.concatenate([a, b]))
    alone = model(a)
    for label in both:
        np.testing.assert_allclose(both[label].numpy()[:1], alone[label].numpy(), atol=1e-5)


def test_model_config_rejects_unknown_options():
    for field, value in (("init", "orthogonal"), ("norm", "batch"), ("norm_groups", 0)):
        with pytest.raises(ValueError, match=field):
            model_lib.build_model(config_lib.ModelConfig(**{**TINY_MODEL, field: value}))
    assert model_lib._groups(12, 8) == 6 and model_lib._groups(4, 8) == 4


# --------------------------------------------------------------------------- schedule


def test_warmup_and_cosine_schedule_values():
    cosine = schedules.WarmupSchedule(1e-3, total_steps=100, warmup_steps=10, kind="cosine")
    lr = [float(cosine(step)) for step in range(100)]
    np.testing.assert_allclose(lr[:10], [1e-3 * (i + 1) / 10 for i in range(10)], rtol=1e-5)
    assert lr[10] == pytest.approx(1e-3, rel=1e-5)
    assert lr[55] == pytest.approx(0.5e-3, rel=1e-3)  # Half way through the decay.
    assert all(a >= b for a, b in zip(lr[10:], lr[11:])) and lr[-1] < 1e-6
    constant = schedules.WarmupSchedule(1e-3, total_steps=100, warmup_steps=4)
    assert [round(float(constant(s)) * 1e4, 6) for s in (0, 3, 50, 99)] == [2.5, 10, 10, 10]
    # Serializable (the optimizer is checkpointed with it).
    again = schedules.WarmupSchedule.from_config(cosine.get_config())
    assert float(again(37)) == pytest.approx(float(cosine(37)))


def test_learning_rate_from_config():
    base = train_lib.TrainConfig(data_dir="d", model_dir="m", epochs=5, learning_rate=1e-3)
    assert schedules.make_learning_rate(base, 10) == 1e-3  # The paper: a plain constant.
    warm = schedules.make_learning_rate(
        train_lib.TrainConfig(
            data_dir="d",
            model_dir="m",
            epochs=5,
            learning_rate=1e-3,
            lr_schedule="cosine",
            warmup_epochs=0.5,
        ),
        10,
    )
    assert (warm.total_steps, warm.warmup_steps, warm.kind) == (50, 5, "cosine")
    with pytest.raises(ValueError, match="lr_schedule"):
        train_lib.TrainConfig(data_dir="d", model_dir="m", lr_schedule="step")
    with pytest.raises(ValueError, match="warmup_epochs"):
        train_lib.TrainConfig(data_dir="d", model_dir="m", warmup_epochs=-1)


def test_cosine_run_cannot_change_its_length_on_resume():
    saved = train_lib.TrainConfig(data_dir="d", model_dir="m", epochs=10).to_json_dict()
    longer = train_lib.TrainConfig(data_dir="d", model_dir="m", epochs=20).to_json_dict()
    assert run_dir.config_differences(saved, longer) == []  # Constant: a longer run is fine.
    saved_cos = dict(saved, lr_schedule="cosine")
    longer_cos = dict(longer, lr_schedule="cosine")
    assert run_dir.config_differences(saved_cos, longer_cos) == ["epochs: saved 10, now 20"]


def test_a_moved_run_directory_resumes_but_other_data_does_not():
    saved = train_lib.TrainConfig(data_dir="d", model_dir="/old/run").to_json_dict()
    moved = train_lib.TrainConfig(data_dir="d", model_dir="/new/run").to_json_dict()
    assert run_dir.config_differences(saved, moved) == []
    other_data = train_lib.TrainConfig(data_dir="e", model_dir="/new/run").to_json_dict()
    assert run_dir.config_differences(saved, other_data) == ["data_dir: saved 'd', now 'e'"]


def test_one_seed_and_runs_saved_with_the_retired_input_seed_still_resume():
    config = train_lib.TrainConfig(data_dir="d", model_dir="m", seed=7)
    saved = config.to_json_dict()
    assert "seed" not in saved["input"] and saved["seed"] == 7  # The run's seed, once.
    older = json.loads(json.dumps(saved))
    older["input"]["seed"] = 7  # What runs saved before the seed was one setting.
    assert run_dir.config_differences(older, saved) == []
    other = train_lib.TrainConfig(data_dir="d", model_dir="m", seed=8).to_json_dict()
    assert run_dir.config_differences(older, other) == ["seed: saved 7, now 8"]


# --------------------------------------------------------------------------- selection rule


def test_model_selection_tie_rule():
    nan = float("nan")
    # Higher AUC wins whatever the loss.
    assert validation.is_improvement(0.8, 0.7, loss=5.0, best_loss=1.0)
    assert not validation.is_improvement(0.7, 0.8, loss=0.1, best_loss=1.0)
    # Equal AUC: the lower validation loss wins; equal loss too: the earlier epoch stays.
    assert validation.is_improvement(0.8, 0.8, loss=0.9, best_loss=1.0)
    assert not validation.is_improvement(0.8, 0.8, loss=1.1, best_loss=1.0)
    assert not validation.is_improvement(0.8, 0.8, loss=1.0, best_loss=1.0)
    assert not validation.is_improvement(0.8, 0.8)  # No losses known: the earlier epoch.
    assert not validation.is_improvement(0.8, 0.8, loss=nan, best_loss=1.0)
    assert validation.is_improvement(0.8 + 1e-12, 0.8, loss=0.9, best_loss=1.0)  # A tie.


# --------------------------------------------------------------------------- permutation


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sharded"))
    train_fixtures.write_records(
        path, {"train": 12, "val": 4, "test": 2}, slices=(3,), size=16, shards_per_split=3
    )
    return path


def _ids(dataset, n):
    return [meta["exam_id"].numpy()[0].decode() for _, _, meta in dataset.take(n)]


def test_whole_split_buffer_makes_each_epoch_a_permutation(sharded_dir):
    config = config_lib.InputConfig(input_variant="t2-t0", shuffle_buffer=0)
    ds = input_pipeline.make_dataset(
        sharded_dir, "train", config, training=True, repeat=True, with_ids=True, seed=3
    )
    ids = _ids(ds, 36)
    every = sorted(f"train-e{i}" for i in range(12))
    epochs = [ids[i * 12 : (i + 1) * 12] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == every  # Each exam exactly once per epoch.
    assert len({tuple(e) for e in epochs}) == 3  # A new order every epoch.
    # Not tied to the shards: exams of one shard (every third exam) do not stay in a block.
    first_shard = {f"train-e{i}" for i in range(0, 12, 3)}
    positions = [epochs[0].index(e) for e in first_shard]
    assert max(positions) - min(positions) > 4
    # Over many seeds every exam reaches the first position (a small buffer would favour the
    # exams of the first shards read).
    firsts = collections.Counter(
        _ids(
            input_pipeline.make_dataset(
                sharded_dir,
                "train",
                config,
                training=True,
                with_ids=True,
                seed=s,
            ),
            1,
        )[0]
        for s in range(40)
    )
    assert len(firsts) >= 9


def test_two_training_epochs_visit_every_exam_once_each(sharded_dir, tmp_path, monkeypatch):
    seen = []
    retired = []
    retire = train_lib._retire_in_background

    def spy(holder):
        # The loop hands over its last references: none left in its frame to drop later (the
        # iterator's destruction, which can wait seconds, would then happen in the loop).
        loop_locals = sys._getframe(1).f_locals.values()
        retired.append(any(v is obj for v in loop_locals for obj in holder))
        thread = retire(holder)
        # Not a daemon: the interpreter waits for it at exit rather than killing it inside
        # TensorFlow's destructor (which aborts the process).
        assert not thread.daemon
        return thread

    monkeypatch.setattr(train_lib, "_retire_in_background", spy)

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(batch)

    argv = [
        f"--data_dir={sharded_dir}",
        f"--model_dir={tmp_path / 'run'}",
        *train_fixtures.TINY_FLAGS,
        "--shuffle_buffer=0",
        "--epochs=2",
        "--noprogress",
    ]
    config = _config(argv)
    history = train_lib.train(config, extra_callbacks=[Record()])
    assert seen == list(range(12)) * 2
    assert retired == [False, False]
    # The dataset of each epoch, as the loop builds it, is a permutation of the split.
    for epoch in range(2):
        ds = input_pipeline.make_dataset(
            sharded_dir,
            "train",
            config.input,
            training=True,
            with_ids=True,
            seed=config.seed * 100_003 + epoch,
        )
        assert sorted(_ids(ds, 100)) == sorted(f"train-e{i}" for i in range(12))
    assert history["epoch"] == [1, 2]


def test_whole_split_buffer_refused_when_it_would_not_fit(sharded_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_data, "_physical_memory_bytes", lambda: 1000)
    config = _config(
        [
            f"--data_dir={sharded_dir}",
            f"--model_dir={tmp_path / 'run'}",
            *train_fixtures.TINY_FLAGS,
            "--shuffle_buffer=0",
        ]
    )
    with pytest.raises(train_lib.SetupError, match="shuffle_buffer=0 would hold"):
        train_data.inspect_data(config)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        config_lib.InputConfig(shuffle_buffer=-1)


# --------------------------------------------------------------------------- end to end


def test_options_train_resume_and_export(sharded_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    argv = [
        f"--data_dir={sharded_dir}",
        f"--model_dir={model_dir}",
        *train_fixtures.TINY_FLAGS,
        "--init=he_zero_residual",
        "--norm=group",
        "--norm_groups=2",
        "--lr_schedule=cosine",
        "--warmup_epochs=1",
        "--shuffle_buffer=0",
        "--noprogress",
    ]
    first = train.run([*argv, "--epochs=2"])
    assert first["epoch"] == [1, 2] and all(np.isfinite(first["loss"]))
    rows = run_dir.read_metrics_csv(os.path.join(model_dir, "metrics.csv"))
    for row in rows:  # Where each epoch's time went.
        assert 0 < row["train_seconds"] <= row["seconds"] and 0 < row["val_seconds"]
    # A cosine run's length is part of its recipe: resuming with more epochs is refused.
    with pytest.raises(SystemExit, match="epochs: saved 2, now 3"):
        train.run([*argv, "--epochs=3"])
    again = train.run([*argv, "--epochs=2"])  # The same command: finished, nothing retrained.
    assert again["epoch"] == [1, 2] and again["loss"] == first["loss"]
    best = keras.models.load_model(os.path.join(model_dir, "best.keras"))
    assert any(
        isinstance(layer, keras.layers.GroupNormalization)
        for layer in best.get_layer("trunk").layers
    )


def test_options_round_trip_through_flags_and_the_tuner():
    config = _config(
        [
            "--data_dir=d",
            "--model_dir=m",
            "--init=he_zero_residual",
            "--norm=group",
            "--norm_groups=4",
            "--lr_schedule=cosine",
            "--warmup_epochs=1.5",
            "--shuffle_buffer=0",
        ]
    )
    assert (config.model.init, config.model.norm, config.model.norm_groups) == (
        "he_zero_residual",
        "group",
        4,
    )
    assert (config.lr_schedule, config.warmup_epochs, config.input.shuffle_buffer) == (
        "cosine",
        1.5,
        0,
    )
    assert flags_lib.train_config_from_flag_lines(flags_lib.train_flag_lines(config)) == config
    # The paper's defaults stay the paper's.
    paper = _config(["--data_dir=d", "--model_dir=m"])
    assert (paper.model.init, paper.model.norm, paper.lr_schedule, paper.warmup_epochs) == (
        "glorot",
        "none",
        "constant",
        0.0,
    )

    space = tune_space.parse_search_space(
        {
            "lr_schedule": {"type": "choice", "values": ["constant", "cosine"]},
            "init": {"type": "choice", "values": ["glorot", "he_zero_residual"]},
            "norm": {"type": "fixed", "value": "group"},
            "warmup_epochs": {"type": "choice", "values": [0.0, 1.0]},
        }
    )
    import keras_tuner as kt

    hp = kt.HyperParameters()
    values = space.declare(hp)
    tuned = tune_space.apply_values(config, values)
    assert tuned.lr_schedule in ("constant", "cosine") and tuned.model.norm == "group"
    # The string "none" is a value of --norm, not JSON null (a trial once got norm=None).
    norms = tune_space.parse_search_space({"norm": {"type": "choice", "values": ["none", "group"]}})
    assert norms.decode_values({"norm": "none"}) == {"norm": "none"}
    hp = kt.HyperParameters()
    hp.values["norm"] = "none"
    assert tune_space.apply_values(config, norms.declare(hp)).model.norm == "none"
    with pytest.raises(tune_space.SearchSpaceError, match="init"):
        tune_space.parse_search_space({"init": {"type": "choice", "values": ["uniform"]}})


def test_tune_malloc_is_safe_to_call_twice():
    memory.tune_malloc()
    memory.tune_malloc()
    assert math.isfinite(float(tf.reduce_sum(tf.ones((1024, 1024)))))


def test_hyperband_rounds_of_a_cosine_trial_train_from_the_start(tmp_path, monkeypatch):
    seen = {}

    def fake_train(config, extra_callbacks=None):
        seen["config"] = config
        seen["copied"] = os.path.exists(os.path.join(config.model_dir, "copied_marker"))
        return {"val_malignant_auc": [0.7], "val_benign_auc": [0.6], "best_epoch": 1}

    monkeypatch.setattr(train_lib, "train", fake_train)
    previous = tmp_path / "previous_round"
    previous.mkdir()
    (previous / "copied_marker").write_text("x")
    base = train_lib.TrainConfig(data_dir="d", model_dir="m", epochs=9)
    space = tune_space.parse_search_space({"lr_schedule": {"type": "fixed", "value": "cosine"}})
    model = tune_lib.DoublyDeepHyperModel(base, space)
    import keras_tuner as kt

    config = model.build(kt.HyperParameters())
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    model.fit(None, config, trial_dir=str(tmp_path / "t1"), epochs=9, warm_start_dir=str(previous))
    assert seen["config"].lr_schedule == "cosine" and not seen["copied"]
    # A constant schedule continues the earlier round's run, as before.
    constant = dataclasses.replace(config, lr_schedule="constant")
    model.fit(
        None, constant, trial_dir=str(tmp_path / "t2"), epochs=9, warm_start_dir=str(previous)
    )
    assert seen["copied"]
