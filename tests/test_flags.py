"""Training flags <-> TrainConfig: one table (flags.TRAIN_FLAGS) read both ways."""

from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from mri_keras import config as config_lib
from mri_keras import flags as flags_lib


def _defined_flags():
    fv = flags.FlagValues()
    flags_lib.define_flags(fv)
    return fv


def _leaf_fields(cls, prefix=""):
    out = set()
    for field in dataclasses.fields(cls):
        nested = field.default_factory  # ModelConfig / InputConfig, or MISSING.
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            out |= _leaf_fields(nested, f"{prefix}{field.name}.")
        else:
            out.add(prefix + field.name)
    return out


def _train_config(**changes):
    from mri_keras import train_lib

    return train_lib.TrainConfig(data_dir="/records", model_dir="/runs/a", **changes)


def test_every_training_flag_has_one_table_entry_and_every_field_a_flag():
    from mri_keras import train_lib

    assert set(_defined_flags()) == set(flags_lib.TRAIN_FLAGS)
    paths = [p for field in flags_lib.TRAIN_FLAGS.values() for p in field.paths]
    assert len(paths) == len(set(paths))
    # val_split has no flag: training always selects on "val".
    assert set(paths) == _leaf_fields(train_lib.TrainConfig) - {"val_split"}


def test_a_flag_without_a_table_entry_is_refused(monkeypatch):
    define = flags_lib.define_flags

    def define_one_more(fv):
        define(fv)
        flags.DEFINE_integer("new_option", 1, "A flag someone forgot to map.", flag_values=fv)

    monkeypatch.setattr(flags_lib, "define_flags", define_one_more)
    with pytest.raises(KeyError, match="--new_option has no entry"):
        flags_lib.train_flag_lines(_train_config())


def _configs():
    model, inputs = config_lib.ModelConfig, config_lib.InputConfig
    return {
        "defaults": _train_config(),
        "everything_changed": _train_config(
            model=model(
                width=16,
                blocks_per_stage=(1, 2, 2, 1),
                stem_kernel=7,
                channels_3d=32,
                dropout=0.3,
                remat_chunk=4,
                dtype_policy="mixed_bfloat16",
                init="he_zero_residual",
                norm="group",
                norm_groups=4,
            ),
            input=inputs(
                input_variant="t3-t0",
                normalization="percentile",
                percentiles=(1.0, 99.0),
                flip=False,
                crop=0.875,
                crop_slices=16,
                shuffle_buffer=0,
            ),
            epochs=7,
            learning_rate=3e-4,
            lr_schedule="cosine",
            warmup_epochs=1.5,
            train_fraction=0.25,
            seed=3,
            strategy="mirrored",
            cpu_replicas=2,
            jit_compile=True,
            slice_buckets=(8, 16),
            size_buckets=(64,),
            preprocess_on="device",
            overwrite=True,
            init_weights="/runs/b/best.keras",
            verbose=1,
        ),
        "crop_size_time_distributed": _train_config(
            model=model(slice_mode="time_distributed", dtype_policy="mixed_float16"),
            input=inputs(input_variant="t1", crop=(64, 48)),
        ),
        "awkward_floats": _train_config(
            model=model(dropout=0.1),
            input=inputs(crop=1 / 3, percentiles=(0.0, 100.0)),
            learning_rate=0.1 + 0.2,
            warmup_epochs=1e-7,
            train_fraction=1 / 7,
        ),
        "square_crop": _train_config(input=inputs(crop=1)),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_config_to_flag_lines_and_back_is_the_identity(name):
    config = _configs()[name]
    lines = flags_lib.train_flag_lines(config)
    assert len(lines) == len(flags_lib.TRAIN_FLAGS)
    assert flags_lib.train_config_from_flag_lines(lines) == config
    # And through the real entry point's parser (flagfile expansion included).
    assert (
        flags_lib.train_config_from_flags(
            flags_lib.parse_in_process("mri_keras.train", flags_lib.define_flags, lines)
        )
        == config
    )


def test_flag_lines_are_what_a_person_would_write():
    lines = flags_lib.train_flag_lines(_configs()["everything_changed"])
    for line in (
        "--crop=0.875",
        "--blocks=1,2,2,1",
        "--percentiles=1.0,99.0",
        "--noflip",
        "--learning_rate=0.0003",
        "--mixed_precision=bfloat16",
        "--remat=4",
        "--input=t3-t0",
        "--slice_buckets=8,16",
        "--noprogress",
        "--overwrite",
    ):
        assert line in lines
    assert "--crop=" in flags_lib.train_flag_lines(_train_config())
    assert "--crop=64,48" in flags_lib.train_flag_lines(_configs()["crop_size_time_distributed"])


def test_verbose_zero_has_no_flag_and_reads_back_as_one():
    lines = flags_lib.train_flag_lines(_train_config(verbose=0))
    assert "--noprogress" in lines
    assert flags_lib.train_config_from_flag_lines(lines).verbose == 1


@pytest.mark.parametrize(
    "text, crop",
    [
        ("", None),
        ("0.875", 0.875),
        ("1e-1", 0.1),
        ("224,192", (224, 192)),
        ("224x192", (224, 192)),
        ("96", (96, 96)),
    ],
)
def test_crop_flag_forms(text, crop):
    assert (
        flags_lib.train_config_from_flag_lines(
            ["--data_dir=d", "--model_dir=m", f"--crop={text}"]
        ).input.crop
        == crop
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--crop=1.5", "--crop must be None (no crop), a fraction in (0, 1]"),
        ("--crop=abc", "Received: --crop=abc"),
        ("--crop=0,4", "Received: --crop=0,4"),
        ("--blocks=a,2,2,2", "--blocks must be 4 positive ints. Received: --blocks=a,2,2,2"),
        ("--percentiles=99,1", "--percentiles must be (low, high) with 0 <= low <= high <= 100"),
        ("--width=0", "--width must be an int >= 1. Received: --width=0"),
        ("--dropout=1", "--dropout must be a number in [0, 1). Received: --dropout=1.0"),
        ("--crop_slices=-1", "--crop_slices must be an int >= 0. Received: --crop_slices=-1"),
        ("--shuffle_buffer=-2", "--shuffle_buffer must be an int >= 0"),
        ("--epochs=0", "--epochs must be an int >= 1. Received: --epochs=0"),
        ("--train_fraction=1.5", "--train_fraction must be a number in (0, 1]. Received: --tr"),
        ("--slice_buckets=0,8", "--slice_buckets must be positive ints. Received: --slice_b"),
    ],
)
def test_bad_values_are_refused_naming_the_flag_and_the_value(flag, message):
    with pytest.raises(ValueError) as e:
        flags_lib.train_config_from_flag_lines(["--data_dir=d", "--model_dir=m", flag])
    assert message in str(e.value)


def test_a_rule_over_two_flags_names_both():
    with pytest.raises(ValueError) as e:
        flags_lib.train_config_from_flag_lines(
            ["--data_dir=d", "--model_dir=m", "--remat=4", "--slice_mode=time_distributed"]
        )
    assert str(e.value).startswith("--remat must be 0 unless slice_mode is 'fold'")
    assert str(e.value).endswith("Received: --remat=4, --slice_mode=time_distributed")


def test_required_flags():
    with pytest.raises(ValueError, match="--model_dir is required"):
        flags_lib.train_config_from_flag_lines(["--data_dir=d"])


def test_flag_definitions_need_no_tensorflow():
    """`python -m mri_keras.train --help` answers at once: defining and parsing the flags
    imports no TensorFlow (it took ~6 s when the flag module imported the strategy module)."""
    import subprocess
    import sys

    code = (
        "import sys; from absl import flags; from mri_keras import flags as f; "
        "fv = flags.FlagValues(); f.define_flags(fv); fv(['x', '--epochs=3']); "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
