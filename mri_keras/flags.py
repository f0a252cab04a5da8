"""All training flags, defined in one place, and their conversion to a ``TrainConfig``.

Defaults are neutral (the paper's model and recipe) so tests and flagfiles set only what they
change. Flagfiles hold one ``--flag=value`` per line, ``#`` comments, and may include others
with ``--flagfile=``.

``TRAIN_FLAGS`` maps every flag to its TrainConfig field(s) and converts values both ways:
``train_config_from_flags`` reads it flag -> config, ``train_flag_lines`` config -> flag lines
(through each flag's own absl serializer). Flags only convert text; the config dataclasses
check the values and name the field, re-worded here with the flag's name.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from mri_keras import config as config_lib
from mri_keras import constants

_PRECISIONS = {
    "float32": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
}


def _configs_dirs() -> list[str]:
    """The project's flagfile folders, in lookup order.

    ``configs/`` inside the installed package (a wheel ships the top-level ``configs/`` as
    ``mri_keras/configs/``, see setup.cfg), then the top-level ``configs/`` of the source
    checkout this package is imported from (an editable install or ``PYTHONPATH``).
    """
    dirs = []
    packaged = importlib.resources.files("mri_keras") / "configs"
    if isinstance(packaged, pathlib.Path) and packaged.is_dir():
        dirs.append(str(packaged))
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Only a checkout (setup.cfg beside it): never some other distribution's site-packages/configs.
    if os.path.isfile(os.path.join(checkout, "setup.cfg")):
        source = os.path.join(checkout, "configs")
        if os.path.isdir(source):
            dirs.append(source)
    return dirs


def _in_configs(name: str) -> str | None:
    """``configs/NAME`` of the project when ``name`` is a bare file name found there."""
    if not name or os.path.dirname(name):
        return None
    for directory in _configs_dirs():
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _not_found(path: str, places: list[str]) -> flags.CantOpenFlagFileError:
    """The one-line error for a flagfile found nowhere: names it and where it was looked for."""
    if not os.path.dirname(path):
        dirs = _configs_dirs()
        places.append(f"the project's configs {' and '.join(dirs) or '(none installed)'}")
    looked = ", then ".join(places)
    return flags.CantOpenFlagFileError(
        f"Unable to open flagfile {path}: not found (looked in {looked})"
    )


def _resolve_top_level(path: str) -> str:
    """A ``--flagfile`` of the command line: as given if it exists (absl: relative to the
    working directory), else a bare name (no directory part) in the project's configs."""
    path = os.path.expanduser(path)
    if os.path.isabs(path) or os.path.exists(path):
        return path
    found = _in_configs(path)
    if found is None:
        raise _not_found(path, [f"the working directory {os.getcwd()}"])
    return found


def _resolve_nested(path: str, including_file: str) -> str:
    """A nested flagfile path as given if it exists (absl: relative to the working directory),
    else relative to the including flagfile's directory or the nearest parent that has it,
    else (a bare name) in the project's configs."""
    path = os.path.expanduser(path)
    if os.path.isabs(path) or os.path.exists(path):
        return path
    directory = os.path.dirname(os.path.abspath(including_file))
    while True:
        candidate = os.path.join(directory, path)
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    found = _in_configs(path)
    if found is None:
        raise _not_found(
            path,
            [
                f"the working directory {os.getcwd()}",
                f"the folder of {including_file} (which includes it) and its parents",
            ],
        )
    return found


def _flagfile_lines(path: str, stack: list[str]) -> list[str]:
    real = os.path.realpath(path)
    if real in stack:
        raise flags.CantOpenFlagFileError(f"circular --flagfile include of {path}")
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise flags.CantOpenFlagFileError(f"Unable to open flagfile: {e}") from None
    stack.append(real)
    out = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#") or text.startswith("//"):
            continue
        if text.startswith(("--flagfile=", "-flagfile=")):
            nested = text.split("=", 1)[1].strip()
            if nested:
                out.extend(_flagfile_lines(_resolve_nested(nested, path), stack))
            continue
        out.append(text)
    stack.pop()
    return out


def expand_flagfiles(argv: Sequence[str]) -> list[str]:
    """Inlines every ``--flagfile=PATH`` of ``argv`` (``argv[0]`` is the program name).

    As absl does, except where a flagfile is looked for when it does not exist relative to the
    working directory:

    - on the command line, a bare name (no directory part) is looked up in the project's
      ``configs/`` (shipped inside the installed package, or the checkout's), so
      ``--flagfile=t2sub.flags`` works from any working directory;
    - a nested ``--flagfile=`` inside a flagfile is looked up relative to the including
      flagfile's directory and its parents (``configs/t2sub.flags`` includes
      ``configs/base.flags``, found from any working directory), then, a bare name, in the
      project's ``configs/``.

    Stops at ``--``.

    Raises:
      absl.flags.CantOpenFlagFileError: a flagfile cannot be found or read (the one-line
        message names it and where it was looked for).
    """
    argv = list(argv)
    out = argv[:1]
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg.startswith(("--flagfile=", "-flagfile=")):
            path = arg.split("=", 1)[1]
            if path:  # absl ignores an empty --flagfile=.
                out.extend(_flagfile_lines(_resolve_top_level(path), []))
        elif arg in ("--flagfile", "-flagfile") and i + 1 < len(argv):
            out.extend(_flagfile_lines(_resolve_top_level(argv[i + 1]), []))
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def parse_in_process(program: str, define, argv: Sequence[str]) -> flags.FlagValues:
    """Parses ``argv`` into fresh flag values, leaving the global ``FLAGS`` untouched.

    For running an entry point in-process (tests, notebooks). Flagfiles are expanded as on the
    command line; bad flags or stray arguments exit (``SystemExit``) with the command line's
    one-line message.

    Args:
      program: str. Name used in messages, e.g. "mri_keras.train".
      define: callable taking a ``FlagValues`` and defining the program's flags on it.
      argv: flags and ``--flagfile``s, without the program name.
    """
    fv = flags.FlagValues()
    define(fv)
    try:
        rest = fv(expand_flagfiles([program, *argv]))
    except flags.Error as e:
        raise SystemExit(f"{program}: error: {e}") from None
    if len(rest) > 1:
        raise SystemExit(f"{program}: error: unexpected command-line arguments: {rest[1:]}")
    return fv


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines every training flag on ``flag_values`` (a no-op when already defined)."""
    if "data_dir" in flag_values:
        return
    fv = dict(flag_values=flag_values)
    # Data and run directories.
    flags.DEFINE_string(
        "data_dir", None, "Records directory written by `python -m tfrecords_tools.convert`.", **fv
    )
    flags.DEFINE_string(
        "model_dir",
        None,
        "Run directory: checkpoints/, best.keras, export/, metrics.csv, tensorboard/, "
        "config.json. Rerunning the same command resumes the run.",
        **fv,
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Delete the run already in --model_dir (checkpoints, metrics, models, export) and start "
        "over, instead of resuming it.",
        **fv,
    )
    flags.DEFINE_string(
        "init_weights",
        "",
        "Start from these weights (.keras or .weights.h5 of a model with the same shape) "
        "instead of a random initialisation. Ignored when resuming.",
        **fv,
    )
    # Recipe.
    flags.DEFINE_integer("epochs", 50, "Passes over the training exams.", **fv)
    flags.DEFINE_float(
        "learning_rate",
        1e-5,
        "Adam learning rate (the peak of a schedule).",
        **fv,
    )
    flags.DEFINE_enum(
        "lr_schedule",
        "constant",
        list(constants.LR_SCHEDULES),
        "constant (the paper) or cosine (decay to 0 over the run after the warm-up; a resumed "
        "run then keeps its --epochs).",
        **fv,
    )
    flags.DEFINE_float(
        "warmup_epochs",
        0.0,
        "Epochs of linear learning-rate warm-up at the start (0: none).",
        **fv,
    )
    flags.DEFINE_float(
        "train_fraction",
        1.0,
        "Fraction in (0, 1] of training PATIENTS to train on (seeded subsample, for the data-size "
        "experiment of the paper's Figure 2). Validation is always the whole split.",
        **fv,
    )
    flags.DEFINE_integer("seed", 0, "Seed of initialisation, subsampling and augmentation.", **fv)
    # Input pipeline.
    flags.DEFINE_string(
        "input",
        "t2sub",
        f"Input image (paper's Table 1): a phase or a subtraction, one of "
        f"{', '.join(constants.INPUT_VARIANTS + tuple(constants.INPUT_ALIASES))} (t2sub = t2-t0); "
        "or a comma-separated list of different ones stacked as channels, e.g. t0,t1,t2 or "
        "t1sub,t2sub,t3sub (each channel normalised on its own).",
        **fv,
    )
    flags.DEFINE_enum(
        "normalization",
        "zscore",
        list(constants.NORMALIZATIONS),
        "Per-exam intensity scaling.",
        **fv,
    )
    flags.DEFINE_list(
        "percentiles", ["0.5", "99.5"], "Low,high percentiles for --normalization=percentile.", **fv
    )
    flags.DEFINE_bool(
        "flip", True, "Train-time left-right flip (p=0.5) that swaps left/right labels.", **fv
    )
    flags.DEFINE_string(
        "crop",
        "",
        "Train-time random in-plane crop: a fraction of each side (e.g. 0.875), a size "
        "'H,W' (e.g. 224,224) or one size for both; empty for none.",
        **fv,
    )
    flags.DEFINE_integer(
        "crop_slices",
        0,
        "Train-time random crop to this many slices (0: none).",
        **fv,
    )
    flags.DEFINE_integer(
        "shuffle_buffer",
        64,
        "Training exams in the shuffle buffer; 0 buffers the whole training split (its "
        "records' bytes in memory), so every epoch is a true random permutation.",
        **fv,
    )
    # Model.
    flags.DEFINE_integer(
        "width",
        64,
        "Channels of the first trunk stage (stages: x1, x2, x4, x8).",
        **fv,
    )
    flags.DEFINE_list(
        "blocks", ["2", "2", "2", "2"], "Basic blocks per trunk stage (4 ints).", **fv
    )
    flags.DEFINE_integer("stem_kernel", 5, "Kernel size of the stride-2 stem conv.", **fv)
    flags.DEFINE_integer("channels_3d", 128, "Channels of the 3D residual block.", **fv)
    flags.DEFINE_float(
        "dropout",
        0.0,
        "Dropout before the heads, in [0, 1) (0: none).",
        **fv,
    )
    flags.DEFINE_enum(
        "init",
        "glorot",
        list(constants.INITS),
        "Initialisation: glorot (Keras' default, the paper) or he_zero_residual (He-normal, "
        "each residual block the identity at the start).",
        **fv,
    )
    flags.DEFINE_enum(
        "norm",
        "none",
        list(constants.NORMS),
        "none (the paper) or group: GroupNormalization after every convolution of the stem "
        "and residual branches (per-exam statistics; works with one exam per batch).",
        **fv,
    )
    flags.DEFINE_integer("norm_groups", 8, "Groups per GroupNormalization (--norm=group).", **fv)
    flags.DEFINE_enum(
        "slice_mode",
        "fold",
        list(constants.SLICE_MODES),
        "How the 2D trunk meets the slices (same outputs; fold is faster).",
        **fv,
    )
    # Speed and memory.
    flags.DEFINE_enum(
        "mixed_precision",
        "float32",
        list(_PRECISIONS),
        "Compute precision: float32, bfloat16 (mixed_bfloat16) or float16 (mixed_float16, "
        "with loss scaling). Heads always compute in float32.",
        **fv,
    )
    flags.DEFINE_bool(
        "jit_compile",
        False,
        "Compile the train step with XLA; exams are padded/cropped to a few shape buckets so "
        "it compiles a bounded number of times.",
        **fv,
    )
    flags.DEFINE_list(
        "slice_buckets",
        [str(v) for v in constants.DEFAULT_SLICE_BUCKETS],
        "With --jit_compile: slice counts training exams are padded/cropped (centred) to.",
        **fv,
    )
    flags.DEFINE_list(
        "size_buckets",
        [str(v) for v in constants.DEFAULT_SIZE_BUCKETS],
        "With --jit_compile: heights/widths training exams are padded/cropped (centred) to.",
        **fv,
    )
    flags.DEFINE_enum(
        "preprocess_on",
        "auto",
        list(constants.PREPROCESS_ON),
        "Where the per-voxel preprocessing (rescale, subtraction, normalisation, crop, flip) "
        "runs: cpu (tf.data), device (inside the train step, on the accelerator; tf.data only "
        "parses and draws the augmentation) or auto (device when there is a GPU).",
        **fv,
    )
    flags.DEFINE_integer(
        "remat",
        0,
        "Recompute the 2D trunk in the backward pass this many slices at a time (0: off); "
        "trades step time for activation memory on long exams.",
        **fv,
    )
    # Devices.
    flags.DEFINE_enum(
        "strategy",
        "auto",
        list(constants.STRATEGIES),
        "auto | one_device | mirrored (all local GPUs, or --cpu_replicas CPUs) | multi_worker "
        "(cluster from TF_CONFIG).",
        **fv,
    )
    flags.DEFINE_integer(
        "cpu_replicas",
        1,
        "Logical CPU replicas per worker when no GPU is visible (mirrored/multi_worker).",
        **fv,
    )
    flags.DEFINE_bool(
        "progress",
        True,
        "Show a progress bar per epoch (--noprogress: only the start-up summary, one line per "
        "epoch and the end summary, e.g. for log files).",
        **fv,
    )


# --------------------------------------------------------------------------------------------
# Flags <-> TrainConfig: one table, read both ways.
#
# Converters only turn a flag's value into a field's value and back. Text they cannot convert
# goes through unchanged, so the config class that owns the field rejects it (ConfigError);
# the message is then re-worded with the flag's name and text. Nothing here checks ranges.


def _parse_crop(text: str):
    """--crop text -> InputConfig.crop: "" -> None, "0.875" -> 0.875, "224,192" or "224x192"
    -> (224, 192), "96" -> (96, 96); anything else is returned as given."""
    text = text.strip()
    if not text:
        return None
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        try:
            return float(text) if len(parts) == 1 else text
        except ValueError:
            return text
    return sizes * 2 if len(sizes) == 1 else sizes


def _format_crop(crop) -> str:
    if crop is None:
        return ""
    if isinstance(crop, tuple):
        return ",".join(str(v) for v in crop)
    return repr(float(crop))


def _numbers(kind):
    """A list flag's strings -> a tuple of ``kind`` (an entry that is not one stays a string)."""

    def parse(texts):
        out = []
        for text in texts:
            try:
                out.append(kind(text))
            except ValueError:
                out.append(text)
        return tuple(out)

    return parse


def _texts(values) -> list[str]:
    return [repr(v) if isinstance(v, float) else str(v) for v in values]


def parse_buckets(text: str, name: str = "buckets") -> tuple[int, ...]:
    """Reads ``"32,64,128"`` as a tuple of ints (``buckets.BucketSpec`` checks them).

    Args:
      text: str. Comma-separated sizes.
      name: str. What the sizes are, for the error message. Defaults to "buckets".

    Raises:
      ValueError: an entry that is not an integer.
    """
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(
            f"{name} must be comma-separated positive ints. Received: {name}={text!r}"
        ) from None


def _buckets(name: str):
    return lambda texts: parse_buckets(",".join(texts), f"--{name}")


def _same(value):
    return value


@dataclasses.dataclass(frozen=True)
class FlagField:
    """Where one training flag goes in ``train_lib.TrainConfig``.

    Attributes:
      paths: tuple of str. The fields the flag sets, dotted from TrainConfig ("epochs",
        "model.width", "input.crop"); the first is the one the flag is written back from.
      parse: callable. The flag's value (as absl parsed it) -> the field's value.
      unparse: callable. The field's value -> the flag's value (for the flag's serializer).
    """

    paths: tuple[str, ...]
    parse: Callable[[Any], Any] = _same
    unparse: Callable[[Any], Any] = _same


_PRECISION_OF_POLICY = {policy: name for name, policy in _PRECISIONS.items()}

# Every flag ``define_flags`` defines, and only those (tests/test_flags.py checks both ways).
TRAIN_FLAGS: dict[str, FlagField] = {
    "data_dir": FlagField(("data_dir",)),
    "model_dir": FlagField(("model_dir",)),
    "overwrite": FlagField(("overwrite",)),
    "init_weights": FlagField(("init_weights",)),
    "epochs": FlagField(("epochs",)),
    "learning_rate": FlagField(("learning_rate",)),
    "lr_schedule": FlagField(("lr_schedule",)),
    "warmup_epochs": FlagField(("warmup_epochs",)),
    "train_fraction": FlagField(("train_fraction",)),
    "seed": FlagField(("seed",)),
    "input": FlagField(("input.input_variant",)),
    "normalization": FlagField(("input.normalization",)),
    "percentiles": FlagField(("input.percentiles",), _numbers(float), _texts),
    "flip": FlagField(("input.flip",)),
    "crop": FlagField(("input.crop",), _parse_crop, _format_crop),
    "crop_slices": FlagField(("input.crop_slices",)),
    "shuffle_buffer": FlagField(("input.shuffle_buffer",)),
    "width": FlagField(("model.width",)),
    "blocks": FlagField(("model.blocks_per_stage",), _numbers(int), _texts),
    "stem_kernel": FlagField(("model.stem_kernel",)),
    "channels_3d": FlagField(("model.channels_3d",)),
    "dropout": FlagField(("model.dropout",)),
    "init": FlagField(("model.init",)),
    "norm": FlagField(("model.norm",)),
    "norm_groups": FlagField(("model.norm_groups",)),
    "slice_mode": FlagField(("model.slice_mode",)),
    "mixed_precision": FlagField(
        ("model.dtype_policy",), _PRECISIONS.__getitem__, _PRECISION_OF_POLICY.__getitem__
    ),
    "jit_compile": FlagField(("jit_compile",)),
    "slice_buckets": FlagField(("slice_buckets",), _buckets("slice_buckets"), _texts),
    "size_buckets": FlagField(("size_buckets",), _buckets("size_buckets"), _texts),
    "preprocess_on": FlagField(("preprocess_on",)),
    "remat": FlagField(("model.remat_chunk",)),
    "strategy": FlagField(("strategy",)),
    "cpu_replicas": FlagField(("cpu_replicas",)),
    # --progress: verbose 2 (progress bars), --noprogress: 1; verbose 0 has no flag.
    "progress": FlagField(("verbose",), lambda progress: 2 if progress else 1, lambda v: v > 1),
}
_FLAG_OF_PATH = {path: name for name, field in TRAIN_FLAGS.items() for path in field.paths}


def _flag_error(error: config_lib.ConfigError, section: str, fv: flags.FlagValues) -> ValueError:
    """``error`` re-worded with flag names and the flag text given."""
    names = [error.field, *error.others]
    flag_names = [_FLAG_OF_PATH.get(f"{section}.{n}" if section else n) for n in names]
    if None in flag_names:
        return error
    received = ", ".join(fv[name].serialize() for name in flag_names)
    return ValueError(f"--{flag_names[0]} must be {error.requirement}. Received: {received}")


def train_config_from_flags(fv: flags.FlagValues = flags.FLAGS):
    """Converts parsed flags into a ``train_lib.TrainConfig`` (the only place flags are read).

    Raises:
      ValueError: a missing or bad flag value, naming the flag (or the TrainConfig field).
    """
    from mri_keras import train_lib  # Deferred: flags stay importable without TensorFlow work.

    for name in ("data_dir", "model_dir"):
        if not fv[name].value:
            raise ValueError(f"--{name} is required.")
    values = {"": {}, "model": {}, "input": {}}
    for name, field in TRAIN_FLAGS.items():
        value = field.parse(fv[name].value)
        for path in field.paths:
            section, _, attr = path.rpartition(".")
            values[section][attr] = value
    top = values[""]
    for section, cls in (("model", config_lib.ModelConfig), ("input", config_lib.InputConfig)):
        try:
            top[section] = cls(**values[section])
        except config_lib.ConfigError as e:
            raise _flag_error(e, section, fv) from None
    try:
        return train_lib.TrainConfig(**top)
    except config_lib.ConfigError as e:
        raise _flag_error(e, "", fv) from None


def _get(config, path: str):
    for attr in path.split("."):
        config = getattr(config, attr)
    return config


def train_flag_lines(config) -> list[str]:
    """``--flag=value`` lines, one per training flag, that make ``train_config_from_flags``
    build ``config`` (a ``train_lib.TrainConfig``) again.

    Each value is written by its flag's own absl serializer, from the field ``TRAIN_FLAGS``
    names for it. ``TrainConfig.val_split`` has no flag, and ``verbose=0`` reads back as 1.

    Raises:
      KeyError: a flag of ``define_flags`` has no entry in ``TRAIN_FLAGS``.
    """
    fv = flags.FlagValues()
    define_flags(fv)
    lines = []
    for name in fv:
        if name not in TRAIN_FLAGS:
            raise KeyError(f"--{name} has no entry in mri_keras.flags.TRAIN_FLAGS.")
        field = TRAIN_FLAGS[name]
        setattr(fv, name, field.unparse(_get(config, field.paths[0])))
        lines.append(fv[name].serialize())
    return lines


def train_config_from_flag_lines(lines: Sequence[str]):
    """The ``TrainConfig`` that ``mri_keras.train`` builds from ``lines`` (no flagfiles)."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["mri_keras.train", *lines])
    return train_config_from_flags(fv)
