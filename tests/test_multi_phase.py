"""Multi-phase input: ``--input=t0,t1,t2`` stacks several input variants as channels.

From the flag to the export: canonical form and errors, per-channel preprocessing (equal to
each variant's own input stacked), augmentation applied to every channel alike, a tiny run
trained and exported, its two serving signatures and the Keras model agreeing, saliency over
the channels.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import train_fixtures

from mri_keras import config as config_lib
from mri_keras import constants, export, heatmap, inference, input_pipeline, train
from mri_keras import flags as flags_lib
from mri_keras import model as model_lib
from tfrecords_tools import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "text, canonical, phases",
    [
        ("t0,t1,t2", "t0,t1,t2", ("t0", "t1", "t2")),
        ("t1sub,t2sub,t3sub", "t1-t0,t2-t0,t3-t0", ("t0", "t1", "t2", "t3")),
        ("t3, t2sub", "t3,t2-t0", ("t0", "t2", "t3")),  # Order kept; phases in PHASES order.
        ("t2sub", "t2-t0", ("t0", "t2")),  # One variant: as before.
    ],
)
def test_a_list_of_variants_is_one_canonical_input(text, canonical, phases):
    assert constants.canonical_input(text) == canonical
    assert constants.phases_needed(text) == phases
    config = config_lib.InputConfig(input_variant=text)
    assert config.input_variant == canonical
    assert config.channels == len(canonical.split(","))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("t0,t9", "'t9' (in 't0,t9') is not an input variant"),
        ("t0,t1sub,t4", "'t4' (in 't0,t1sub,t4') is not an input variant"),
        ("t0,,t1", "'t0,,t1' has an empty element"),
        ("t1,t1", "'t1,t1' names 't1' twice"),
        ("t2sub,t2-t0", "'t2sub,t2-t0' names 't2-t0' twice (as 't2sub' and 't2-t0')"),
        ("t0, t0", "'t0, t0' names 't0' twice"),
    ],
)
def test_bad_input_flags_name_the_bad_element(text, problem):
    with pytest.raises(ValueError) as e:
        flags_lib.train_config_from_flag_lines(["--data_dir=d", "--model_dir=m", f"--input={text}"])
    message = str(e.value)
    assert message.startswith("--input must be one of ('t0', 't1', 't2', 't3', 't1-t0'"), message
    assert f"; {problem}. Received: --input={text}" in message, message


def test_multi_channel_flag_round_trips_through_flag_lines():
    config = flags_lib.train_config_from_flag_lines(
        ["--data_dir=d", "--model_dir=m", "--input=t1sub,t2sub,t3sub"]
    )
    lines = flags_lib.train_flag_lines(config)
    assert "--input=t1-t0,t2-t0,t3-t0" in lines
    assert flags_lib.train_config_from_flag_lines(lines) == config


@pytest.mark.parametrize(
    "flagfile, canonical",
    [("three_channel.flags", "t0,t1,t2"), ("subtractions.flags", "t1-t0,t2-t0,t3-t0")],
)
def test_the_two_flagfiles_are_the_paper_recipe_with_a_multi_channel_input(flagfile, canonical):
    def config_of(name):
        argv = flags_lib.expand_flagfiles(
            ["prog", f"--flagfile={name}", "--data_dir=d", "--model_dir=m"]
        )
        return flags_lib.train_config_from_flag_lines(argv[1:])

    config, paper = config_of(flagfile), config_of("t2sub.flags")
    assert config.input.input_variant == canonical
    # Everything else is base.flags, as for the paper's rows.
    assert config.model == paper.model and config.learning_rate == paper.learning_rate
    assert config.input.crop == paper.input.crop == 0.875


def _phases(shape=(3, 8, 10), seed=0):
    rng = np.random.default_rng(seed)
    return {
        p: tf.constant(rng.normal(100.0 * (i + 1), 5.0 + 10.0 * i, size=shape).astype(np.float32))
        for i, p in enumerate(constants.PHASES)
    }


@pytest.mark.parametrize("normalization", constants.NORMALIZATIONS)
@pytest.mark.parametrize("text", ["t0,t1,t2", "t1sub,t2sub,t3sub", "t3,t1-t0"])
def test_each_channel_is_its_own_single_variant_input(text, normalization):
    phases = _phases()
    config = config_lib.InputConfig(input_variant=text, normalization=normalization)
    got = input_pipeline.preprocess(phases, config).numpy()
    assert got.shape == (3, 8, 10, config.channels)
    for c, variant in enumerate(constants.input_channels(text)):
        single = config_lib.InputConfig(input_variant=variant, normalization=normalization)
        expected = input_pipeline.preprocess(phases, single).numpy()  # (S, H, W, 1)
        np.testing.assert_array_equal(got[..., c], expected[..., 0])


def test_preprocess_keeps_the_channel_count_static_in_a_graph():
    config = config_lib.InputConfig(input_variant="t0,t1,t2")
    spec = tf.TensorSpec([None, None, None], tf.float32)

    @tf.function(input_signature=[spec, spec, spec])
    def fn(t0, t1, t2):
        return input_pipeline.preprocess({"t0": t0, "t1": t1, "t2": t2}, config)

    out_shape = fn.get_concrete_function().structured_outputs.shape
    assert out_shape.as_list() == [None, None, None, 3]


def test_flips_and_crops_move_every_channel_alike_and_flips_swap_labels():
    config = config_lib.InputConfig(input_variant="t0,t1,t2", crop=(5, 7), crop_slices=2)
    volume = input_pipeline.preprocess(_phases(), config)  # (3, 8, 10, 3)
    labels = tf.constant([1, 0, 0, 1])
    flipped_seen = unflipped_seen = False
    for s in range(12):
        seed = tf.constant([s, 0])
        out, out_labels = input_pipeline.augment(volume, labels, seed, config)
        assert out.shape == (2, 5, 7, 3)
        # Each channel alone (a 1-channel volume under the same seed) gets the same window
        # and the same flip: the channels stay aligned voxel for voxel.
        for c in range(3):
            alone, alone_labels = input_pipeline.augment(
                volume[..., c : c + 1], labels, seed, config
            )
            np.testing.assert_array_equal(out.numpy()[..., c], alone.numpy()[..., 0])
            np.testing.assert_array_equal(out_labels.numpy(), alone_labels.numpy())
        if out_labels.numpy().tolist() == [0, 1, 1, 0]:  # left <-> right swapped
            flipped_seen = True
        else:
            assert out_labels.numpy().tolist() == [1, 0, 0, 1]
            unflipped_seen = True
    assert flipped_seen and unflipped_seen


def test_flip_mirrors_all_channels_and_swaps_the_labels():
    config = config_lib.InputConfig(input_variant="t1sub,t2sub,t3sub")
    volume = input_pipeline.preprocess(_phases(), config)
    labels = tf.constant([1, 1, 0, 0])
    for s in range(12):
        out, out_labels = input_pipeline.augment(volume, labels, tf.constant([s, 0]), config)
        if out_labels.numpy().tolist() == [0, 0, 1, 1]:
            np.testing.assert_array_equal(out.numpy(), volume.numpy()[:, :, ::-1, :])
            return
    pytest.fail("no flip in 12 seeds")


def test_a_model_takes_as_many_channels_as_the_input():
    config = config_lib.ModelConfig(width=4, blocks_per_stage=(1, 1, 1, 1), channels_3d=8)
    one = model_lib.build_model(config)
    three = model_lib.build_model(config, channels=3)
    assert three.inputs[0].shape[-1] == 3 and one.inputs[0].shape[-1] == 1
    # Only the stem's kernel grows: 2 more input channels x 5 x 5 x width.
    assert three.count_params() - one.count_params() == 2 * 5 * 5 * 4
    out = three(tf.zeros([1, 3, 32, 32, 3]))
    assert out["left_malignant"].shape == (1, 2)
    flops = model_lib.count_flops(config, 3, 32, 32, channels=3)
    assert flops - model_lib.count_flops(config, 3, 32, 32) == 2 * (16 * 16 * 4 * 25 * 2) * 3
    with pytest.raises(ValueError, match="channels must be a positive int"):
        model_lib.build_model(config, channels=0)


def test_open_split_checks_every_channels_phases(tmp_path):
    records = str(tmp_path / "records")
    train_fixtures.write_records(records, {"train": 2, "val": 2}, phases=("t0", "t1", "t2"))
    input_pipeline.open_split(records, "train", "t0,t1,t2")
    with pytest.raises(ValueError, match=r"lack \['t3'\]"):
        input_pipeline.open_split(records, "train", "t1sub,t2sub,t3sub")


@pytest.fixture(scope="module")
def three_channel_run(tmp_path_factory):
    """A tiny model trained 1 epoch with --input=t0,t1,t2 through the real entry point."""
    base = tmp_path_factory.mktemp("three_channel")
    data = str(base / "records")
    train_fixtures.write_records(data, {"train": 4, "val": 4, "test": 2})
    model_dir = str(base / "run")
    argv = [f"--data_dir={data}", f"--model_dir={model_dir}", *train_fixtures.TINY_FLAGS]
    train.run([*argv, "--epochs=1", "--input=t0,t1,t2"])
    return data, model_dir


def _test_records(data):
    _, files = input_pipeline.open_split(data, "test", "t0,t1,t2")
    return [r.numpy() for r in tf.data.TFRecordDataset(files)]


def test_export_signatures_and_keras_model_agree_on_a_three_channel_run(three_channel_run):
    data, model_dir = three_channel_run
    with open(os.path.join(model_dir, constants.CONFIG_NAME)) as f:
        assert json.load(f)["input"]["input_variant"] == "t0,t1,t2"
    exported = export.load_exported(os.path.join(model_dir, constants.EXPORT_DIR))
    assert exported.input_variant == "t0,t1,t2" and exported.phases == ("t0", "t1", "t2")
    _, kwargs = exported.saved.signatures["serving_default"].structured_input_signature
    assert sorted(kwargs) == ["t0", "t1", "t2"]

    keras_predictor = inference.load_predictor(model_dir, model_format="keras")
    assert keras_predictor.input_config.input_variant == "t0,t1,t2"
    assert keras_predictor.keras_model.inputs[0].shape[-1] == 3
    export_predictor = inference.load_predictor(model_dir, model_format="export")
    assert export_predictor.phases == ("t0", "t1", "t2")
    records = _test_records(data)
    by_example = exported.predict_examples(records)
    for i, record in enumerate(records):
        parsed = schema.decode_example(tf.constant(record), ("t0", "t1", "t2"))
        phases = {p: parsed[p].numpy() for p in ("t0", "t1", "t2")}
        from_keras = keras_predictor(phases)
        np.testing.assert_allclose(exported.predict_phases(phases), from_keras, atol=1e-5)
        np.testing.assert_allclose(export_predictor(phases), from_keras, atol=1e-5)
        np.testing.assert_allclose(by_example["probabilities"][i], from_keras, atol=1e-5)
        assert by_example["exam_id"][i] == parsed[schema.KEY_EXAM_ID].numpy().decode()


def test_saliency_of_a_three_channel_model_sums_the_channels_gradients(three_channel_run):
    data, model_dir = three_channel_run
    predictor = inference.load_predictor(model_dir, model_format="keras")
    parsed = schema.decode_example(tf.constant(_test_records(data)[0]), ("t0", "t1", "t2"))
    phases = {p: parsed[p].numpy() for p in ("t0", "t1", "t2")}
    heat, image = heatmap.exam_saliency(predictor.keras_model, phases, predictor.input_config)
    shape = phases["t0"].shape
    assert heat.shape == image.shape == shape
    volume = inference.preprocess_phases(phases, predictor.input_config)
    np.testing.assert_array_equal(image, volume.numpy()[..., 0])  # The first channel shown.
    x = tf.convert_to_tensor(volume)[tf.newaxis]
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = predictor.keras_model(x, training=False)
        score = sum(
            tf.reduce_sum(tf.math.log(out[k][:, 1]) - tf.math.log(out[k][:, 0]))
            for k in ("left_malignant", "right_malignant")
        )
    summed = tf.reduce_sum(tf.abs(tape.gradient(score, x)[0]), axis=-1).numpy()
    np.testing.assert_allclose(heat, summed / summed.max(), atol=1e-4)
    for method in ("hirescam", "gradcam_x_gradient"):
        assert heatmap.saliency(predictor.keras_model, volume, method=method).shape == shape


def test_a_saved_single_variant_config_still_loads(tmp_path):
    """Runs saved before multi-channel inputs: a plain variant, read back as one channel."""
    run = tmp_path / "old_run"
    run.mkdir()
    (run / constants.BEST_MODEL_NAME).write_bytes(b"")
    (run / constants.CONFIG_NAME).write_text(json.dumps({"input": {"input_variant": "t3-t0"}}))
    config = inference.load_input_config(inference.locate_model(str(run)))
    assert config.input_variant == "t3-t0" and config.channels == 1
    assert constants.phases_needed(config.input_variant) == ("t0", "t3")


def _write_eval(root, key, seed=None, n=40):
    from mri_keras import evaluate, predictions_io

    rng = np.random.default_rng(len(key))
    labels = (rng.random((n, 4)) < 0.4).astype(np.int64)
    probs = 1.0 / (1.0 + np.exp(-((2.0 * labels - 1.0) + rng.normal(size=(n, 4)))))
    pred = predictions_io.Predictions(
        tuple(f"e{i}" for i in range(n)), tuple(f"p{i // 2}" for i in range(n)), labels, probs
    )
    parts = [root, key] + ([f"seed_{seed}"] if seed is not None else []) + ["test"]
    evaluate.write_report(
        os.path.join(*parts), pred, {"name": key, **evaluate.summarize(pred, n_bootstrap=20)}
    )


@pytest.mark.parametrize("seeded", [False, True])
def test_table1_prints_extra_rows_after_the_paper_under_their_own_heading(tmp_path, seeded):
    from mri_keras import experiments

    root = str(tmp_path / "eval")
    seed = 0 if seeded else None
    _write_eval(root, "t2sub", seed)
    config = experiments.ExperimentsConfig(report="table1", eval_root=root, output_dir=root)
    without = experiments.run(config)
    assert "Beyond the paper" not in without and "channels" not in without  # The paper's table.
    _write_eval(root, "subtractions", seed)
    lines = experiments.run(config).splitlines()
    heading = next(i for i, l in enumerate(lines) if "Beyond the paper" in l)
    assert lines.index(next(l for l in lines if "Caruana ensemble" in l)) < heading
    row = lines[heading + 1]
    assert row.startswith("| t1 - t0, t2 - t0, t3 - t0 as 3 channels of one network |")
    assert "not run" not in row
    if seeded:
        assert "(1 seed)" in row and row.endswith("| - / - |")  # No paper figure to quote.
    keys = {r["key"] for r in __import__("csv").DictReader(open(os.path.join(root, "table1.csv")))}
    assert "subtractions" in keys and "three_channel" not in keys  # Not run: not listed.


def test_a_subtractions_export_takes_all_four_phases_once(tmp_path):
    """serving_default's keyword arguments are the union of the channels' phases (t0 once)."""
    input_config = config_lib.InputConfig(input_variant="t1sub,t2sub,t3sub")
    model_config = config_lib.ModelConfig(width=4, blocks_per_stage=(1, 1, 1, 1), channels_3d=8)
    model = model_lib.build_model(model_config, input_config.channels)
    path = export.export_model(model, str(tmp_path / "export"), input_config)
    exported = export.load_exported(path)
    _, kwargs = exported.saved.signatures["serving_default"].structured_input_signature
    assert sorted(kwargs) == ["t0", "t1", "t2", "t3"] and exported.phases == tuple(sorted(kwargs))
    phases = {p: v.numpy() for p, v in _phases((3, 32, 34)).items()}
    volume = inference.preprocess_phases(phases, input_config)[tf.newaxis]  # (1, 3, 32, 34, 3)
    out = model(volume, training=False)
    expected = [float(out[k][0, 1]) for k in constants.LABELS]
    np.testing.assert_allclose(exported.predict_phases(phases), expected, atol=1e-6)
