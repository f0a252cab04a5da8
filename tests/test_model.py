"""Tests of the Doubly Deep CNN: exact size, shapes, slice modes, loss, FLOPs, saving, backends."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from mri_keras import constants
from mri_keras import model as model_lib
from mri_keras.config import ModelConfig

# width 4, one block per stage, 3x3 stem, 8 3D channels; 21,401 parameters by hand:
# stem 3*3*1*4+4 = 40; stage1 2*(9*4*4+4) = 296; stage2 (9*4*8+8)+(9*8*8+8)+(4*8+8) = 920;
# stage3 (9*8*16+16)+(9*16*16+16)+(8*16+16) = 3632; stage4 (9*16*32+32)+(9*32*32+32)+(16*32+32)
# = 14432; collapse 32+1 = 33 -> trunk 19,353; 3D block (27*8+8)+(27*8*8+8)+(8+8) = 1976;
# heads 4*(8*2+2) = 72.
NARROW = ModelConfig(width=4, blocks_per_stage=(1, 1, 1, 1), stem_kernel=3, channels_3d=8)
NARROW_PARAMS, NARROW_TRUNK_PARAMS = 21_401, 19_353
TINY = ModelConfig(width=4, channels_3d=8)


def _volume(slices, height, width, batch=1, seed=0):
    return (
        np.random.default_rng(seed).normal(size=(batch, slices, height, width, 1)).astype("float32")
    )


def test_default_model_has_the_papers_parameter_count():
    model = model_lib.build_model(ModelConfig())
    assert model.count_params() == 11_611_785
    assert model.get_layer("trunk").count_params() == 11_164_417
    assert model.inputs[0].name == "volume"
    assert list(model.output_names) == list(constants.LABELS)


def test_narrow_model_parameter_count_matches_hand_count():
    model = model_lib.build_model(NARROW)
    assert model.count_params() == NARROW_PARAMS
    assert model.get_layer("trunk").count_params() == NARROW_TRUNK_PARAMS
    # No batch norm anywhere, biases on every conv.
    trunk = model.get_layer("trunk")
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in trunk.layers)
    assert all(l.use_bias for l in trunk.layers if isinstance(l, keras.layers.Conv2D))


@pytest.mark.parametrize(
    "slices,height,width,batch",
    [(1, 32, 32, 1), (3, 33, 45, 1), (7, 64, 48, 2), (2, 17, 95, 1)],
)
def test_output_shapes_for_any_slice_count_and_odd_sizes(slices, height, width, batch):
    model = model_lib.build_model(TINY)
    out = model(_volume(slices, height, width, batch))
    assert set(out) == set(constants.LABELS)
    for label in constants.LABELS:
        probs = keras.ops.convert_to_numpy(out[label])
        assert probs.shape == (batch, 2)
        assert out[label].dtype == "float32"
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # The trunk reduces in-plane size 32x with "same" padding (ceil at each stride).
    maps = model.get_layer("trunk")(_volume(slices, height, width)[0])
    assert tuple(maps.shape) == (slices, -(-height // 32), -(-width // 32), 1)


@pytest.mark.parametrize("slices", [1, 4])
def test_fold_and_time_distributed_give_the_same_outputs(slices):
    fold = model_lib.build_model(TINY)
    td = model_lib.build_model(dataclass_replace(TINY, slice_mode="time_distributed"))
    td.set_weights(fold.get_weights())
    volume = _volume(slices, 40, 36, batch=2, seed=slices)
    a, b = fold(volume), td(volume)
    for label in constants.LABELS:
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a[label]), keras.ops.convert_to_numpy(b[label]), atol=1e-6
        )


_TD_GRADIENT_SCRIPT = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    from mri_keras import model as model_lib
    from mri_keras.config import ModelConfig
    fold = model_lib.build_model(ModelConfig(width=4, channels_3d=8))
    td = model_lib.build_model(
        ModelConfig(width=4, channels_3d=8, slice_mode="time_distributed"))
    td.set_weights(fold.get_weights())
    spec = [tf.TensorSpec((1, None, None, None, 1), tf.float32)]

    def loss_and_grads(model, volume):
        with tf.GradientTape() as tape:
            out = model(volume, training=True)
            loss = tf.reduce_sum(out["left_malignant"][:, 1]) - tf.reduce_sum(out["right_benign"])
        return loss, tape.gradient(loss, model.trainable_variables)

    volume = tf.constant(np.random.default_rng(7).normal(size=(1, 5, 48, 40, 1)), tf.float32)
    maps = tf.function(td.get_layer("trunk_td"), input_signature=spec)(volume)
    assert tuple(maps.shape) == (1, 5, 2, 2, 1), maps.shape
    loss_f, grads_f = tf.function(lambda v: loss_and_grads(fold, v), input_signature=spec)(volume)
    loss_t, grads_t = tf.function(lambda v: loss_and_grads(td, v), input_signature=spec)(volume)
    np.testing.assert_allclose(loss_t.numpy(), loss_f.numpy(), atol=1e-6)
    assert sum(g is not None for g in grads_f) > 20
    for a, b in zip(grads_f, grads_t):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5)
    print("OK")
    """
)


def test_time_distributed_maps_every_slice_inside_tf_function():
    # Keras 3.15's TimeDistributed ran only `batch` slices when S is unknown in a tf.function.
    # Run in a subprocess with oneDNN off: TF 2.21's oneDNN CPU kernels intermittently corrupt
    # the heap in gradients through the per-slice map (see SliceTimeDistributed).
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _TD_GRADIENT_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"width": 0}, "width"),
        ({"blocks_per_stage": (2, 2, 2)}, "blocks_per_stage"),
        ({"slice_mode": "loop"}, "slice_mode"),
        ({"dropout": 1.0}, "dropout"),
        ({"remat_chunk": -1}, "remat_chunk"),
        ({"remat_chunk": 4, "slice_mode": "time_distributed"}, "slice_mode"),
        ({"dtype_policy": "float16"}, "dtype_policy"),
    ],
)
def test_invalid_configs_are_rejected_with_the_field_named(changes, match):
    # The config itself refuses to exist, before any model is built.
    with pytest.raises(ValueError, match=f"Received: .*{match}"):
        dataclass_replace(TINY, **changes)


def test_compute_loss_matches_hand_computed_cross_entropy():
    probs = {
        "left_benign": [[0.9, 0.1], [0.3, 0.7]],
        "left_malignant": [[0.6, 0.4], [0.5, 0.5]],
        "right_benign": [[0.2, 0.8], [0.99, 0.01]],
        "right_malignant": [[0.75, 0.25], [0.1, 0.9]],
    }
    truth = {
        "left_benign": [[1, 0], [0, 1]],
        "left_malignant": [[0, 1], [1, 0]],
        "right_benign": [[0, 1], [0, 1]],
        "right_malignant": [[1, 0], [0, 1]],
    }
    expected = [
        -(np.log(0.9) + np.log(0.4) + np.log(0.8) + np.log(0.75)),
        -(np.log(0.7) + np.log(0.5) + np.log(0.01) + np.log(0.9)),
    ]
    y_true = {k: np.asarray(v, "float32") for k, v in truth.items()}
    y_pred = {k: np.asarray(v, "float32") for k, v in probs.items()}
    loss = keras.ops.convert_to_numpy(model_lib.compute_loss(y_true, y_pred))
    assert loss.shape == (2,)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="left_benign"):
        model_lib.compute_loss({}, y_pred)


def _flops_from_layers(model, slices, height, width):
    """Independent count: 2 x MACs from the built layers' real output shapes."""
    trunk = model.get_layer("trunk")
    sub = keras.Model(trunk.input, [l.output for l in trunk.layers[1:]])
    outs = sub(_volume(slices, height, width)[0])
    macs = 0
    for layer, out in zip(trunk.layers[1:], outs):
        if isinstance(layer, keras.layers.Conv2D):
            k = layer.kernel.shape
            macs += int(np.prod(out.shape[:3])) * k[0] * k[1] * k[2] * k[3]
    maps = (1, slices) + tuple(outs[-1].shape[1:3]) + (1,)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv3D):
            k = layer.kernel.shape
            macs += int(np.prod(maps[1:4])) * int(np.prod(k))
        if isinstance(layer, keras.layers.Dense):
            macs += int(np.prod(layer.kernel.shape))
    return 2 * macs


@pytest.mark.parametrize("slices,height,width", [(3, 33, 45), (2, 64, 64)])
def test_count_flops_matches_the_built_layers(slices, height, width):
    model = model_lib.build_model(NARROW)
    assert model_lib.count_flops(NARROW, slices, height, width) == _flops_from_layers(
        model, slices, height, width
    )


def test_count_flops_default_16x224x224_matches_hand_count():
    # MACs per slice: stem 112*112*64*25 = 20,070,400; stage 1 4 * 56*56*64*64*9 = 462,422,016;
    # stages 2-4 each 411,041,792 (conv1 57,802,752 + 3 convs 115,605,504 + proj 6,422,528);
    # collapse 7*7*512 = 25,088 -> 1,715,642,880. 3D block per voxel (16*7*7 voxels):
    # 128*27 + 128*27*128 + 128 = 445,952. Heads 4*128*2 = 1,024.
    macs = 16 * 1_715_642_880 + 16 * 7 * 7 * 445_952 + 1_024
    assert model_lib.count_flops(ModelConfig(), 16, 224, 224) == 2 * macs == 55_599_826_944
    with pytest.raises(ValueError, match="slices"):
        model_lib.count_flops(ModelConfig(), 0, 224, 224)


@pytest.mark.parametrize("config", [TINY, dataclass_replace(TINY, remat_chunk=2)])
def test_saved_keras_file_reloads_with_identical_outputs(tmp_path, config):
    model = model_lib.build_model(config)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    volume = _volume(3, 40, 40)
    a, b = model(volume), reloaded(volume)
    for label in constants.LABELS:
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a[label]), keras.ops.convert_to_numpy(b[label])
        )


_OTHER_BACKEND_SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras
    from mri_keras import model as model_lib
    from mri_keras.config import ModelConfig
    assert keras.backend.backend() == "{backend}"
    config = ModelConfig(width=4, channels_3d=8)
    model = model_lib.build_model(config)
    assert model.count_params() == {params}
    out = model(np.zeros((1, 3, 33, 45, 1), "float32"))
    assert all(tuple(v.shape) == (1, 2) for v in out.values()), out
    try:
        model_lib.build_model(ModelConfig(width=4, channels_3d=8, remat_chunk=2))
    except ValueError as e:
        assert "TensorFlow backend" in str(e)
    else:
        raise AssertionError("remat on a non-TF backend must raise")
    print("OK")
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_model_builds_and_runs_under_another_keras_backend(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    params = model_lib.build_model(TINY).count_params()
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "-c", _OTHER_BACKEND_SCRIPT.format(backend=backend, params=params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
