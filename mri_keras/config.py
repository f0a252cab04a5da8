"""Frozen configuration dataclasses shared by the model, the input pipeline and training.

Entry points convert absl flags into these once; nothing below an entry point reads flags.
Each class validates (and normalises, e.g. lists to tuples) its own fields when built, so a
config that exists is a valid one; a bad field raises ``ConfigError`` naming it.
"""

from __future__ import annotations

import dataclasses
import numbers

from mri_keras import constants


class ConfigError(ValueError):
    """A config field holds a bad value.

    The message names the field, what it must be and the value received; the flag layer
    (``mri_keras.flags``) re-words it with the flag's name and text.

    Attributes:
      field: str. The field, e.g. "blocks_per_stage".
      requirement: str. What a good value is, e.g. "4 ints >= 1".
      value: the value received.
      others: dict. Other fields the rule involves and their values.
    """

    def __init__(self, field: str, requirement: str, value, others: dict | None = None):
        self.field = field
        self.requirement = requirement
        self.value = value
        self.others = dict(others or {})
        received = ", ".join(f"{k}={v!r}" for k, v in {field: value, **self.others}.items())
        super().__init__(f"{field} must be {requirement}. Received: {received}")

    def __reduce__(self):  # Picklable (errors of trials in child processes travel back).
        return (type(self), (self.field, self.requirement, self.value, self.others))


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(config, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if not (is_int(value) and value >= minimum):
        raise ConfigError(name, f"an int >= {minimum}", value)


def check_choice(config, name: str, choices) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(name, f"one of {tuple(choices)}", value)


def _set(config, name: str, value) -> None:
    object.__setattr__(config, name, value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Doubly Deep CNN's shape.

    Attributes:
      width: int. Channels of the first trunk stage (stages use width x 1, 2, 4, 8).
        Defaults to 64 (the paper: 11,611,785 parameters).
      blocks_per_stage: tuple of 4 ints >= 1. Basic blocks per trunk stage (a list is taken
        as a tuple). Defaults to (2, 2, 2, 2).
      stem_kernel: int. Kernel size of the stride-2 stem conv. Defaults to 5.
      channels_3d: int. Channels of the 3D residual block. Defaults to 128.
      dropout: float. Dropout rate before the heads, in [0, 1) (0 disables). Defaults to 0.
      slice_mode: str. How the 2D trunk meets the slices: "fold" (slices folded into the
        batch dimension with a reshape) or "time_distributed" (keras.layers.TimeDistributed).
        Same outputs with the same weights. Defaults to "fold".
      remat_chunk: int. If > 0, recompute the 2D trunk in the backward pass chunk of
        `remat_chunk` slices by chunk (TF backend only; needs slice_mode "fold").
        Defaults to 0 (off).
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

    def __post_init__(self):
        for name in ("width", "stem_kernel", "channels_3d", "norm_groups"):
            check_int(self, name, 1)
        blocks = self.blocks_per_stage
        if not (
            isinstance(blocks, (tuple, list))
            and len(blocks) == 4
            and all(is_int(b) and b >= 1 for b in blocks)
        ):
            raise ConfigError("blocks_per_stage", "4 positive ints", blocks)
        _set(self, "blocks_per_stage", tuple(int(b) for b in blocks))
        if not (is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError("dropout", "a number in [0, 1)", self.dropout)
        check_choice(self, "slice_mode", constants.SLICE_MODES)
        check_int(self, "remat_chunk", 0)
        if self.remat_chunk and self.slice_mode != "fold":
            raise ConfigError(
                "remat_chunk",
                "0 unless slice_mode is 'fold' (recomputation works on the folded trunk)",
                self.remat_chunk,
                {"slice_mode": self.slice_mode},
            )
        check_choice(self, "dtype_policy", constants.DTYPE_POLICIES)
        check_choice(self, "init", constants.INITS)
        check_choice(self, "norm", constants.NORMS)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How records become model inputs.

    Attributes:
      input_variant: str. One of constants.INPUT_VARIANTS (or an alias such as "t2sub"), or
        a comma-separated list of different ones stacked as channels in that order ("t0,t1,t2",
        "t1sub,t2sub,t3sub"). Kept in canonical form (``constants.canonical_input``: aliases
        resolved, "t1-t0,t2-t0,t3-t0"), so a saved config reads back the same. Defaults to
        "t2-t0".
      normalization: str. "zscore" (per exam) or "percentile" (clip to the
        [low, high] percentiles of the exam, then scale to [0, 1]). Defaults to "zscore".
      percentiles: (float, float). Percentiles for "percentile", 0 <= low <= high <= 100.
        Defaults to (0.5, 99.5).
      flip: bool. Train-only left-right flip with p=0.5 that swaps left/right labels.
        Defaults to True.
      crop: None, float or (int, int). Train-only random in-plane crop: a fraction of each
        in-plane side in (0, 1], or a size (h, w) (an int n is read as (n, n)). None disables.
        Defaults to None.
      crop_slices: int. Train-only random crop along slices to this many slices (0 disables).
        Defaults to 0.
      shuffle_buffer: int. Exams in the train shuffle buffer; 0 holds the whole training
        split (its serialized records), which makes every epoch a uniformly random
        permutation of all training exams whatever the sharding. Defaults to 64.
    The model input has ``channels`` channels, one per listed variant. The seed of shuffling
    and augmentation is not an input setting: it is the run's one seed
    (``TrainConfig.seed``), given to ``input_pipeline.make_dataset`` per epoch.
    """

    input_variant: str = "t2-t0"
    normalization: str = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    flip: bool = True
    crop: float | tuple[int, int] | None = None
    crop_slices: int = 0
    shuffle_buffer: int = 64

    def __post_init__(self):
        try:
            _set(self, "input_variant", constants.canonical_input(self.input_variant))
        except constants.InputError as e:
            raise ConfigError(
                "input_variant",
                f"one of {constants.INPUT_VARIANTS} or an alias {tuple(constants.INPUT_ALIASES)}, "
                f"or a comma-separated list of different ones; {e.problem}",
                self.input_variant,
            ) from None
        check_choice(self, "normalization", constants.NORMALIZATIONS)
        percentiles = self.percentiles
        if (
            isinstance(percentiles, (tuple, list))
            and len(percentiles) == 2
            and all(is_real(p) for p in percentiles)
            and 0.0 <= percentiles[0] <= percentiles[1] <= 100.0
        ):
            _set(self, "percentiles", (float(percentiles[0]), float(percentiles[1])))
        else:
            raise ConfigError(
                "percentiles", "(low, high) with 0 <= low <= high <= 100", self.percentiles
            )
        if not isinstance(self.flip, bool):
            raise ConfigError("flip", "True or False", self.flip)
        _set(self, "crop", _crop_value(self.crop))
        check_int(self, "crop_slices", 0)
        if not is_int(self.shuffle_buffer) or self.shuffle_buffer < 0:
            raise ConfigError(
                "shuffle_buffer", "an int >= 0 (0: the whole split)", self.shuffle_buffer
            )

    @property
    def channels(self) -> int:
        """Channels of the model input: one per variant of ``input_variant``."""
        return len(constants.input_channels(self.input_variant))


def _crop_value(crop):
    """``InputConfig.crop`` in its one parsed form: None, a float fraction or (h, w) ints."""
    if crop is None:
        return None
    if is_real(crop) and not is_int(crop):
        if 0.0 < crop <= 1.0:
            return float(crop)
    else:
        size = (crop, crop) if is_int(crop) else crop
        if (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(is_int(v) and v >= 1 for v in size)
        ):
            return (int(size[0]), int(size[1]))
    raise ConfigError(
        "crop",
        "None (no crop), a fraction in (0, 1] of each in-plane side, or a size in voxels: "
        "an int n (n x n) or a pair of ints (h, w) >= 1",
        crop,
    )


def from_saved(cls, saved):
    """A config dataclass (InputConfig, ModelConfig...) from its saved dict (config.json, an
    export's metadata), ignoring keys this version does not know; lists become the tuples the
    dataclass normalises them to."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in saved.items() if k in names})
