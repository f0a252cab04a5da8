"""Shape buckets for XLA: pad or crop exams to a few (slices, height, width) shapes.

XLA compiles one program per input shape. Exams differ in slice count and in-plane size, so an
XLA-compiled train step fed raw exams would compile for nearly every exam. Mapping each exam to
the smallest bucket that holds it (and center-cropping exams larger than the largest bucket)
bounds the number of compilations by ``len(slice_buckets) * len(size_buckets)**2`` (height and
width are bucketed independently from the same list).

Padding and cropping are centred on every axis, so the midline stays at W/2 and the left
breast (col > W/2 in canonical orientation) stays on its side: labels are unchanged. Padding
uses ``pad_value`` (0 = the mean of a z-scored exam). It is a change of the input, not of the
model: a padded exam gives slightly different outputs than the unpadded one (the model sees a
zero border), so evaluation and prediction should use the same buckets as training, or none.

All functions are TensorFlow ops, usable inside ``tf.data`` ``map`` (no Python on the hot
path)::

    spec = BucketSpec((32, 64, 96, 128, 160, 192), (256, 320, 384, 448, 512))
    dataset = dataset.map(bucket_map_fn(spec), num_parallel_calls=tf.data.AUTOTUNE)
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from mri_keras import config as config_lib
from mri_keras.constants import DEFAULT_SIZE_BUCKETS, DEFAULT_SLICE_BUCKETS


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """The bucket sizes.

    Attributes:
      slice_buckets: tuple of ints. Allowed slice counts. Defaults to DEFAULT_SLICE_BUCKETS.
      size_buckets: tuple of ints. Allowed heights and widths. Defaults to DEFAULT_SIZE_BUCKETS.
      pad_value: float. Value of padded voxels. Defaults to 0.0.
    """

    slice_buckets: tuple[int, ...] = DEFAULT_SLICE_BUCKETS
    size_buckets: tuple[int, ...] = DEFAULT_SIZE_BUCKETS
    pad_value: float = 0.0

    def __post_init__(self):
        for name in ("slice_buckets", "size_buckets"):
            value = tuple(getattr(self, name))
            if not value or any(not isinstance(v, int) or v < 1 for v in value):
                raise config_lib.ConfigError(name, "positive ints", value)
            object.__setattr__(self, name, tuple(sorted(set(value))))

    @property
    def max_shapes(self) -> int:
        """Upper bound on distinct bucketed shapes (= XLA compilations per function)."""
        return len(self.slice_buckets) * len(self.size_buckets) ** 2


def bucket_for(n, buckets) -> tf.Tensor:
    """The smallest bucket >= n, or the largest bucket if n exceeds them all.

    Args:
      n: int or scalar int tensor.
      buckets: ascending tuple of ints.

    Returns:
      int32 scalar tensor.
    """
    table = tf.constant(buckets, tf.int32)
    index = tf.searchsorted(table, tf.reshape(tf.cast(n, tf.int32), [1]), side="left")[0]
    return table[tf.minimum(index, len(buckets) - 1)]


def _fit_axis(x, axis: int, target, pad_value):
    """Center-crops or zero-pads axis `axis` of x to `target` entries."""
    rank = x.shape.rank
    n = tf.shape(x)[axis]
    keep = tf.minimum(n, target)
    onehot = tf.one_hot(axis, rank, dtype=tf.int32)
    begin = onehot * ((n - keep) // 2)
    size = onehot * (keep + 1) - 1  # -1 (everything) on other axes, `keep` on this one
    x = tf.slice(x, begin, size)
    missing = target - keep
    before = missing // 2
    paddings = tf.stack([onehot * before, onehot * (missing - before)], axis=1)  # (rank, 2)
    return tf.pad(x, paddings, constant_values=tf.cast(pad_value, x.dtype))


def fit_to_bucket(volume: tf.Tensor, spec: BucketSpec = BucketSpec()) -> tf.Tensor:
    """Pads/crops a volume's (slices, height, width) axes to their buckets.

    Args:
      volume: tf.Tensor (S, H, W, C) or (batch, S, H, W, C), any float dtype.
      spec: BucketSpec. Defaults to BucketSpec().

    Returns:
      tf.Tensor of the same rank and dtype with S, H, W replaced by their buckets.

    Raises:
      ValueError: volume rank is not 4 or 5.
    """
    rank = volume.shape.rank
    if rank not in (4, 5):
        raise ValueError(
            "fit_to_bucket expects (S, H, W, C) or (batch, S, H, W, C). "
            f"Received: shape={volume.shape}"
        )
    s_axis = rank - 4
    shape = tf.shape(volume)
    x = _fit_axis(volume, s_axis, bucket_for(shape[s_axis], spec.slice_buckets), spec.pad_value)
    x = _fit_axis(x, s_axis + 1, bucket_for(shape[s_axis + 1], spec.size_buckets), spec.pad_value)
    x = _fit_axis(x, s_axis + 2, bucket_for(shape[s_axis + 2], spec.size_buckets), spec.pad_value)
    return x


def bucket_map_fn(spec: BucketSpec = BucketSpec()):
    """A ``tf.data`` map function applying fit_to_bucket to the first element.

    Works on ``(volume, labels)`` and ``(volume, labels, ids)`` elements of
    ``input_pipeline.make_dataset`` (volume (1, S, H, W, 1)); other elements pass unchanged.

    Args:
      spec: BucketSpec. Defaults to BucketSpec().

    Returns:
      Callable ``(volume, *rest) -> (bucketed_volume, *rest)``.
    """

    def fn(volume, *rest):
        return (fit_to_bucket(volume, spec),) + rest

    return fn
