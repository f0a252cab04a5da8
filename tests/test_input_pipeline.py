"""The tf.data input pipeline: records in, one preprocessed (and augmented) exam per batch out."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mri_keras import constants, input_pipeline
from mri_keras.config import InputConfig
from tfrecords_tools import schema

LB, LM, RB, RM = range(4)  # Index of each label in constants.LABELS.


def _volumes(rng, shape, phases=schema.PHASES):
    """Phases with distinct, left-right asymmetric, integer-valued contents."""
    base = rng.integers(0, 1000, size=shape).astype(np.float32)
    return {p: base * (k + 1) + 37.0 * k for k, p in enumerate(phases)}


def _exam(i, shape=(3, 6, 8), labels=None, seed=None, phases=schema.PHASES):
    rng = np.random.default_rng(i if seed is None else seed)
    if labels is None:
        labels = [int(v) for v in np.unpackbits(np.uint8(i % 16))[-4:]]
    return dict(
        exam_id=f"exam{i:03d}",
        patient_id=f"pat{i // 2:03d}",
        volumes=_volumes(rng, shape, phases),
        labels=labels,
    )


def write_records(
    directory,
    exams,
    split="train",
    num_shards=1,
    phases=schema.PHASES,
    version=schema.SCHEMA_VERSION,
    records=None,
):
    """Writes exams as shards plus a manifest.json per the converter's contract."""
    os.makedirs(directory, exist_ok=True)
    names = [
        schema.SHARD_PATTERN.format(split=split, index=i, count=num_shards)
        for i in range(num_shards)
    ]
    writers = [tf.io.TFRecordWriter(os.path.join(directory, n)) for n in names]
    for i, exam in enumerate(exams):
        record = (
            records[i]
            if records
            else schema.encode_example(
                exam["exam_id"],
                exam["patient_id"],
                exam["volumes"],
                (3.0, 1.0, 1.0),
                exam["labels"],
            )
        )
        writers[i % num_shards].write(record)
    for w in writers:
        w.close()
    manifest = {
        "schema_version": version,
        "phases": list(phases),
        "labels": list(schema.LABELS),
        "splits": {
            split: {
                "shards": names,
                "num_exams": len(exams),
                "num_patients": len({e["patient_id"] for e in exams}),
                "exams": [
                    {
                        "exam_id": e["exam_id"],
                        "patient_id": e["patient_id"],
                        "labels": list(e["labels"]),
                        "shape": list(np.shape(e["volumes"][phases[0]])),
                    }
                    for e in exams
                ],
                "label_counts": {
                    name: sum(e["labels"][k] for e in exams) for k, name in enumerate(schema.LABELS)
                },
            }
        },
    }
    with open(os.path.join(directory, schema.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    return directory


def _zscore(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / x.std()


def _collect(ds):
    """(volumes (S,H,W), labels (4,) ints, exam ids) from a with_ids dataset."""
    out = []
    for volume, targets, ids in ds:
        assert volume.shape[0] == 1 and volume.shape[-1] == 1
        labels = np.array([targets[name].numpy()[0, 1] for name in constants.LABELS])
        out.append((volume.numpy()[0, ..., 0], labels.astype(int), ids["exam_id"].numpy()[0]))
    return out


NO_AUG = InputConfig(input_variant="t2-t0", flip=False)


# -- preprocess ------------------------------------------------------------------------------


def test_labels_to_targets_one_hot_per_head():
    targets = input_pipeline.labels_to_targets(tf.constant([1, 0, 0, 1], tf.int64))
    assert list(targets) == list(constants.LABELS)
    expected = {
        "left_benign": [0.0, 1.0],
        "left_malignant": [1.0, 0.0],
        "right_benign": [1.0, 0.0],
        "right_malignant": [0.0, 1.0],
    }
    for name, value in expected.items():
        assert targets[name].dtype == tf.float32
        np.testing.assert_array_equal(targets[name].numpy(), value)


@pytest.mark.parametrize("variant", constants.INPUT_VARIANTS + ("t2sub",))
def test_input_variant_computes_what_its_name_says(variant):
    # uint16 as a serving client might send: subtraction must not wrap around.
    rng = np.random.default_rng(0)
    phases = {p: rng.integers(0, 4000, size=(2, 3, 4)).astype(np.uint16) for p in schema.PHASES}
    as_float = {p: v.astype(np.float32) for p, v in phases.items()}
    expected = {
        "t0": as_float["t0"],
        "t1": as_float["t1"],
        "t2": as_float["t2"],
        "t3": as_float["t3"],
        "t1-t0": as_float["t1"] - as_float["t0"],
        "t2-t0": as_float["t2"] - as_float["t0"],
        "t3-t0": as_float["t3"] - as_float["t0"],
        "t2sub": as_float["t2"] - as_float["t0"],
    }[variant]
    got = input_pipeline.input_image({p: tf.constant(v) for p, v in phases.items()}, variant)
    assert got.dtype == tf.float32 and got.shape == (2, 3, 4, 1)  # One channel.
    np.testing.assert_array_equal(got.numpy()[..., 0], expected)
    if "-" in constants.canonical_input(variant):
        assert (got.numpy() < 0).any()


def test_input_variant_missing_phase_is_named():
    with pytest.raises(ValueError, match=r"'t3-t0'.*missing \['t3'\]"):
        input_pipeline.input_image({"t0": tf.zeros([1, 1, 1])}, "t3sub")


def test_zscore_normalisation():
    rng = np.random.default_rng(1)
    phases = {"t0": rng.normal(100, 5, (3, 7, 5)), "t2": rng.normal(300, 40, (3, 7, 5))}
    out = input_pipeline.preprocess(
        {p: tf.constant(v, tf.float32) for p, v in phases.items()}, InputConfig("t2-t0")
    ).numpy()
    assert out.shape == (3, 7, 5, 1) and out.dtype == np.float32
    expected = _zscore(phases["t2"].astype(np.float32) - phases["t0"].astype(np.float32))
    np.testing.assert_allclose(out[..., 0], expected, rtol=1e-5, atol=1e-5)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-5
    constant = input_pipeline.preprocess({"t1": tf.fill([2, 3, 3], 7.0)}, InputConfig("t1"))
    np.testing.assert_array_equal(constant.numpy(), np.zeros((2, 3, 3, 1)))


@pytest.mark.parametrize(
    "shape, percentiles",
    [
        ((3, 7, 5), (0.5, 99.5)),
        ((4, 9, 11), (2.0, 98.0)),
        ((1, 1, 5), (0.0, 100.0)),
        ((2, 5, 6), (10.0, 10.0)),
        ((5, 13, 7), (25.0, 60.0)),
    ],
)
def test_percentile_normalisation(shape, percentiles):
    rng = np.random.default_rng(2)
    x = rng.standard_cauchy(shape).astype(np.float32) * 100  # Heavy tails: clipping matters.
    low, high = np.percentile(x.astype(np.float64), percentiles)
    lo, hi = input_pipeline.percentile(tf.constant(x), *percentiles)
    np.testing.assert_allclose([lo.numpy(), hi.numpy()], [low, high], rtol=1e-5, atol=1e-4)
    config = InputConfig("t0", normalization="percentile", percentiles=percentiles)
    out = input_pipeline.preprocess({"t0": tf.constant(x)}, config).numpy()[..., 0]
    if high > low:
        expected = (np.clip(x, low, high) - low) / (high - low)
    else:
        expected = np.zeros_like(x)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_preprocess_in_tf_function_with_unknown_shapes():
    config = InputConfig("t1-t0")
    spec = tf.TensorSpec([None, None, None], tf.float32)

    @tf.function(input_signature=[{"t0": spec, "t1": spec}])
    def serve(phases):
        return input_pipeline.preprocess(phases, config)

    for shape in [(2, 5, 7), (6, 3, 4)]:
        rng = np.random.default_rng(sum(shape))
        phases = {p: rng.normal(size=shape).astype(np.float32) for p in ("t0", "t1")}
        eager = input_pipeline.preprocess(phases, config).numpy()
        np.testing.assert_array_equal(serve(phases).numpy(), eager)
        assert eager.shape == shape + (1,)


# -- augmentation ------------------------------------------------------------------------------


def test_mirrored_label_order_swaps_sides():
    names = [constants.LABELS[i] for i in input_pipeline.MIRRORED_LABEL_ORDER]
    assert names == ["right_benign", "right_malignant", "left_benign", "left_malignant"]


def test_flip_mirrors_pixels_and_swaps_labels_exactly(tmp_path):
    exams = [_exam(i, labels=[1, 0, 0, 1] if i % 2 else [0, 1, 0, 0]) for i in range(12)]
    d = write_records(tmp_path / "rec", exams, num_shards=2)
    plain = {
        e: (v, y)
        for v, y, e in _collect(
            input_pipeline.make_dataset(d, "train", NO_AUG, training=False, with_ids=True)
        )
    }
    config = dataclasses.replace(NO_AUG, flip=True)
    flipped = untouched = 0
    for _ in range(2):  # Two passes: the flips are re-drawn, so each exam likely meets both.
        for volume, labels, exam_id in _collect(
            input_pipeline.make_dataset(d, "train", config, training=True, with_ids=True)
        ):
            ref_volume, ref_labels = plain[exam_id]
            if np.array_equal(volume, ref_volume):
                untouched += 1
                np.testing.assert_array_equal(labels, ref_labels)
            else:
                flipped += 1
                np.testing.assert_array_equal(volume, ref_volume[:, :, ::-1])
                np.testing.assert_array_equal(labels, ref_labels[[RB, RM, LB, LM]])
    assert flipped and untouched, (flipped, untouched)


def test_augment_flip_on_a_known_volume():
    volume = tf.reshape(tf.range(2 * 2 * 3, dtype=tf.float32), [2, 2, 3, 1])
    labels = tf.constant([1, 1, 0, 0], tf.int64)
    config = InputConfig("t0", flip=True)
    outcomes = set()
    for s in range(20):
        out, out_labels = input_pipeline.augment(volume, labels, tf.constant([s, 0]), config)
        if out_labels.numpy().tolist() == [0, 0, 1, 1]:
            np.testing.assert_array_equal(out.numpy()[0, :, :, 0], [[2, 1, 0], [5, 4, 3]])
            outcomes.add("flip")
        else:
            assert out_labels.numpy().tolist() == [1, 1, 0, 0]
            np.testing.assert_array_equal(out.numpy(), volume.numpy())
            outcomes.add("keep")
    assert outcomes == {"flip", "keep"}


@pytest.mark.parametrize(
    "crop, crop_slices, expected_shape",
    [
        ((3, 4), 0, (5, 3, 4)),
        (0.5, 0, (5, 4, 5)),  # round(0.5*8)=4, round(0.5*10)=5
        ((100, 6), 0, (5, 8, 6)),  # Larger than the volume: that side is kept whole.
        (None, 3, (3, 8, 10)),
        (None, 32, (5, 8, 10)),
        ((2, 2), 2, (2, 2, 2)),
    ],
)
def test_crops_stay_inside_and_have_the_requested_size(crop, crop_slices, expected_shape):
    shape = (5, 8, 10)
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape + (1,))
    config = InputConfig("t0", flip=False, crop=crop, crop_slices=crop_slices)
    offsets = set()
    for s in range(16):
        out = input_pipeline.augment(
            tf.constant(volume), tf.constant([0, 0, 0, 0], tf.int64), tf.constant([s, 7]), config
        )[0].numpy()
        assert out.shape == expected_shape + (1,)
        # A crop is a window of the volume: its first voxel says where, the rest must match.
        s0, r0, c0 = np.unravel_index(int(out[0, 0, 0, 0]), shape)
        assert s0 + out.shape[0] <= shape[0] and r0 + out.shape[1] <= shape[1]
        assert c0 + out.shape[2] <= shape[2]
        np.testing.assert_array_equal(
            out, volume[s0 : s0 + out.shape[0], r0 : r0 + out.shape[1], c0 : c0 + out.shape[2]]
        )
        offsets.add((s0, r0, c0))
    if expected_shape != shape:
        assert len(offsets) > 1, "the crop window never moves"


def test_bad_crop_is_rejected():
    for crop in [0.0, 1.5, (3,), (0, 4), (2.5, 3), "96", True, -2]:
        with pytest.raises(ValueError, match="crop"):
            InputConfig(crop=crop)


@pytest.mark.parametrize(
    "crop, spec",
    [(None, None), (0.5, ("fraction", 0.5)), (1, ("size", (1, 1))), ([3, 4], ("size", (3, 4)))],
)
def test_crop_spec_reads_the_parsed_crop(crop, spec):
    assert input_pipeline.crop_spec(InputConfig(crop=crop).crop) == spec


def test_same_seed_same_stream_different_seed_different(tmp_path):
    exams = [_exam(i) for i in range(8)]
    d = write_records(tmp_path / "rec", exams, num_shards=3)

    def stream(seed):
        config = InputConfig("t2-t0", crop=(4, 5), crop_slices=2)
        return _collect(
            input_pipeline.make_dataset(
                d, "train", config, training=True, with_ids=True, repeat=True, seed=seed
            ).take(16)
        )

    a, b, c = stream(3), stream(3), stream(4)
    assert len(a) == 16
    for (va, ya, ea), (vb, yb, eb) in zip(a, b):
        assert ea == eb
        np.testing.assert_array_equal(va, vb)
        np.testing.assert_array_equal(ya, yb)
    assert [e for *_, e in a] != [e for *_, e in c] or any(
        not np.array_equal(x[0], y[0]) for x, y in zip(a, c)
    )
    # Each epoch of a repeated stream is reshuffled and re-augmented.
    first, second = a[:8], a[8:]
    assert (
        sorted(e for *_, e in first)
        == sorted(e for *_, e in second)
        == sorted(e["exam_id"].encode() for e in exams)
    )
    by_id = {e: v for v, _, e in first}
    assert any(not np.array_equal(v, by_id[e]) for v, _, e in second)


# -- make_dataset ------------------------------------------------------------------------------


def test_eval_dataset_values_ids_and_order(tmp_path):
    exams = [_exam(i) for i in range(5)]
    d = write_records(tmp_path / "rec", exams, num_shards=1)
    ds = input_pipeline.make_dataset(d, "train", NO_AUG, training=False, with_ids=True)
    volume_spec, targets_spec, ids_spec = ds.element_spec
    assert volume_spec.shape.as_list() == [1, None, None, None, 1]
    assert set(targets_spec) == set(constants.LABELS)
    assert ids_spec["exam_id"].shape.as_list() == [1] and ids_spec["exam_id"].dtype == tf.string
    got = list(ds)
    assert [g[2]["exam_id"].numpy()[0].decode() for g in got] == [e["exam_id"] for e in exams]
    for (volume, targets, ids), exam in zip(got, exams):
        assert ids["patient_id"].numpy()[0].decode() == exam["patient_id"]
        v = exam["volumes"]
        np.testing.assert_allclose(
            volume.numpy()[0, ..., 0], _zscore(v["t2"] - v["t0"]), rtol=1e-5, atol=1e-5
        )
        for k, name in enumerate(constants.LABELS):
            y = exam["labels"][k]
            np.testing.assert_array_equal(targets[name].numpy(), [[1 - y, y]])
    two = input_pipeline.make_dataset(d, "train", NO_AUG, training=False)
    assert len(two.element_spec) == 2


def test_shapes_vary_per_exam_without_padding(tmp_path):
    shapes = [(3, 8, 10), (5, 6, 7), (2, 9, 4)]
    exams = [_exam(i, shape=s) for i, s in enumerate(shapes)]
    d = write_records(tmp_path / "rec", exams)
    ds = input_pipeline.make_dataset(d, "train", NO_AUG, training=False)
    assert [tuple(v.shape) for v, _ in ds] == [(1,) + s + (1,) for s in shapes]


def test_exam_ids_filter(tmp_path):
    exams = [_exam(i) for i in range(10)]
    d = write_records(tmp_path / "rec", exams, num_shards=3)
    keep = ["exam001", "exam004", "exam009"]
    ds = input_pipeline.make_dataset(  # Ids as bytes (e.g. from a dataset) work too.
        d, "train", NO_AUG, training=False, exam_ids=[k.encode() for k in keep], with_ids=True
    )
    assert [e.decode() for *_, e in _collect(ds)] == keep
    for training in (False, True):
        ds = input_pipeline.make_dataset(
            d, "train", NO_AUG, training=training, exam_ids=keep, with_ids=True
        )
        assert sorted(e.decode() for *_, e in _collect(ds)) == keep
    with pytest.raises(ValueError, match=r"not in split 'train'.*exam077"):
        input_pipeline.make_dataset(d, "train", NO_AUG, training=False, exam_ids=["exam077"])
    with pytest.raises(ValueError, match="empty"):
        input_pipeline.make_dataset(d, "train", NO_AUG, training=False, exam_ids=[])


@pytest.mark.parametrize("num_shards", [4, 1])  # By file, then by record.
@pytest.mark.parametrize("training", [False, True])
def test_input_context_splits_exams_between_pipelines(tmp_path, num_shards, training):
    exams = [_exam(i) for i in range(9)]
    d = write_records(tmp_path / "rec", exams, num_shards=num_shards)
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2
        )
        ds = input_pipeline.make_dataset(
            d, "train", NO_AUG, training=training, input_context=context, with_ids=True
        )
        ids = [e.decode() for *_, e in _collect(ds)]
        assert ids, f"pipeline {pipeline} got no exam"
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [e["exam_id"] for e in exams]


# -- errors ------------------------------------------------------------------------------------


def test_manifest_schema_version_error(tmp_path):
    d = write_records(tmp_path / "rec", [_exam(0)], version=schema.SCHEMA_VERSION + 1)
    with pytest.raises(ValueError, match="schema version"):
        input_pipeline.make_dataset(d, "train", NO_AUG, training=False)


def test_record_schema_version_error_names_the_file(tmp_path):
    exam = _exam(0)
    example = tf.train.Example.FromString(
        schema.encode_example(
            exam["exam_id"], exam["patient_id"], exam["volumes"], (1, 1, 1), exam["labels"]
        )
    )
    example.features.feature[schema.KEY_SCHEMA_VERSION].int64_list.value[0] = 99
    d = write_records(tmp_path / "rec", [exam], records=[example.SerializeToString()])
    ds = input_pipeline.make_dataset(d, "train", NO_AUG, training=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)schema version.*train-00000"):
        list(ds)


def test_missing_phase_error_names_variant_phases_and_directory(tmp_path):
    exam = _exam(0, phases=("t0", "t1", "t2"))
    d = write_records(tmp_path / "rec", [exam], phases=("t0", "t1", "t2"))
    input_pipeline.make_dataset(d, "train", InputConfig("t2sub"), training=False)
    with pytest.raises(ValueError, match=r"'t3-t0'.*lack \['t3'\]") as info:
        input_pipeline.make_dataset(d, "train", InputConfig("t3sub"), training=False)
    assert str(d) in str(info.value)


def test_split_errors(tmp_path):
    d = write_records(tmp_path / "rec", [_exam(0)])
    with pytest.raises(ValueError, match=r"'val' is not in"):
        input_pipeline.make_dataset(d, "val", NO_AUG, training=False)
    with pytest.raises(FileNotFoundError, match="nothing' does not exist"):
        input_pipeline.make_dataset(tmp_path / "nothing", "train", NO_AUG, training=False)
    os.makedirs(tmp_path / "stray")
    open(tmp_path / "stray" / "notes.txt", "w").close()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        input_pipeline.make_dataset(tmp_path / "stray", "train", NO_AUG, training=False)
    manifest_path = os.path.join(d, schema.MANIFEST_NAME)
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["splits"]["train"]["shards"].append("train-00009-of-00010.tfrecord")
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(FileNotFoundError, match="train-00009-of-00010"):
        input_pipeline.make_dataset(d, "train", NO_AUG, training=False)
    manifest["splits"]["train"]["shards"] = []
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match="no shard files"):
        input_pipeline.make_dataset(d, "train", NO_AUG, training=False)


_DISTRIBUTED_CHECK = r"""
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from mri_keras import input_pipeline
from mri_keras.config import InputConfig

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
config = InputConfig("t2-t0", flip=True, crop=(4, 5))
dist = strategy.distribute_datasets_from_function(
    lambda ctx: input_pipeline.make_dataset(
        sys.argv[1], "train", config, training=True, input_context=ctx, with_ids=True))
for volume, targets, ids in dist:
    for v, e, y in zip(strategy.experimental_local_results(volume),
                       strategy.experimental_local_results(ids["exam_id"]),
                       strategy.experimental_local_results(targets["left_benign"])):
        print(e.numpy()[0].decode(), *v.shape, *y.shape)
"""


def test_distribute_datasets_from_function_gives_each_replica_whole_exams(tmp_path):
    import subprocess
    import sys

    shapes = [(3, 8, 10), (5, 6, 7), (2, 9, 6), (4, 5, 5)]
    exams = [_exam(i, shape=s) for i, s in enumerate(shapes)]
    d = write_records(tmp_path / "rec", exams, num_shards=2)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", _DISTRIBUTED_CHECK, str(d)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert sorted(r[0] for r in rows) == [e["exam_id"] for e in exams]
    for exam_id, *dims in rows:
        s = shapes[int(exam_id[4:])]
        # One whole exam per replica: batch 1, all its slices, crop (4, 5) inside it.
        assert [int(v) for v in dims] == [1, s[0], min(4, s[1]), min(5, s[2]), 1, 1, 2]
