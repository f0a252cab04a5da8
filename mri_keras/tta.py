"""Test-time augmentation: an exam scored as it is and mirrored left-right, the two averaged.

The one definition every scoring path uses: `validation.predict_split` (hence
`mri_keras.evaluate`), `inference.Predictor` (hence `mri_keras.predict`) and the export's
``*_flip`` signatures (`mri_keras.export`).

``flip``: the preprocessed volume is mirrored along its col axis (patient left <-> right), as
training's flip augmentation does; the mirrored exam's left-breast probabilities are the
exam's right breast and vice versa, so its four outputs are put back in the exam's own sides
(`input_pipeline.MIRRORED_LABEL_ORDER`) before the plain and mirrored probabilities are
averaged. It costs one more forward pass per exam. Chosen for the demo recipe on the tuning
cohort's validation split (README, "Left-right flip test-time averaging").

Crops are not offered: evaluation sees whole exams, and a crop would drop the breast the
label is about.
"""

from __future__ import annotations

import tensorflow as tf

from mri_keras import constants, input_pipeline

MODES = constants.TTA_MODES


def check_mode(mode: str) -> str:
    """Returns ``mode``; raises ValueError naming the modes when it is not one of them."""
    if mode not in MODES:
        raise ValueError(f"tta must be one of {MODES}. Received: tta={mode!r}")
    return mode


def mirror(volume: tf.Tensor) -> tf.Tensor:
    """Mirrors ``(..., S, H, W, C)`` volumes along the col axis (patient left <-> right), as
    the flip augmentation does (`input_pipeline.mirror_cols`)."""
    return input_pipeline.mirror_cols(volume)


def sides_back(probs: tf.Tensor) -> tf.Tensor:
    """``(..., 4)`` outputs of mirrored exams -> the same breasts in the exams' own sides."""
    return tf.gather(probs, input_pipeline.MIRRORED_LABEL_ORDER, axis=-1)


def averaged(probs_fn, volume: tf.Tensor, mode: str) -> tf.Tensor:
    """Probabilities of ``volume`` under test-time augmentation ``mode``.

    Args:
      probs_fn: callable mapping a batch ``(B, S, H, W, C)`` to ``(B, 4)`` positive-class
        probabilities in ``constants.LABELS`` order.
      volume: float32 ``(B, S, H, W, C)``, preprocessed.
      mode: one of ``MODES``.

    Returns:
      float32 ``(B, 4)``.
    """
    probs = probs_fn(volume)
    if check_mode(mode) == "none":
        return probs
    return (probs + sides_back(probs_fn(mirror(volume)))) / 2.0
