"""Slice-chunked recomputation of the 2D trunk (TensorFlow backend only).

The trunk treats slices independently, so the forward pass can run it over chunks of
``chunk`` slices without keeping any activation, and the backward pass can recompute one
chunk at a time and back-propagate through it before moving to the next. Peak trunk
activation memory is then that of one chunk, independent of the slice count; what still
grows with the slice count is only the trunk's input, its input gradient and its tiny
(h/32 x w/32 x 1) output.

Everything the trunk computes is inside the chunk loops, *including the stem*: the stem's
output (H/2 x W/2 x width per slice, 12.8 MB per 448^2 slice at width 64) is the trunk's
largest activation, and leaving the stem outside the recomputed function makes memory grow
with the slice count again. The loops run with ``parallel_iterations=1`` so TensorFlow never
keeps two chunks alive at once, and the forward loop sees ``tf.stop_gradient`` inputs so no
tape can ask the While op to accumulate its intermediates.

Usage (what ``build_model`` does for ``ModelConfig(remat_chunk=4)``)::

    trunk_layer = SliceChunkedTrunk(trunk_model, chunk=4)
    maps = trunk_layer(folded_slices)  # (n, H, W, 1) -> (n, h, w, 1)

TensorFlow is imported lazily, so importing this module costs nothing on other backends.
"""

from __future__ import annotations

import keras


def _require_tensorflow():
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Slice-chunked recomputation runs on the TensorFlow backend only. "
            f"Received: backend={keras.backend.backend()!r}"
        )
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return tf


def chunked_apply(layer, x, chunk: int, training=None):
    """Applies ``layer`` to ``x`` chunk by chunk along axis 0, recomputing it for gradients.

    Gradients (w.r.t. ``x`` and the layer's trainable variables) equal those of ``layer(x)``
    up to float summation order.

    Args:
      layer: keras.Layer, built, without non-trainable variables, acting independently on
        each row of axis 0 (e.g. the per-slice trunk on folded slices).
      x: tf.Tensor (n, ...). n may be unknown and need not be a multiple of ``chunk``.
      chunk: int. Rows per chunk (> 0).
      training: optional bool passed to the layer.

    Returns:
      tf.Tensor (n, ...) = layer(x).
    """
    tf = _require_tensorflow()
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int. Received: chunk={chunk!r}")
    if layer.non_trainable_variables:
        raise ValueError(
            "chunked_apply recomputes the layer and cannot replay non-trainable state updates. "
            f"Received: layer {layer.name!r} with non-trainable variables "
            f"{[v.path for v in layer.non_trainable_variables]}"
        )
    variables = list(layer.trainable_variables)
    kwargs = {} if training is None else {"training": training}

    def apply(xc, weights):
        out, _ = layer.stateless_call(list(weights), [], xc, **kwargs)
        return out

    def pad_rows(t, n):
        # Zero rows up to a multiple of `chunk`: every chunk has the same static shape (no
        # empty or ragged last chunk, which XLA could not compile and which TF's CPU conv
        # mishandles at batch 0). Padded rows get zero upstream gradient, so they add nothing.
        pad = tf.math.floormod(-n, chunk)
        paddings = tf.concat([[[0, pad]], tf.zeros([tf.rank(t) - 1, 2], tf.int32)], 0)
        return tf.pad(t, paddings), (n + pad) // chunk

    def take(t, i):
        begin = tf.concat([[i * chunk], tf.zeros([tf.rank(t) - 1], tf.int32)], 0)
        size = tf.concat([[chunk], -tf.ones([tf.rank(t) - 1], tf.int32)], 0)
        out = tf.slice(t, begin, size)
        out.set_shape([chunk] + t.shape.as_list()[1:])  # (chunk, ...)
        return out

    def unchunk(chunks, n):
        stacked = chunks.stack()  # (num_chunks, chunk, ...)
        shape = tf.shape(stacked)
        flat = tf.reshape(stacked, tf.concat([[shape[0] * shape[1]], shape[2:]], 0))
        return flat[:n]  # drop the padded rows

    def forward(x, weights):
        n = tf.shape(x)[0]
        xp, num_chunks = pad_rows(x, n)
        first = apply(take(xp, 0), weights)  # (chunk, h, w, c); fixes dtype and shape
        y_chunks = tf.TensorArray(first.dtype, size=num_chunks, element_shape=first.shape).write(
            0, first
        )

        def body(i, acc):
            return i + 1, acc.write(i, apply(take(xp, i), weights))

        _, y_chunks = tf.while_loop(
            lambda i, _: i < num_chunks,
            body,
            (tf.constant(1), y_chunks),
            parallel_iterations=1,
        )
        return unchunk(y_chunks, n)

    def vjp(xc, dyc, weights):
        with tf.GradientTape() as tape:
            tape.watch(xc)
            tape.watch(weights)
            yc = apply(xc, weights)
        grads = tape.gradient(
            yc,
            [xc] + list(weights),
            output_gradients=dyc,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return grads[0], grads[1:]

    @tf.custom_gradient
    def recomputed(x, *weights):
        # stop_gradient: the outer tape must never differentiate the forward While op (that
        # would make it accumulate every chunk's activations).
        y = forward(tf.stop_gradient(x), [tf.stop_gradient(w) for w in weights])

        def grad(dy, variables=None):
            if variables:
                raise ValueError(
                    "chunked_apply: the recomputed layer read variables directly "
                    f"({[v.name for v in variables]}); expected only stateless weights."
                )
            n = tf.shape(x)[0]
            xp, num_chunks = pad_rows(x, n)
            dyp, _ = pad_rows(dy, n)
            dx_first, dw_first = vjp(take(xp, 0), take(dyp, 0), weights)
            dx_chunks = tf.TensorArray(
                x.dtype, size=num_chunks, element_shape=dx_first.shape
            ).write(0, dx_first)

            def body(i, dx_acc, *dw_acc):
                dxc, dwc = vjp(take(xp, i), take(dyp, i), weights)
                return (i + 1, dx_acc.write(i, dxc)) + tuple(a + g for a, g in zip(dw_acc, dwc))

            loop = tf.while_loop(
                lambda i, *_: i < num_chunks,
                body,
                (tf.constant(1), dx_chunks) + tuple(dw_first),
                parallel_iterations=1,
            )
            return (unchunk(loop[1], n),) + tuple(loop[2:])

        return y, grad

    # Plain float32 reads of the variables (the wrapper never autocasts); the trunk's own
    # layers cast them to their compute dtype inside `stateless_call`.
    weights = [tf.convert_to_tensor(v.value) for v in variables]
    return recomputed(x, *weights)


@keras.saving.register_keras_serializable(package="mri_keras")
class SliceChunkedTrunk(keras.layers.Wrapper):
    """Wraps the per-slice trunk; same weights and outputs, recomputed in `chunk`-slice chunks.

    Args:
      layer: keras.Layer. The trunk, applied to folded slices (n, H, W, 1).
      chunk: int. Slices per recomputation chunk (> 0).
      **kwargs: keras.layers.Layer arguments (name, ...).
    """

    def __init__(self, layer, chunk, **kwargs):
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk must be a positive int. Received: chunk={chunk!r}")
        kwargs["dtype"] = "float32"  # the wrapper only moves float32 weights; never autocast
        super().__init__(layer, **kwargs)
        self.chunk = chunk

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        return chunked_apply(self.layer, inputs, self.chunk, training=training)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return self.layer.compute_output_spec(inputs)

    def get_config(self):
        config = super().get_config()
        config["chunk"] = self.chunk
        return config
