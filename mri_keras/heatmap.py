"""Where the model looked: gradient-based saliency volumes for one exam.

Methods, all returning a float32 ``(S, H, W)`` map in [0, 1] on the exam's own grid and in
canonical orientation (slice toward Superior, row toward Posterior, col toward the patient's
Left, exactly the axes of the volumes `tfrecords_tools.dicom_reader.load_exam` returns and the
TFRecords store):

- ``gradient`` (default): the absolute gradient of the target with respect to the input
  volume, at full resolution (a multi-channel input, e.g. ``t0,t1,t2``: the sum over
  channels of the absolute gradients, the L1 norm of the per-voxel gradient). Best on the
  synthetic cohort's pointing game (``scripts/bench/pointing_game.py``, a
  ``configs/demo.flags`` t2-t0 model: maximum inside an annotated malignant lesion in 9 of
  16 val+test exams, 3 of 8 test exams; a random voxel 0.2%), where lesions are a few voxels
  wide and the 3D block's grid is 3 x 3 in-plane.
- ``hirescam``: HiResCAM (Draelos & Carin, 2020) on the output of the 3D residual
  block (layer ``block3d_out``, ``(S, H/32, W/32, C)``): the element-wise product of the
  features and the target's gradient, summed over channels, ReLU. The heads read the block
  through a global max pool and a linear layer, so the gradient reaches each channel's
  arg-max position only, and the map is an exact decomposition of the target's log-odds
  (minus the bias) over the positions whose features the heads actually read. Upsampled
  bilinearly in-plane (and along slices if the grid differs) to ``(S, H, W)``; coarse (one
  cell per 32 x 32 pixels): on the synthetic cohort its maximum was on the lesion's breast
  in 10 of 16 exams but never inside the small lesions.
- ``gradcam``: Grad-CAM (Selvaraju et al., 2017) on the same layer: channel weights are the
  mean gradient over slices and positions, the map is the ReLU of the weighted channel sum.
  With this architecture's global max pool the mean gradients are small and of mixed sign,
  and the map is often all zero (measured on the synthetic cohort); kept for comparison.
- ``hirescam_x_gradient`` / ``gradcam_x_gradient``: the CAM times the input gradient,
  renormalised (the idea of Guided Grad-CAM, with the plain input gradient in place of guided
  backpropagation): the CAM's region at the input gradient's resolution.

The target is the log-odds ``log p(positive) - log p(negative)`` of the chosen heads
(the 2-way softmax's logit difference), summed: ``malignant`` (both malignant heads, the
default), ``benign`` (both benign heads), or one label such as ``left_malignant``.

Saliency needs the Keras model's intermediate layers, which a SavedModel does not expose:
it is computed with ``best.keras`` (``MODEL_DIR/best.keras``, next to ``MODEL_DIR/export``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from mri_keras import constants

METHODS = ("gradient", "hirescam", "gradcam", "hirescam_x_gradient", "gradcam_x_gradient")
TARGETS = ("malignant", "benign") + constants.LABELS
GRADCAM_LAYER = "block3d_out"
NPY_FILENAME = "heatmap.npy"


def target_labels(target: str) -> tuple[str, ...]:
    """Heads whose log-odds are summed for ``target`` (e.g. "malignant" -> both sides)."""
    if target in constants.TASKS:
        return tuple(f"{side}_{target}" for side in constants.SIDES)
    if target in constants.LABELS:
        return (target,)
    raise ValueError(f"target must be one of {TARGETS}. Received: target={target!r}")


def _gradcam_layer(model, layer_name: str):
    """The 3D block's output layer, or the last 5-D layer before global pooling."""
    try:
        return model.get_layer(layer_name)
    except ValueError:
        pass
    candidates = []
    for layer in model.layers[1:]:
        try:
            rank = len(layer.output.shape)
        except (AttributeError, ValueError):  # shared layers have no single output
            continue
        if rank == 5:
            candidates.append(layer)
    if not candidates:
        raise ValueError(
            f"Model {model.name!r} has no layer {layer_name!r} and no 5-D feature "
            "map to compute Grad-CAM on."
        )
    return candidates[-1]


def _log_odds(outputs: Mapping, labels: Sequence[str]):
    import tensorflow as tf

    eps = 1e-7
    total = 0.0
    for label in labels:
        p = tf.clip_by_value(tf.cast(outputs[label], tf.float32), eps, 1.0 - eps)  # (1, 2)
        total += tf.reduce_sum(tf.math.log(p[:, 1]) - tf.math.log(p[:, 0]))
    return total


def _upsample(cam, shape):
    """(s, h, w) -> (S, H, W) bilinear (half-pixel centres)."""
    import tensorflow as tf

    s_out, h_out, w_out = (int(v) for v in shape)
    x = tf.image.resize(cam[..., tf.newaxis], (h_out, w_out), method="bilinear")  # (s, H, W, 1)
    if x.shape[0] != s_out:
        # Resize along slices: treat (s, H*W) as an image of one column per pixel.
        flat = tf.reshape(x, (1, x.shape[0], h_out * w_out, 1))
        flat = tf.image.resize(flat, (s_out, h_out * w_out), method="bilinear")
        x = tf.reshape(flat, (s_out, h_out, w_out, 1))
    return x[..., 0]


def _normalise(volume: np.ndarray) -> np.ndarray:
    volume = np.maximum(np.asarray(volume, np.float32), 0.0)
    peak = float(volume.max()) if volume.size else 0.0
    return volume / peak if peak > 0 else volume


def saliency(
    model,
    volume,
    target: str = "malignant",
    method: str = "gradient",
    layer_name: str = GRADCAM_LAYER,
) -> np.ndarray:
    """Saliency of one preprocessed exam.

    Args:
      model: keras.Model (the Doubly Deep CNN, or any functional model with a 5-D feature map
        and heads keyed by LABELS).
      volume: float32 ``(S, H, W, C)`` preprocessed input (`input_pipeline.preprocess`).
      target: str. See `target_labels`. Defaults to "malignant".
      method: str. One of METHODS. Defaults to "gradient".
      layer_name: str. Grad-CAM feature layer. Defaults to "block3d_out".

    Returns:
      float32 ``(S, H, W)`` in [0, 1] (all zeros if nothing pushes the target up).
    """
    import tensorflow as tf

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}. Received: method={method!r}")
    labels = target_labels(target)
    x = tf.convert_to_tensor(volume, tf.float32)
    if x.shape.rank != 4:
        raise ValueError(f"volume must be (S, H, W, C). Received shape: {x.shape}")
    x = x[tf.newaxis]  # (1, S, H, W, C)
    shape = tuple(int(v) for v in volume.shape[:3])
    if method == "gradient":
        return _input_gradient(model, x, labels)
    cam = _cam(model, x, labels, layer_name, shape, hires=method.startswith("hirescam"))
    if not method.endswith("_x_gradient"):
        return cam
    return _normalise(cam * _input_gradient(model, x, labels))


def _input_gradient(model, x, labels) -> np.ndarray:
    """|d target / d input| summed over channels, normalised: (S, H, W)."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        score = _log_odds(model(x, training=False), labels)
    grad = tape.gradient(score, x)  # (1, S, H, W, C)
    return _normalise(tf.reduce_sum(tf.abs(grad[0]), axis=-1).numpy())


def _cam(model, x, labels, layer_name, shape, hires: bool) -> np.ndarray:
    """Grad-CAM (or HiResCAM) on ``layer_name`` upsampled to ``shape``, normalised."""
    import keras
    import tensorflow as tf

    layer = _gradcam_layer(model, layer_name)
    grad_model = keras.Model(model.inputs, [layer.output, model.output])
    with tf.GradientTape() as tape:
        tape.watch(x)  # records the path to the features even when no weights precede them
        features, outputs = grad_model(x, training=False)  # features: (1, s, h, w, C)
        score = _log_odds(outputs, labels)
    grads = tape.gradient(score, features)
    if grads is None:
        raise ValueError(f"The target does not depend on layer {layer.name!r}.")
    features, grads = tf.cast(features[0], tf.float32), tf.cast(grads[0], tf.float32)
    if hires:
        cam = tf.nn.relu(tf.reduce_sum(features * grads, axis=-1))  # (s, h, w)
    else:
        weights = tf.reduce_mean(grads, axis=(0, 1, 2))  # (C,)
        cam = tf.nn.relu(tf.einsum("shwc,c->shw", features, weights))
    return _normalise(_upsample(cam, shape).numpy())


def exam_saliency(
    model, phases: Mapping[str, np.ndarray], input_config, target="malignant", method="gradient"
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocesses raw phases with the model's input config and computes the saliency.

    Returns:
      (heatmap (S, H, W) float32 in [0, 1], image (S, H, W) float32: the model's input, its
      first channel for a multi-channel input, e.g. t1-t0 of ``t1sub,t2sub,t3sub``).
    """
    from mri_keras import inference

    volume = inference.preprocess_phases(phases, input_config)  # (S, H, W, C)
    heat = saliency(model, volume, target=target, method=method)
    return heat, np.asarray(volume)[..., 0]


def most_salient_slices(heatmap: np.ndarray, k: int) -> list:
    """Indices of the ``k`` slices with the highest peak saliency (descending)."""
    peaks = heatmap.reshape(heatmap.shape[0], -1).max(axis=1)
    order = np.argsort(-peaks, kind="stable")
    return [int(i) for i in order[: max(0, min(k, len(order)))]]


def write_heatmaps(
    output_dir: str,
    heatmap: np.ndarray,
    image: np.ndarray,
    top_slices: int = 4,
    title: str = "",
    spacing=None,
) -> dict:
    """Writes ``heatmap.npy`` and PNG overlays of the most salient slices.

    Each PNG shows one axial slice in radiological view (row 0 at the top, the patient's
    right on the image's left) with the heatmap over it, and marks R/L.

    Args:
      output_dir: str. Created if needed.
      heatmap: (S, H, W) in [0, 1], canonical orientation.
      image: (S, H, W) model input, same grid.
      top_slices: int. How many PNGs. Defaults to 4.
      title: str. Prefix of each PNG's title.
      spacing: optional (3,) mm spacing, for the in-plane aspect ratio.

    Returns:
      dict ``{"npy": path, "png": [paths], "slices": [indices]}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if heatmap.shape != image.shape:
        raise ValueError(f"heatmap {heatmap.shape} and image {image.shape} differ in shape")
    os.makedirs(output_dir, exist_ok=True)
    npy = os.path.join(output_dir, NPY_FILENAME)
    np.save(npy, heatmap.astype(np.float32))
    aspect = float(spacing[1]) / float(spacing[2]) if spacing is not None else 1.0
    slices = most_salient_slices(heatmap, top_slices)
    pngs = []
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    for rank, s in enumerate(slices):
        height = 3.2 * heatmap.shape[1] / heatmap.shape[2] * aspect
        fig, axes = plt.subplots(1, 2, figsize=(6.4, height + 0.6), dpi=100)
        for ax, overlay in zip(axes, (False, True)):
            ax.imshow(
                image[s],
                cmap="gray",
                vmin=lo,
                vmax=hi if hi > lo else lo + 1,
                aspect=aspect,
                interpolation="nearest",
            )
            if overlay:
                # Colours span this slice's own range up to its 99.5th percentile (the slice
                # peak relative to the volume's is in the title), so sparse full-resolution
                # maps stay visible.
                top = float(np.percentile(heatmap[s], 99.5))
                top = top if top > 0 else max(float(heatmap[s].max()), 1e-6)
                ax.imshow(
                    np.ma.masked_less(heatmap[s], 0.2 * top),
                    cmap="jet",
                    alpha=0.6,
                    vmin=0,
                    vmax=top,
                    aspect=aspect,
                    interpolation="nearest",
                )
            # Radiological view: the patient's right (col 0) on the image's left.
            for x, text in ((0.02, "R"), (0.93, "L")):
                ax.text(
                    x,
                    0.5,
                    text,
                    color="yellow",
                    transform=ax.transAxes,
                    fontsize=11,
                    fontweight="bold",
                    va="center",
                )
            ax.set_title("saliency" if overlay else "model input", fontsize=9)
            ax.axis("off")
        fig.suptitle(
            f"{title} slice {s} (rank {rank + 1}, peak {heatmap[s].max():.2f})", fontsize=9
        )
        path = os.path.join(output_dir, f"slice_{s:03d}.png")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        pngs.append(path)
    return {"npy": npy, "png": pngs, "slices": slices}
