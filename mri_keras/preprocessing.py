"""Per-voxel preprocessing written in ``keras.ops``: runs inside a compiled step on an accelerator.

With ``preprocess_on="device"`` the tf.data pipeline (``input_pipeline.make_dataset``) only
parses each record into its stored 16-bit phases and their rescale, and draws the augmentation
(crop window, flip; the labels are swapped on the CPU); this module does the per-voxel work
(rescale, subtraction, normalisation, crop, flip) where the step runs. It imports no
TensorFlow, so the same definition runs under ``KERAS_BACKEND=jax`` on a machine without it
(``scripts/bench/gpu_step.py``).

The arithmetic is one definition: the CPU path (``input_pipeline.preprocess``, which the
export, evaluation and prediction call) computes its input image and normalisation with
:func:`input_image` and :func:`normalize` from here (keras.ops are TF ops under the TensorFlow
backend). What differs is data movement and the rescale: the CPU path crops and flips with its
own tf.data-tuned ops, and rescales in float64 where float32 cannot apply a rescale exactly
(``tfrecords_tools.schema.decode_volume``), where this module always computes ``v *
float32(slope) + float32(intercept)``. ``tests/test_preprocessing.py`` checks both paths agree
to float32 rounding on every input variant, stored dtype and normalisation, with and without
augmentation.

An element of the device stream is a dict (batch axis first, one exam per batch), per phase
``p`` the keys of :func:`stored_keys`: ``p`` int16 ``(1, S, H, W)`` (16-bit records; uint16
bitcast), ``p/float32`` float32 ``(1, S, H, W)`` (float32 records; the other of the two has 0
slices) and ``p/rescale`` float32 ``(1, 3)`` (slope, intercept, 1 if uint16); and, for a
training stream, ``crop_begin`` and ``crop_size`` int32 ``(1, 3)`` (slices, rows, cols) and
``flip`` bool ``(1,)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from keras import ops

from mri_keras import constants
from mri_keras.config import InputConfig

PREPROCESS_ON = ("cpu", "device")  # Resolved placements ("auto" is a training setting).
CROP_BEGIN, CROP_SIZE, FLIP = "crop_begin", "crop_size", "flip"


def stored_keys(phase: str) -> tuple[str, str, str]:
    """The element keys of one phase: int16 voxels, float32 voxels, rescale."""
    return phase, f"{phase}/float32", f"{phase}/rescale"


def voxel_values(ints, floats, rescale):
    """Stored values of one phase -> float32 voxel values.

    Args:
      ints: int16 ``(S, H, W)`` or ``(0, H, W)``.
      floats: float32 ``(0, H, W)`` or ``(S, H, W)``.
      rescale: float32 ``(3,)``: slope, intercept, 1.0 when ``ints`` holds uint16 bits.

    Returns:
      float32 ``(S, H, W)``.
    """
    x = ops.cast(ints, "float32")
    # uint16 stored values arrive as int16 bits: v < 0 stands for v + 65536.
    x = x + ops.where(x < 0.0, 65536.0 * rescale[2], 0.0)
    x = ops.concatenate([x, floats], axis=0)
    return x * rescale[0] + rescale[1]


def input_image(values: Mapping, input_variant: str) -> list:
    """``input_pipeline.input_image`` in keras.ops: one ``(S, H, W)`` float32 image per channel
    of the input (a phase, or ``tK - t0``), in order."""
    channels = []
    for variant in constants.input_channels(input_variant):
        if "-" in variant:
            post, pre = variant.split("-")
            channels.append(values[post] - values[pre])
        else:
            channels.append(values[variant])
    return channels


def _zscore(x):
    mean = ops.mean(x)
    centred = x - mean
    std = ops.sqrt(ops.mean(ops.square(centred)))
    # A constant exam has no contrast to scale; leave it centred (all zeros).
    return centred / ops.where(std > 0.0, std, ops.ones_like(std))


def _tail_statistic(values, q: float, n):
    """The value at position ``q / 100 * (n - 1)`` of ``values`` sorted in descending order,
    interpolated linearly; only the top ``i + 2`` values are sorted (``ops.top_k``)."""
    if isinstance(n, int):  # Static size (JAX, or a known shape): Python arithmetic, static k.
        pos = q / 100.0 * (n - 1)
        i = int(math.floor(pos))
        frac, k = pos - i, min(i + 2, n)
        top = ops.top_k(values, k, sorted=True)[0]
        return top[i] + (top[min(i + 1, k - 1)] - top[i]) * frac
    pos = q / 100.0 * ops.cast(n - 1, "float64")
    below = ops.floor(pos)
    frac = ops.cast(pos - below, "float32")
    i = ops.cast(below, "int32")
    k = ops.minimum(i + 2, n)
    top = ops.top_k(values, k, sorted=True)[0]
    a, b = top[i], top[ops.minimum(i + 1, k - 1)]
    return a + (b - a) * frac


def percentile(x, low: float, high: float):
    """The ``low`` and ``high`` percentiles of all values of ``x`` (float32 scalars).

    Linear interpolation between order statistics, as ``numpy.percentile``'s default. Only the
    two tails are sorted (``ops.top_k``), which for the usual (0.5, 99.5) is a small fraction
    of the cost of sorting the whole volume.
    """
    flat = ops.reshape(x, [-1])
    n = flat.shape[0]
    if n is None:  # Unknown size in a TensorFlow graph.
        n = ops.cast(ops.size(flat), "int32")
    # Smallest values first: the top of -x.
    low_value = -_tail_statistic(-flat, low, n)
    high_value = _tail_statistic(flat, 100.0 - high, n)
    return low_value, high_value


def _percentile_scale(x, low: float, high: float):
    lo, hi = percentile(x, low, high)
    span = hi - lo
    clipped = ops.clip(x, lo, hi) - lo
    # A constant exam (span 0) maps to zeros instead of NaN.
    return clipped / ops.where(span > 0.0, span, ops.ones_like(span))


def normalize(x, config: InputConfig):
    """Per-exam normalisation of one channel (``config.normalization``; InputConfig has checked
    it and the percentiles); ``input_pipeline.preprocess`` calls it too."""
    if config.normalization == "zscore":
        return _zscore(x)
    return _percentile_scale(x, *config.percentiles)


def preprocess_exam(stored: Mapping, config: InputConfig, *, augment: bool = True):
    """One exam's stored phases (no batch axis) -> the model input ``(S', H', W', C)``.

    Args:
      stored: mapping with the :func:`stored_keys` of every phase the input variant reads,
        unbatched; and optionally ``crop_begin``/``crop_size`` ``(3,)`` and ``flip`` (scalar).
        Under JAX ``crop_size`` must be static (Python ints).
      config: InputConfig. Input variant and normalisation.
      augment: bool. Apply the crop and flip found in ``stored``. Defaults to True.

    Returns:
      float32 ``(S', H', W', C)``, ``C = config.channels``: each channel normalised on its own
      over the whole exam, then all cropped, then mirrored along cols, as the CPU path does.
    """
    phases = constants.phases_needed(config.input_variant)
    values = {}
    for p in phases:
        ints, floats, rescale = (stored[k] for k in stored_keys(p))
        values[p] = voxel_values(ints, floats, rescale)
    channels = [normalize(c, config) for c in input_image(values, config.input_variant)]
    x = ops.stack(channels, axis=-1)  # (S, H, W, C)
    if augment and CROP_BEGIN in stored:
        begin = ops.concatenate([ops.cast(stored[CROP_BEGIN], "int32"), ops.zeros([1], "int32")])
        size = stored[CROP_SIZE]
        if isinstance(size, (tuple, list)):  # Static sizes (JAX needs them).
            size = tuple(size) + (len(channels),)
        else:  # A tensor (TensorFlow): sizes stay dynamic.
            size = ops.concatenate(
                [ops.cast(size, "int32"), ops.convert_to_tensor([len(channels)])]
            )
        x = ops.slice(x, begin, size)
    if augment and FLIP in stored:
        x = ops.cond(stored[FLIP], lambda: ops.flip(x, axis=2), lambda: x)
    return x


def preprocess_batch(batch: Mapping, config: InputConfig, *, augment: bool = True):
    """:func:`preprocess_exam` of a one-exam batch -> ``(1, S', H', W', 1)`` float32."""
    first = next(iter(batch.values()))
    if first.shape[0] is not None and first.shape[0] != 1:
        raise ValueError(
            f"preprocess_batch takes one exam per batch. Received batch size {first.shape[0]}"
        )
    exam = {k: v[0] for k, v in batch.items()}
    return preprocess_exam(exam, config, augment=augment)[None]
