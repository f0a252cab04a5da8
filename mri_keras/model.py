"""The Doubly Deep CNN (Gong et al.): a 2D ResNet-18-like trunk per slice, then a 3D block.

Written with ``keras.layers`` / ``keras.ops`` only, so it builds and runs on any Keras 3
backend. The one backend-specific piece, slice-chunked recomputation of the trunk in the
backward pass (``ModelConfig.remat_chunk > 0``), lives in ``mri_keras.remat_tf`` and is only
available on the TensorFlow backend.

Shapes (default config, an exam of S slices of H x W and C input channels: 1 for one input
variant, C for a list such as t0,t1,t2; ``InputConfig.channels``):

    volume                      (batch, S, H, W, C)
    fold slices into the batch  (batch*S, H, W, C)
    stem conv 5x5/2 + ReLU      (batch*S, H/2, W/2, 64)
    max-pool 3x3/2              (batch*S, H/4, W/4, 64)
    stage 1..4 (2 blocks each)  (batch*S, H/32, W/32, 512)
    collapse conv 1x1           (batch*S, H/32, W/32, 1)
    unfold                      (batch, S, H/32, W/32, 1)
    3D residual block           (batch, S, H/32, W/32, 128)
    global max pool             (batch, 128)
    4 heads, softmax            {label: (batch, 2)} float32

All convolutions use "same" padding, so any H and W work (odd sizes round up at each stride).
"""

from __future__ import annotations

import keras
from keras import layers, ops

from mri_keras import constants, remat_tf
from mri_keras.config import ModelConfig

STAGE_MULTIPLIERS = (1, 2, 4, 8)


@keras.saving.register_keras_serializable(package="mri_keras")
class FoldSlices(layers.Layer):
    """Folds the slice axis into the batch axis: (batch, S, H, W, C) -> (batch*S, H, W, C).

    A plain reshape of a channels-last tensor: no transpose, no copy on most backends.
    """

    def call(self, volume):
        shape = ops.shape(volume)
        return ops.reshape(volume, (-1, shape[2], shape[3], shape[4]))

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 5:
            raise ValueError(
                f"FoldSlices expects a 5D (batch, slices, h, w, c) input. "
                f"Received: input_shape={input_shape}"
            )
        b, s = input_shape[0], input_shape[1]
        folded = b * s if b is not None and s is not None else None
        return (folded,) + tuple(input_shape[2:])


@keras.saving.register_keras_serializable(package="mri_keras")
class UnfoldSlices(layers.Layer):
    """Inverse of FoldSlices: ``[maps (batch*S, h, w, C), volume (batch, S, ...)]`` ->
    ``(batch, S, h, w, C)``; the volume only supplies batch and S."""

    def call(self, inputs):
        maps, volume = inputs
        vshape = ops.shape(volume)
        mshape = ops.shape(maps)
        return ops.reshape(maps, (vshape[0], vshape[1], mshape[1], mshape[2], mshape[3]))

    def compute_output_shape(self, input_shape):
        maps_shape, volume_shape = input_shape
        return (volume_shape[0], volume_shape[1]) + tuple(maps_shape[1:])


@keras.saving.register_keras_serializable(package="mri_keras")
class SliceTimeDistributed(layers.TimeDistributed):
    """keras.layers.TimeDistributed that always maps the wrapped layer over every slice.

    Two problems of Keras 3.15's TimeDistributed on the TensorFlow backend, both measured:
    for an unknown time axis (our case in a tf.function with a (1, None, ...) signature) it
    maps over ``arange(batch)`` instead of ``arange(time)`` (it reads the size before
    transposing), so it silently runs the trunk on the first slice only; and for a known time
    axis its per-slice Python loop crashed with heap corruption in eager gradients with
    TF 2.21's oneDNN CPU kernels. This subclass always maps with ``ops.vectorized_map`` over
    the slices themselves (masks, unused here, go to the parent).

    Known problem: on CPU with oneDNN on (TF 2.21's default), gradients through this mode
    still intermittently crash the process with heap corruption (also with ``ops.map``);
    set ``TF_ENABLE_ONEDNN_OPTS=0`` before TensorFlow is imported to train it on CPU. The
    default "fold" mode is not affected.
    """

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            return super().call(inputs, training=training, mask=mask)
        axes = [1, 0] + list(range(2, len(inputs.shape)))
        per_slice = ops.transpose(inputs, axes)  # (S, batch, H, W, C)
        kwargs = {"training": training} if self.layer._call_has_training_arg else {}
        outputs = ops.vectorized_map(lambda x: self.layer.call(x, **kwargs), per_slice)
        return ops.transpose(outputs, axes)  # (batch, S, h, w, c)


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}")


def _check_backend(config: ModelConfig) -> None:
    """The one model requirement a ModelConfig cannot check itself: the Keras backend."""
    if config.remat_chunk and keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Slice-chunked recomputation (remat_chunk > 0) is implemented for the TensorFlow "
            "backend only; set KERAS_BACKEND=tensorflow or remat_chunk=0. "
            f"Received: backend={keras.backend.backend()!r}, remat_chunk={config.remat_chunk}"
        )


def _groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is <= ``groups`` (GroupNormalization needs one)."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class _Blocks:
    """How the convolutional layers of one model are made (initialisation and normalisation).

    ``init="glorot"`` passes no initialiser (Keras' defaults: the paper's model, and the same
    random draws as before these options existed). ``"he_zero_residual"``: He-normal kernels,
    and the last layer of each residual branch starts at zero (its conv kernel, or with
    ``norm="group"`` its normalisation's scale), so every residual block is the identity at
    initialisation (Goyal et al. 2017; Zhang et al., Fixup 2019).
    """

    def __init__(self, init="glorot", norm="none", groups=8, dtype=None):
        self.init, self.norm, self.groups, self.dtype = init, norm, groups, dtype

    def conv(self, rank, filters, kernel, name, *, strides=1, relu=False, last=False):
        """Returns ``f(x)``: conv (+ GroupNorm) (+ ReLU). ``last``: the residual branch's end."""
        kwargs = {}
        if self.init == "he_zero_residual":
            zero_kernel = last and self.norm == "none"
            kwargs["kernel_initializer"] = "zeros" if zero_kernel else "he_normal"
        conv_cls = layers.Conv2D if rank == 2 else layers.Conv3D
        plain_relu = relu and self.norm == "none"
        conv = conv_cls(
            filters,
            kernel,
            strides=strides,
            padding="same",
            activation="relu" if plain_relu else None,
            name=name,
            dtype=self.dtype,
            **kwargs,
        )
        norm = None
        if self.norm == "group":
            gamma = "zeros" if (last and self.init == "he_zero_residual") else "ones"
            norm = layers.GroupNormalization(
                groups=_groups(filters, self.groups),
                gamma_initializer=gamma,
                name=f"{name}_gn",
                dtype=self.dtype,
            )

        def apply(x):
            y = conv(x)
            if norm is not None:
                y = norm(y)
                if relu:
                    y = layers.ReLU(name=f"{name}_relu", dtype=self.dtype)(y)
            return y

        return apply

    def shortcut(self, rank, filters, strides, name):
        """A 1x1 projection of the shortcut (no normalisation)."""
        kwargs = {}
        if self.init == "he_zero_residual":
            kwargs["kernel_initializer"] = "he_normal"
        conv_cls = layers.Conv2D if rank == 2 else layers.Conv3D
        return conv_cls(
            filters, 1, strides=strides, padding="same", name=name, dtype=self.dtype, **kwargs
        )


def apply_basic_block(x, filters, stride, name, dtype=None, blocks=None):
    """A ResNet basic block without batch norm: two 3x3 convs and a residual connection.

    Args:
      x: tensor (n, h, w, c). Input feature maps.
      filters: int. Output channels.
      stride: int. 1 or 2; stride of the first conv (and of the shortcut).
      name: str. Prefix of every layer name.
      dtype: str or None. Keras dtype policy of the block's layers. Defaults to None (global).
      blocks: optional ``_Blocks`` (initialisation and normalisation). Defaults to Keras'
        initialisers and no normalisation (the paper).

    Returns:
      Tensor (n, ceil(h/stride), ceil(w/stride), filters).
    """
    _check_positive_int("filters", filters)
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2. Received: stride={stride!r}")
    blocks = blocks or _Blocks(dtype=dtype)
    shortcut = x
    y = blocks.conv(2, filters, 3, f"{name}_conv1", strides=stride, relu=True)(x)
    y = blocks.conv(2, filters, 3, f"{name}_conv2", last=True)(y)
    if stride != 1 or x.shape[-1] != filters:
        # Projection shortcut where the shape changes (first block of stages 2-4).
        shortcut = blocks.shortcut(2, filters, stride, f"{name}_proj")(x)
    y = layers.Add(name=f"{name}_add", dtype=dtype)([y, shortcut])
    return layers.ReLU(name=f"{name}_out", dtype=dtype)(y)


def apply_residual_block_3d(x, filters, name, dtype=None, blocks=None):
    """The 3D residual block: two 3x3x3 convs, 1x1x1 projection shortcut, ReLU.

    Args:
      x: tensor (batch, S, h, w, c).
      filters: int. Output channels.
      name: str. Prefix of every layer name.
      dtype: str or None. Keras dtype policy. Defaults to None (global).
      blocks: optional ``_Blocks`` (initialisation and normalisation). Defaults to the paper's.

    Returns:
      Tensor (batch, S, h, w, filters).
    """
    _check_positive_int("filters", filters)
    blocks = blocks or _Blocks(dtype=dtype)
    y = blocks.conv(3, filters, 3, f"{name}_conv1", relu=True)(x)
    y = blocks.conv(3, filters, 3, f"{name}_conv2", last=True)(y)
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = blocks.shortcut(3, filters, 1, f"{name}_proj")(x)
    y = layers.Add(name=f"{name}_add", dtype=dtype)([y, shortcut])
    return layers.ReLU(name=f"{name}_out", dtype=dtype)(y)


def build_trunk(config: ModelConfig, channels: int = 1) -> keras.Model:
    """The per-slice 2D trunk, ending in the 1x1 collapse conv.

    Args:
      config: ModelConfig.
      channels: int. Input channels (the stem conv's input depth). Defaults to 1.

    Returns:
      keras.Model named "trunk": (n, H, W, channels) -> (n, ceil(H/32), ceil(W/32), 1).
    """
    _check_positive_int("channels", channels)
    dtype = config.dtype_policy
    layer_maker = _blocks_of(config)
    image = keras.Input(shape=(None, None, channels), name="slice")  # (n, H, W, C)
    x = layer_maker.conv(2, config.width, config.stem_kernel, "stem_conv", strides=2, relu=True)(
        image
    )  # (n, H/2, W/2, width)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool", dtype=dtype)(x)
    for stage, (mult, blocks) in enumerate(zip(STAGE_MULTIPLIERS, config.blocks_per_stage)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = apply_basic_block(
                x,
                config.width * mult,
                stride,
                f"stage{stage + 1}_block{block + 1}",
                dtype=dtype,
                blocks=layer_maker,
            )
    # x: (n, H/32, W/32, 8*width)
    x = layer_maker.shortcut(2, 1, 1, "collapse_conv")(x)  # (n, H/32, W/32, 1)
    return keras.Model(image, x, name="trunk")


def _blocks_of(config: ModelConfig) -> _Blocks:
    return _Blocks(config.init, config.norm, config.norm_groups, config.dtype_policy)


def build_model(
    config: ModelConfig = ModelConfig(),  # noqa: B008 - frozen
    channels: int = 1,
) -> keras.Model:
    """Builds the Doubly Deep CNN.

    Args:
      config: ModelConfig. Defaults to the paper's model (11,611,785 parameters).
      channels: int. Channels of the input volume, ``InputConfig.channels`` (1 for one input
        variant, 3 for ``t0,t1,t2``); only the stem conv's kernel depends on it (each extra
        channel adds ``stem_kernel**2 * width`` weights). Defaults to 1.

    Returns:
      keras.Model with input "volume" (batch, S, H, W, channels) float32 and a dict of outputs
      {label: (batch, 2) float32 softmax} keyed by constants.LABELS.

    Raises:
      ValueError: remat_chunk > 0 on a non-TensorFlow backend, or channels not a positive int
        (ModelConfig checks its fields itself when it is made).
    """
    _check_backend(config)
    dtype = config.dtype_policy
    trunk = build_trunk(config, channels)
    volume = keras.Input(shape=(None, None, None, channels), name="volume")  # (batch, S, H, W, C)
    if config.slice_mode == "time_distributed":
        maps = SliceTimeDistributed(trunk, name="trunk_td")(volume)  # (batch, S, h, w, 1)
    else:
        folded = FoldSlices(name="fold_slices")(volume)  # (batch*S, H, W, C)
        if config.remat_chunk:
            # Same weights as `trunk`; recomputed chunk by chunk in the backward pass.
            trunk_layer = remat_tf.SliceChunkedTrunk(
                trunk, chunk=config.remat_chunk, name="trunk_remat"
            )
        else:
            trunk_layer = trunk
        maps = trunk_layer(folded)  # (batch*S, h, w, 1)
        # float32 so the full-size volume (read only for its shape) is never cast; the maps
        # are tiny. maps: (batch, S, h, w, 1)
        maps = UnfoldSlices(name="unfold_slices", dtype="float32")([maps, volume])
    x = apply_residual_block_3d(
        maps, config.channels_3d, "block3d", dtype=dtype, blocks=_blocks_of(config)
    )
    x = layers.GlobalMaxPooling3D(name="global_max_pool", dtype=dtype)(x)  # (batch, channels_3d)
    if config.dropout:
        x = layers.Dropout(config.dropout, name="dropout", dtype=dtype)(x)
    # Heads compute in float32 whatever the policy, so probabilities and the loss stay exact.
    outputs = {
        label: layers.Dense(2, activation="softmax", name=label, dtype="float32")(x)
        for label in constants.LABELS
    }
    return keras.Model(volume, outputs, name="doubly_deep_cnn")


def compute_loss(y_true: dict, y_pred: dict):
    """Sum over the four heads of categorical cross-entropy, per exam.

    Args:
      y_true: dict {label: (batch, 2)} one-hot targets.
      y_pred: dict {label: (batch, 2)} softmax probabilities.

    Returns:
      Tensor (batch,) float32. Mean it over exams for the training loss.
    """
    missing = [k for k in constants.LABELS if k not in y_true or k not in y_pred]
    if missing:
        raise ValueError(
            f"y_true and y_pred need every head {constants.LABELS}. "
            f"Received: y_true keys={sorted(y_true)}, y_pred keys={sorted(y_pred)}"
        )
    total = 0.0
    for label in constants.LABELS:
        true = ops.cast(y_true[label], "float32")
        pred = ops.cast(y_pred[label], "float32")
        total = total + keras.losses.categorical_crossentropy(true, pred)
    return total


def _conv_out(n, stride):
    return -(-n // stride)  # "same" padding: ceil(n / stride)


def count_flops(
    config: ModelConfig, slices: int, height: int, width: int, channels: int = 1
) -> int:
    """Analytic forward FLOPs of one exam: 2 x multiply-accumulates of every conv and dense.

    Bias adds, ReLUs, residual adds, pooling and softmax are not counted (< 1% at the
    defaults). A training step costs about 3x this (backward: input and weight gradients).

    Args:
      config: ModelConfig.
      slices: int. S.
      height: int. H.
      width: int. W.
      channels: int. Input channels. Defaults to 1.

    Returns:
      int FLOPs for one exam (batch 1).
    """
    for name, value in (
        ("slices", slices),
        ("height", height),
        ("width", width),
        ("channels", channels),
    ):
        _check_positive_int(name, value)
    macs = 0
    h, w, c = _conv_out(height, 2), _conv_out(width, 2), config.width
    macs += h * w * c * config.stem_kernel**2 * channels  # stem
    h, w = _conv_out(h, 2), _conv_out(w, 2)  # max-pool
    for stage, (mult, blocks) in enumerate(zip(STAGE_MULTIPLIERS, config.blocks_per_stage)):
        filters = config.width * mult
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            h, w = _conv_out(h, stride), _conv_out(w, stride)
            macs += h * w * filters * 9 * c  # conv1
            macs += h * w * filters * 9 * filters  # conv2
            if stride != 1 or c != filters:
                macs += h * w * filters * c  # projection
            c = filters
    macs += h * w * c  # collapse conv to 1 channel
    macs *= slices
    voxels = slices * h * w
    c3 = config.channels_3d
    macs += voxels * c3 * 27 * 1 + voxels * c3 * 27 * c3 + voxels * c3 * 1  # 3D block
    macs += len(constants.LABELS) * c3 * 2  # heads
    return 2 * macs
