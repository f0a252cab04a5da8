"""Names every part of mri_keras keys off (heads, losses, metrics, CSV columns).

Kept free of TensorFlow/tfrecords_tools imports so model code can use it on any backend;
``tests/test_constants.py`` checks these agree with ``tfrecords_tools.schema``.
"""

# A training run's directory (``mri_keras.run_dir``) and its SavedModel export
# (``mri_keras.export``): the writers and the loader (``mri_keras.inference``) share these.
CONFIG_NAME = "config.json"  # The run's settings, {"input": {...}, "model": {...}, ...}.
BEST_MODEL_NAME = "best.keras"
EXPORT_DIR = "export"
EXPORT_METADATA_PATH = "assets.extra/mri_keras.json"  # Inside the export: {"input_config": ...}.

# Output heads / label columns, always in this order.
LABELS = ("left_benign", "left_malignant", "right_benign", "right_malignant")
SIDES = ("left", "right")
TASKS = ("benign", "malignant")
PHASES = ("t0", "t1", "t2", "t3")

# Input images of the paper's Table 1. A subtraction "tK-t0" is computed at read time in
# float32 and never stored.
INPUT_VARIANTS = ("t0", "t1", "t2", "t3", "t1-t0", "t2-t0", "t3-t0")
# Flagfile-friendly aliases (configs/t2sub.flags uses --input=t2sub). An input may also be a
# comma-separated list of variants stacked as channels ("t0,t1,t2"; ``canonical_input``).
INPUT_ALIASES = {"t1sub": "t1-t0", "t2sub": "t2-t0", "t3sub": "t3-t0"}

# Per-exam intensity scaling (InputConfig.normalization).
NORMALIZATIONS = ("zscore", "percentile")

# How the 2D trunk meets the slices, and the Keras dtype policies a model may compute in.
SLICE_MODES = ("fold", "time_distributed")
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")

# Distribution strategies (``mri_keras.strategy``) and the XLA shape buckets' defaults
# (``mri_keras.buckets``): here so the flag definitions need no TensorFlow import.
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
DEFAULT_SLICE_BUCKETS = (32, 48, 64, 96, 128, 160, 192, 256)
DEFAULT_SIZE_BUCKETS = (128, 192, 256, 320, 384, 448, 512)
# Where training's per-voxel preprocessing runs (``TrainConfig.preprocess_on``).
PREPROCESS_ON = ("auto", "cpu", "device")

# Training options beyond the paper (the paper: "glorot", "none", "constant").
INITS = ("glorot", "he_zero_residual")
NORMS = ("none", "group")
LR_SCHEDULES = ("constant", "cosine")

# Test-time augmentation of evaluate / predict / the export (``mri_keras.tta``).
TTA_MODES = ("none", "flip")

# Search algorithms of mri_keras.tune.
TUNERS = ("hyperband", "bayesian", "random")


class InputError(ValueError):
    """An input that is no variant or list of variants; ``problem`` says what is wrong with it
    in a few words (e.g. "'t9' is not an input variant")."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(
            f"Bad input: {problem}; expected one of {INPUT_VARIANTS} or an alias "
            f"{tuple(INPUT_ALIASES)}, or a comma-separated list of different ones (e.g. "
            "'t0,t1,t2')."
        )

    def __reduce__(self):
        return (type(self), (self.problem,))


def canonical_input(name: str) -> str:
    """Canonical name of an input: one variant or a comma-separated list of them.

    An element may be any variant or alias (``t2sub`` -> ``t2-t0``); a list is stacked as
    channels in the order given, e.g. ``"t0,t1,t2"`` (nyukat/MRI_AI's ``three_channel``) or
    ``"t1sub,t2sub,t3sub"`` -> ``"t1-t0,t2-t0,t3-t0"``. Spaces around elements are ignored.

    Raises:
      InputError (a ValueError): an element that is no variant (the message names it), an
        empty element, or the same image twice (also through an alias: ``t2sub,t2-t0``).
    """
    if not isinstance(name, str):
        raise InputError(f"{name!r} is not a string")
    elements = [e.strip() for e in name.split(",")]
    canonical, spelled = [], []
    for element in elements:
        if not element:
            raise InputError(f"{name!r} has an empty element")
        variant = INPUT_ALIASES.get(element, element)
        if variant not in INPUT_VARIANTS:
            where = f" (in {name!r})" if len(elements) > 1 else ""
            raise InputError(f"{element!r}{where} is not an input variant")
        if variant in canonical:
            first = spelled[canonical.index(variant)]
            both = "" if first == element else f" (as {first!r} and {element!r})"
            raise InputError(f"{name!r} names {variant!r} twice{both}")
        canonical.append(variant)
        spelled.append(element)
    return ",".join(canonical)


def input_channels(input_variant: str) -> tuple:
    """The canonical variant of each input channel, in order: ``"t0,t2sub"`` -> ``("t0",
    "t2-t0")``; a single variant is one channel."""
    return tuple(canonical_input(input_variant).split(","))


def phases_needed(input_variant: str) -> tuple:
    """The stored phases an input reads, in ``PHASES`` order: ``t2-t0`` -> ``("t0", "t2")``;
    a multi-channel input reads the union of its channels' phases (``t0,t1,t2`` ->
    ``("t0", "t1", "t2")``)."""
    needed = set()
    for variant in input_channels(input_variant):
        needed.update(variant.split("-"))
    return tuple(p for p in PHASES if p in needed)
