"""Frozen configuration dataclasses shared by the model, the input pipeline and training.

Entry points convert absl flags into these once; nothing below an entry point reads flags.
"""

from __future__ import annotations

import dataclasses

from mri_keras import constants


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Doubly Deep CNN's shape.

    Attributes:
      width: int. Channels of the first trunk stage (stages use width x 1, 2, 4, 8).
        Defaults to 64 (the paper: 11,611,785 parameters).
      blocks_per_stage: tuple of 4 ints. Basic blocks per trunk stage. Defaults to (2, 2, 2, 2).
      stem_kernel: int. Kernel size of the stride-2 stem conv. Defaults to 5.
      channels_3d: int. Channels of the 3D residual block. Defaults to 128.
      dropout: float. Dropout rate before the heads (0 disables). Defaults to 0.
      slice_mode: str. How the 2D trunk meets the slices: "fold" (slices folded into the
        batch dimension with a reshape) or "time_distributed" (keras.layers.TimeDistributed).
        Same outputs with the same weights. Defaults to "fold".
      remat_chunk: int. If > 0, recompute the 2D trunk in the backward pass chunk of
        `remat_chunk` slices by chunk (TF backend only). Defaults to 0 (off).
      dtype_policy: str. Keras dtype policy ("float32", "mixed_bfloat16", "mixed_float16");
        heads always compute in float32. Defaults to "float32".
      init: str. Weight initialisation: "glorot" (Keras' default, the paper's code) or
        "he_zero_residual" (He-normal convolutions, and the last layer of every residual
        branch zeroed so each residual block starts as the identity). Defaults to "glorot".
      norm: str. Normalisation inside the convolutional blocks: "none" (the paper) or "group"
        (GroupNormalization after every convolution of the stem and the residual branches;
        per-exam statistics, so it works with one exam per batch). Defaults to "none".
      norm_groups: int. Groups of each GroupNormalization (capped by, and dividing, the
        channel count). Defaults to 8.
    """

    width: int = 64
    blocks_per_stage: tuple[int, int, int, int] = (2, 2, 2, 2)
    stem_kernel: int = 5
    channels_3d: int = 128
    dropout: float = 0.0
    slice_mode: str = "fold"
    remat_chunk: int = 0
    dtype_policy: str = "float32"
    init: str = "glorot"
    norm: str = "none"
    norm_groups: int = 8


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How records become model inputs.

    Attributes:
      input_variant: str. One of constants.INPUT_VARIANTS (or an alias such as "t2sub").
        Defaults to "t2-t0".
      normalization: str. "zscore" (per exam) or "percentile" (clip to the
        [low, high] percentiles of the exam, then scale to [0, 1]). Defaults to "zscore".
      percentiles: (float, float). Percentiles for "percentile". Defaults to (0.5, 99.5).
      flip: bool. Train-only left-right flip with p=0.5 that swaps left/right labels.
        Defaults to True.
      crop: Optional (int, int) or float. Train-only random in-plane crop: a size (h, w) or a
        fraction of each in-plane side in (0, 1]. None disables. Defaults to None.
      crop_slices: int. Train-only random crop along slices to this many slices (0 disables).
        Defaults to 0.
      shuffle_buffer: int. Exams in the train shuffle buffer; 0 holds the whole training
        split (its serialized records), which makes every epoch a uniformly random
        permutation of all training exams whatever the sharding. Defaults to 64.
      seed: int. Seed of shuffling and augmentation. Defaults to 0.
    """

    input_variant: str = "t2-t0"
    normalization: str = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    flip: bool = True
    crop: object | None = None
    crop_slices: int = 0
    shuffle_buffer: int = 64
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "input_variant", constants.canonical_input(self.input_variant))
        if self.normalization not in ("zscore", "percentile"):
            raise ValueError(
                "normalization must be 'zscore' or 'percentile'. "
                f"Received: normalization={self.normalization!r}"
            )
        if not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 0:
            raise ValueError(
                "shuffle_buffer must be an int >= 0 (0: the whole split). "
                f"Received: shuffle_buffer={self.shuffle_buffer!r}"
            )
