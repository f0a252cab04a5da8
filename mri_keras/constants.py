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
# Flagfile-friendly aliases (configs/t2sub.flags uses --input=t2sub).
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

# Training options beyond the paper (the paper: "glorot", "none", "constant").
INITS = ("glorot", "he_zero_residual")
NORMS = ("none", "group")
LR_SCHEDULES = ("constant", "cosine")

# Test-time augmentation of evaluate / predict / the export (``mri_keras.tta``).
TTA_MODES = ("none", "flip")

# Search algorithms of mri_keras.tune.
TUNERS = ("hyperband", "bayesian", "random")


def canonical_input(name: str) -> str:
    """Maps an input variant or alias (``t2sub``) to its canonical name (``t2-t0``)."""
    name = INPUT_ALIASES.get(name, name)
    if name not in INPUT_VARIANTS:
        raise ValueError(
            f"Unknown input variant {name!r}; expected one of {INPUT_VARIANTS} "
            f"or {tuple(INPUT_ALIASES)}."
        )
    return name


def phases_needed(input_variant: str) -> tuple:
    """The stored phases an input variant reads, e.g. ``t2-t0`` -> ``("t0", "t2")``."""
    name = canonical_input(input_variant)
    if "-" in name:
        a, b = name.split("-")
        return tuple(p for p in PHASES if p in (a, b))
    return (name,)
