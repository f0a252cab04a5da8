"""The device path (stored phases in tf.data, per-voxel work in keras.ops) gives the CPU path's
numbers, on every input variant, stored dtype and normalisation, with and without augmentation."""

import bench_scripts
import numpy as np
import pytest
import tensorflow as tf
import train_fixtures
from test_input_pipeline import write_records

from mri_keras import constants, input_pipeline, preprocessing, train
from mri_keras.config import InputConfig
from tfrecords_tools import schema


def _exams():
    """Three exams of different shapes, one per stored dtype, with non-trivial rescales."""
    rng = np.random.default_rng(7)
    out = []
    specs = [
        ("int16", (3, 10, 12), (1.6875, -16.0), lambda s: rng.integers(-900, 3000, s)),
        ("uint16", (4, 8, 10), (0.5, 3.0), lambda s: rng.integers(0, 65535, s)),
        ("float32", (2, 12, 9), (1.0, 0.0), lambda s: rng.normal(200.0, 80.0, s)),
        ("int16", (3, 9, 11), (0.1, -1024.0), lambda s: rng.integers(0, 4000, s)),
    ]
    for i, (dtype, shape, rescale, draw) in enumerate(specs):
        base = draw(shape)
        volumes = {
            p: (base * (k + 1) // 2 + 11 * k if dtype != "float32" else base * (k + 1) + k)
            .clip(*((0, 65535) if dtype == "uint16" else (-32768, 32767)))
            .astype(dtype)
            for k, p in enumerate(schema.PHASES)
        }
        labels = [1, 0, 0, 1] if i % 2 else [0, 1, 1, 1]
        exam = dict(exam_id=f"exam{i}", patient_id=f"pat{i}", volumes=volumes, labels=labels)
        exam["record"] = schema.encode_example(
            exam["exam_id"],
            exam["patient_id"],
            volumes,
            (3.0, 1.0, 1.0),
            labels,
            {p: rescale for p in schema.PHASES},
        )
        out.append(exam)
    return out


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    exams = _exams()
    directory = str(tmp_path_factory.mktemp("records"))
    return write_records(directory, exams, num_shards=2, records=[e["record"] for e in exams])


def _both(records_dir, config, training, seed=3):
    """[(cpu volume, device volume, cpu labels, device labels)] per exam of one epoch."""
    kwargs = dict(training=training, seed=seed)
    cpu = input_pipeline.make_dataset(records_dir, "train", config, **kwargs)
    device = input_pipeline.make_dataset(
        records_dir, "train", config, preprocess_on="device", **kwargs
    )
    step = tf.function(lambda batch: preprocessing.preprocess_batch(batch, config))
    out = []
    for (volume, targets), (stored, device_targets) in zip(cpu, device, strict=True):
        labels = [int(targets[k][0, 1]) for k in constants.LABELS]
        device_labels = [int(device_targets[k][0, 1]) for k in constants.LABELS]
        out.append((volume.numpy(), step(stored).numpy(), labels, device_labels))
    return out


AUGMENTED = dict(flip=True, crop=0.75, crop_slices=2)


@pytest.mark.parametrize(
    "variant, normalization, augment",
    [(v, "zscore", False) for v in constants.INPUT_VARIANTS]
    + [(v, "zscore", True) for v in ("t0", "t2-t0", "t3-t0")]
    + [("t2-t0", "percentile", False), ("t1", "percentile", True)]
    # Several variants stacked as channels, each normalised on its own.
    + [("t0,t1,t2", "zscore", True), ("t1sub,t2sub,t3sub", "percentile", False)],
)
def test_device_path_matches_cpu_path(records_dir, variant, normalization, augment):
    config = InputConfig(
        input_variant=variant,
        normalization=normalization,
        **(AUGMENTED if augment else dict(flip=False)),
    )
    pairs = _both(records_dir, config, training=augment)
    assert len(pairs) == 4
    for cpu, device, labels, device_labels in pairs:
        assert device.shape == cpu.shape and device.dtype == np.float32
        np.testing.assert_allclose(device, cpu, rtol=1e-5, atol=2e-5)
        assert device_labels == labels


def test_device_flip_mirrors_and_swaps_labels_like_the_cpu_path(records_dir):
    config = InputConfig(input_variant="t2-t0", flip=True)
    unflipped = {
        tuple(labels): cpu for cpu, _, labels, _ in _both(records_dir, InputConfig(flip=False), 0)
    }
    flipped = 0
    for seed in range(4):
        for cpu, device, labels, device_labels in _both(records_dir, config, True, seed):
            np.testing.assert_allclose(device, cpu, rtol=1e-5, atol=2e-5)
            assert device_labels == labels
            mirrored = [labels[i] for i in input_pipeline.MIRRORED_LABEL_ORDER]
            for original, volume in unflipped.items():
                if volume.shape == device.shape and np.allclose(volume[:, :, :, ::-1], device):
                    assert list(original) == mirrored  # The labels swapped sides with it.
                    flipped += 1
    assert flipped > 0


def test_uint16_values_above_32767_survive(records_dir):
    """uint16 records travel as int16 bits; the device adds 65536 back."""
    ints = tf.constant([[[-1, 0, 32767, -32768]]], tf.int16)
    empty = tf.zeros([0, 1, 4], tf.float32)
    values = preprocessing.voxel_values(ints, empty, tf.constant([2.0, 1.0, 1.0]))
    np.testing.assert_array_equal(values.numpy(), [[[131071.0, 1.0, 65535.0, 65537.0]]])


def test_make_dataset_refuses_an_unknown_placement(records_dir):
    with pytest.raises(ValueError, match="preprocess_on must be one of"):
        input_pipeline.make_dataset(records_dir, "train", InputConfig(), False, preprocess_on="gpu")


def test_training_on_device_trains_like_training_on_cpu(tmp_path):
    """Same seed, same exams and draws: the device placement gives the CPU run's losses, with
    shape buckets (XLA)."""
    data_dir = str(tmp_path / "records")
    train_fixtures.write_records(data_dir, {"train": 4, "val": 2, "test": 1}, size=16)
    runs = {}
    for name in ("cpu", "device"):
        # With XLA: the step preprocesses, then fits the volume to its bucket, before the
        # compiled pass (the CPU path buckets in tf.data).
        runs[name] = train.run(
            [
                f"--data_dir={data_dir}",
                f"--model_dir={tmp_path / name}",
                *train_fixtures.TINY_FLAGS,
                "--epochs=1",
                "--crop=0.75",
                "--noprogress",
                f"--preprocess_on={name}",
                "--jit_compile",
                "--size_buckets=16",
            ]
        )
    np.testing.assert_allclose(runs["cpu"]["loss"], runs["device"]["loss"], rtol=1e-4)
    np.testing.assert_allclose(runs["cpu"]["val_loss"], runs["device"]["val_loss"], rtol=1e-4)


def test_placement_benchmark_reports_both_paths_and_the_gpu_budget():
    bench = bench_scripts.load("pipeline_bench")
    results = bench.measure_placements(slices=3, height=32, width=32, num_exams=2, repeats=1)
    placements = {r["placement"]: r for r in results if r["benchmark"] == "placement"}
    assert sorted(placements) == ["cpu", "device", "device_on_cpu"]
    # The device stream carries two int16 phases: 2 x 3 x 32 x 32 x 2 bytes per exam.
    assert placements["device"]["to_device_mb_per_exam"] == round(2 * 3 * 32 * 32 * 2 / 1e6, 2)
    budget = results[-1]
    assert budget["benchmark"] == "gpu_budget" and budget["step_tflop"] > 0
    assert budget["cores_per_gpu_device"] > 0 and budget["read_gb_per_s"] > 0


def test_preprocess_on_setting_is_checked_and_auto_resolves_by_hardware():
    from mri_keras import config as config_lib
    from mri_keras import train_lib

    with pytest.raises(config_lib.ConfigError, match="preprocess_on must be one of"):
        train_lib.TrainConfig(data_dir="d", model_dir="m", preprocess_on="gpu")
    assert train_lib.resolve_preprocess_on("device") == "device"
    expected = "device" if tf.config.list_physical_devices("GPU") else "cpu"
    assert train_lib.resolve_preprocess_on("auto") == expected


def test_validation_on_device_scores_like_validation_on_cpu(records_dir):
    from mri_keras import model as model_lib
    from mri_keras import validation
    from mri_keras.config import ModelConfig

    model = model_lib.build_model(
        ModelConfig(width=4, blocks_per_stage=(1, 1, 1, 1), channels_3d=8, stem_kernel=3)
    )
    config = InputConfig(input_variant="t2-t0")
    scored = {}
    for on in ("cpu", "device"):
        ds = validation.validation_dataset(records_dir, "train", config, preprocess_on=on)
        scored[on] = validation.predict_split(model, records_dir, "train", config, dataset=ds)
    assert scored["cpu"].exam_ids == scored["device"].exam_ids
    np.testing.assert_array_equal(scored["cpu"].labels, scored["device"].labels)
    np.testing.assert_allclose(scored["cpu"].probs, scored["device"].probs, rtol=1e-5, atol=1e-6)
