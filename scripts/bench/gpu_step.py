"""Train-step and device-preprocessing throughput on an accelerator, under ``KERAS_BACKEND=jax``.

Prepared for a borrowed GPU machine whose Python has JAX (and maybe PyTorch) but no TensorFlow:
it imports no TensorFlow (the model is ``keras.layers``/``keras.ops`` and the per-voxel
preprocessing is ``mri_keras.preprocessing``, also ``keras.ops``). Synthetic exams are made
with numpy as tf.data would hand them over with ``--preprocess_on=device``: the stored int16
phases, their rescale, a flip and a crop offset.

For each shape it times, after compiling, with ``jax.block_until_ready``:

* ``preprocess``: ``preprocessing.preprocess_exam`` alone (jit), ms per exam;
* ``train_step``: preprocessing + forward + backward + Adam update, one exam per step (the
  paper's batch), ``mixed_bfloat16`` by default, jit with the state donated;

and prints one JSON line per measurement: ms per exam, exams/s, and achieved TFLOP/s of the
step (3 x ``model.count_flops`` of the model input, as BENCHMARKS.md counts), with the device's
name.

Usage (on the GPU machine, from the repository root)::

    KERAS_BACKEND=jax python scripts/bench/gpu_step.py                 # 64 and 128 x 448 x 448
    KERAS_BACKEND=jax python scripts/bench/gpu_step.py --shapes=4,32,32 --width=4 --steps=2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")


def _stored_exam(rng, shape, phases, crop, index):
    """One exam as the device stream holds it (unbatched), with its augmentation drawn."""
    import numpy as np

    from mri_keras import preprocessing

    slices, height, width = shape
    exam = {}
    base = rng.gamma(2.0, 150.0, size=shape)
    for k, p in enumerate(phases):
        ints, floats, rescale = preprocessing.stored_keys(p)
        exam[ints] = np.rint(base * (1.0 + 0.3 * k)).astype(np.int16)
        exam[floats] = np.zeros((0, height, width), np.float32)
        exam[rescale] = np.asarray([1.6875, -16.0, 0.0], np.float32)
    size = tuple(crop)
    room = [n - c for n, c in zip(shape, size)]
    exam[preprocessing.CROP_BEGIN] = np.asarray([rng.integers(0, r + 1) for r in room], np.int32)
    exam[preprocessing.FLIP] = np.asarray(index % 2 == 1)
    return exam


def measure(shape, *, width=64, dtype_policy="mixed_bfloat16", steps=10, crop_fraction=1.0):
    """Times the device preprocessing and the train step at one exam shape.

    Args:
      shape: (S, H, W) of the stored exams.
      width: int. Model width (64: the paper's model). Defaults to 64.
      dtype_policy: str. Keras dtype policy of the model. Defaults to "mixed_bfloat16".
      steps: int. Timed steps after two compiling/warm-up steps. Defaults to 10.
      crop_fraction: float in (0, 1]. In-plane crop of the augmentation (1: none, so the model
        sees the full shape). Defaults to 1.0.

    Returns:
      list of two dicts (``preprocess``, ``train_step``).
    """
    import jax
    import keras
    import numpy as np
    from keras import ops

    from mri_keras import config as config_lib
    from mri_keras import constants, preprocessing
    from mri_keras import model as model_lib

    keras.utils.set_random_seed(0)
    input_config = config_lib.InputConfig(input_variant="t2-t0", flip=True)
    phases = constants.phases_needed(input_config.input_variant)
    slices, height, width_px = shape
    crop = (slices, round(crop_fraction * height), round(crop_fraction * width_px))
    model_config = config_lib.ModelConfig(
        width=width, dtype_policy=dtype_policy, **({} if width >= 16 else _tiny_model())
    )
    model = model_lib.build_model(model_config)
    optimizer = keras.optimizers.Adam(learning_rate=1e-5)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    exams = [_stored_exam(rng, shape, phases, crop, i) for i in range(2)]
    exams = [jax.device_put(e) for e in exams]
    targets = {k: jax.device_put(np.asarray([[1.0, 0.0]], np.float32)) for k in constants.LABELS}

    def preprocess(exam):
        exam = dict(exam, **{preprocessing.CROP_SIZE: crop})  # Static under jit.
        return preprocessing.preprocess_exam(exam, input_config)[None]

    def loss_fn(trainable, non_trainable, exam):
        volume = preprocess(exam)
        preds, non_trainable = model.stateless_call(trainable, non_trainable, volume, training=True)
        return ops.mean(model_lib.compute_loss(targets, preds)), non_trainable

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, exam):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, exam)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    preprocess_jit = jax.jit(preprocess)
    step_jit = jax.jit(train_step, donate_argnums=0)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )

    def timed(fn, n):
        start = time.perf_counter()
        for i in range(n):
            out = fn(i)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / n

    timed(lambda i: preprocess_jit(exams[i % 2]), 2)  # Compile.
    pre_s = timed(lambda i: preprocess_jit(exams[i % 2]), steps)

    holder = {"state": state}

    def one_step(i):
        loss, holder["state"] = step_jit(holder["state"], exams[i % 2])
        return loss

    compile_start = time.perf_counter()
    timed(one_step, 2)
    compile_s = time.perf_counter() - compile_start
    step_s = timed(one_step, steps)
    loss = float(one_step(0))
    flops = 3 * model_lib.count_flops(model_config, *crop)
    device = jax.devices()[0]
    common = dict(
        shape=list(shape),
        model_input=list(crop),
        width=width,
        dtype_policy=dtype_policy,
        device=f"{device.platform}:{getattr(device, 'device_kind', '?')}",
        backend=keras.backend.backend(),
        jax=jax.__version__,
        keras=keras.__version__,
        steps=steps,
        tensorflow_imported="tensorflow" in sys.modules,
    )
    return [
        dict(
            benchmark="preprocess",
            ms_per_exam=round(1e3 * pre_s, 3),
            exams_per_s=round(1 / pre_s, 1),
            voxels_per_ns=round(np.prod(shape) * len(phases) / pre_s / 1e9, 2),
            **common,
        ),
        dict(
            benchmark="train_step",
            ms_per_exam=round(1e3 * step_s, 2),
            exams_per_s=round(1 / step_s, 2),
            step_tflop=round(flops / 1e12, 4),
            achieved_tflops=round(flops / step_s / 1e12, 2),
            compile_s=round(compile_s, 1),
            loss_finite=bool(np.isfinite(loss)),
            **common,
        ),
    ]


def _tiny_model():
    return dict(blocks_per_stage=(1, 1, 1, 1), channels_3d=8, stem_kernel=3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        default="64,448,448;128,448,448",
        help="Semicolon-separated S,H,W shapes. Defaults to the paper's 64 and 128 x 448^2.",
    )
    parser.add_argument("--width", type=int, default=64, help="Model width (<16: tiny blocks).")
    parser.add_argument("--precision", default="mixed_bfloat16", help="Keras dtype policy.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per shape.")
    parser.add_argument("--crop", type=float, default=1.0, help="In-plane crop fraction.")
    args = parser.parse_args(argv)
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit(
            f"gpu_step.py runs under KERAS_BACKEND=jax; Keras uses {keras.backend.backend()!r}."
        )
    for text in args.shapes.split(";"):
        shape = tuple(int(v) for v in text.split(","))
        for result in measure(
            shape,
            width=args.width,
            dtype_policy=args.precision,
            steps=args.steps,
            crop_fraction=args.crop,
        ):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main()
