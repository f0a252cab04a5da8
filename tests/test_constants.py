"""The two sides of the record contract name labels and phases identically."""

import pytest

from mri_keras import config, constants
from tfrecords_tools import schema


def test_labels_and_phases_agree_with_schema():
    assert constants.LABELS == schema.LABELS
    assert constants.PHASES == schema.PHASES
    assert constants.SIDES == schema.SIDES
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
    blob = schema.encode_example(
        "e1", "p1", {"t0": vol, "t2": vol * 2}, (3.0, 1.0, 1.0), [0, 1, 0, 0]
    )
    out = schema.decode_example_numpy(blob)
    assert out["phases"] == ("t0", "t2")
    np.testing.assert_array_equal(out["t2"], vol * 2)
    assert out["labels"].tolist() == [0, 1, 0, 0]
    assert out["voxel_dtype"] == "float32"
    with pytest.raises(ValueError, match="one grid"):
        schema.encode_example("e", "p", {"t0": vol, "t1": vol[:1]}, (1, 1, 1), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="labels"):
        schema.encode_example("e", "p", {"t0": vol}, (1, 1, 1), [0, 2, 0, 0])
    with pytest.raises(ValueError, match="one voxel dtype"):
        schema.encode_example(
            "e", "p", {"t0": vol.astype(np.int16), "t1": vol}, (1, 1, 1), [0, 0, 0, 0]
        )
    with pytest.raises(ValueError, match="non-zero slope"):
        schema.encode_example(
            "e", "p", {"t0": vol}, (1, 1, 1), [0, 0, 0, 0], rescale={"t0": (0.0, 1.0)}
        )


@pytest.mark.parametrize("dtype", ["int16", "uint16"])
def test_stored_integers_decode_to_exact_voxel_values(dtype):
    """16-bit stored values + float64 rescale: numpy and TF readers give the same float32."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    stored = {
        p: rng.integers(info.min, info.max, size=(3, 40, 50), endpoint=True).astype(dtype)
        for p in schema.PHASES
    }
    # Decimal DICOM slopes are not float32-exact: the reader must compute in float64.
    # t2, t3: rescales the TF reader computes in float32 (few slope bits, integer intercept).
    rescale = {
        "t0": (1.0, 0.0),
        "t1": (0.0123456789, -1024.0),
        "t2": (1.6875, -1024.0),
        "t3": (2.0**-20 * 255, 7.0),
    }
    blob = schema.encode_example("e", "p", stored, (1, 1, 1), [0, 0, 1, 0], rescale)
    numpy_out = schema.decode_example_numpy(blob)
    tf_out = schema.decode_example(tf.constant(blob), schema.PHASES)
    assert numpy_out["voxel_dtype"] == dtype
    assert len(blob) < sum(v.nbytes for v in stored.values()) + 1000  # 2 bytes per voxel.
    fast = [
        bool(schema._float32_exact(tf.constant(a, tf.float64), tf.constant(b, tf.float64)))
        for a, b in rescale.values()
    ]
    assert fast == [True, False, True, True]
    assert not schema._float32_exact(tf.constant(1.0, tf.float64), tf.constant(0.5, tf.float64))
    for p in schema.PHASES:
        slope, intercept = rescale.get(p, (1.0, 0.0))
        expected = (stored[p].astype(np.float64) * slope + intercept).astype(np.float32)
        np.testing.assert_array_equal(numpy_out[p], expected)
        np.testing.assert_array_equal(tf_out[p].numpy(), expected)
        assert tf_out[p].dtype == tf.float32
