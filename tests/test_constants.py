"""The two sides of the record contract name labels and phases identically."""

import pytest

from mri_keras import config, constants
from tfrecords_tools import schema


def test_labels_and_phases_agree_with_schema():
    assert constants.LABELS == schema.LABELS
    assert constants.PHASES == schema.PHASES
    assert constants.LABELS == tuple(
        f"{side}_{task}" for side in constants.SIDES for task in constants.TASKS
    )


@pytest.mark.parametrize(
    "name, canonical, phases",
    [
        ("t0", "t0", ("t0",)),
        ("t3", "t3", ("t3",)),
        ("t2sub", "t2-t0", ("t0", "t2")),
        ("t1-t0", "t1-t0", ("t0", "t1")),
        ("t3sub", "t3-t0", ("t0", "t3")),
    ],
)
def test_input_variants(name, canonical, phases):
    assert constants.canonical_input(name) == canonical
    assert constants.phases_needed(name) == phases


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="t4"):
        constants.canonical_input("t4")
    with pytest.raises(ValueError, match="normalization"):
        config.InputConfig(normalization="minmax")


def test_schema_round_trip_and_validation():
    import numpy as np

    vol = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    blob = schema.encode_example("e1", "p1", {"t0": vol, "t2": vol * 2}, (3.0, 1.0, 1.0), [0, 1, 0, 0])
    out = schema.decode_example_numpy(blob)
    assert out["phases"] == ("t0", "t2")
    np.testing.assert_array_equal(out["t2"], vol * 2)
    assert out["labels"].tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="one grid"):
        schema.encode_example("e", "p", {"t0": vol, "t1": vol[:1]}, (1, 1, 1), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="labels"):
        schema.encode_example("e", "p", {"t0": vol}, (1, 1, 1), [0, 2, 0, 0])
