"""The config dataclasses validate and normalise their own fields (one place per option)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from mri_keras import config as config_lib
from mri_keras.config import ConfigError, InputConfig, ModelConfig


@pytest.mark.parametrize(
    "changes, field, fragment",
    [
        ({"width": 0}, "width", "an int >= 1"),
        ({"width": 2.0}, "width", "an int >= 1"),
        ({"stem_kernel": True}, "stem_kernel", "an int >= 1"),
        ({"channels_3d": -1}, "channels_3d", "an int >= 1"),
        ({"norm_groups": 0}, "norm_groups", "an int >= 1"),
        ({"blocks_per_stage": (2, 2, 2)}, "blocks_per_stage", "4 positive ints"),
        ({"blocks_per_stage": (2, 2, 0, 2)}, "blocks_per_stage", "4 positive ints"),
        ({"blocks_per_stage": ("2", 2, 2, 2)}, "blocks_per_stage", "4 positive ints"),
        ({"dropout": 1.0}, "dropout", "[0, 1)"),
        ({"dropout": float("nan")}, "dropout", "[0, 1)"),
        ({"slice_mode": "loop"}, "slice_mode", "one of ('fold', 'time_distributed')"),
        ({"remat_chunk": -1}, "remat_chunk", "an int >= 0"),
        ({"remat_chunk": 2, "slice_mode": "time_distributed"}, "remat_chunk", "slice_mode"),
        ({"dtype_policy": "float16"}, "dtype_policy", "mixed_float16"),
        ({"init": "orthogonal"}, "init", "he_zero_residual"),
        ({"norm": "batch"}, "norm", "group"),
    ],
)
def test_model_config_names_the_bad_field_and_value(changes, field, fragment):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**changes)
    assert e.value.field == field and fragment in str(e.value)
    assert f"Received: {field}={changes[field]!r}" in str(e.value)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"input_variant": "t4"}, "input_variant"),
        ({"normalization": "minmax"}, "normalization"),
        ({"percentiles": (99.0, 1.0)}, "percentiles"),
        ({"percentiles": (-1.0, 50.0)}, "percentiles"),
        ({"percentiles": (1.0, 2.0, 3.0)}, "percentiles"),
        ({"percentiles": ("a", "b")}, "percentiles"),
        ({"flip": 1}, "flip"),
        ({"crop": 1.5}, "crop"),
        ({"crop": "abc"}, "crop"),
        ({"crop": (0, 4)}, "crop"),
        ({"crop_slices": -1}, "crop_slices"),
        ({"shuffle_buffer": -1}, "shuffle_buffer"),
    ],
)
def test_input_config_names_the_bad_field_and_value(changes, field):
    with pytest.raises(ConfigError, match=f"^{field} must be .* Received: {field}=") as e:
        InputConfig(**changes)
    assert e.value.field == field


def test_configs_hold_one_parsed_form():
    # The form a value arrives in (flags, a search space, a config.json) does not matter.
    assert InputConfig(crop=96).crop == (96, 96)
    assert InputConfig(crop=[64, 48]).crop == (64, 48)
    assert InputConfig(crop=1).crop == (1, 1)  # An int is a size; a fraction is a float.
    assert InputConfig(crop=1.0).crop == 1.0 and isinstance(InputConfig(crop=1.0).crop, float)
    assert InputConfig(percentiles=[1, 99]).percentiles == (1.0, 99.0)
    assert InputConfig(input_variant="t2sub").input_variant == "t2-t0"
    assert ModelConfig(blocks_per_stage=[1, 2, 2, 1]).blocks_per_stage == (1, 2, 2, 1)
    # What config.json holds comes back as the same config.
    for config in (InputConfig(crop=(64, 48), percentiles=(1.0, 99.0)), InputConfig(crop=0.75)):
        saved = json.loads(json.dumps(dataclasses.asdict(config)))
        assert InputConfig(**saved) == config
    model = ModelConfig(blocks_per_stage=(1, 1, 2, 1), norm="group")
    assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(model)))) == model


def test_config_error_survives_pickling():
    # A trial's error crosses a process boundary with isolate_trials.
    error = pickle.loads(pickle.dumps(ConfigError("crop", "a fraction", 1.5, {"x": 1})))
    assert (error.field, error.requirement, error.value, error.others) == (
        "crop",
        "a fraction",
        1.5,
        {"x": 1},
    )
    assert str(error) == "crop must be a fraction. Received: crop=1.5, x=1"
    assert isinstance(error, ValueError) and isinstance(error, config_lib.ConfigError)
