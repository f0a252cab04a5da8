"""Distributed training through the real entry point, each run in its own process (logical CPU
devices and multi-worker collectives are configured once per process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import train_fixtures

from mri_keras import config as config_lib
from mri_keras import input_pipeline, run_dir
from mri_keras import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = list(train_fixtures.TINY_FLAGS)
MODEL_CONFIG = config_lib.ModelConfig(
    width=4, blocks_per_stage=(1, 1, 1, 1), channels_3d=8, stem_kernel=3
)
# Prints the history's final-weights fingerprint after training through the entry point.
_RUN = (
    "import sys; from mri_keras import train; "
    "h = train.run(sys.argv[1:]); print('FINGERPRINT', h['weights_fingerprint'])"
)


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _fingerprint(stdout):
    lines = [l for l in stdout.splitlines() if l.startswith("FINGERPRINT ")]
    assert len(lines) == 1, stdout[-2000:]
    return lines[0].split()[1]


def test_two_mirrored_replicas_equal_one_replica_averaging_gradients(tmp_path):
    # Two training exams of different shapes (4x32x32 and 6x32x34): one step of two replicas.
    data_dir = str(tmp_path / "records")
    train_fixtures.write_records(data_dir, {"train": 2, "val": 2})
    keras.utils.set_random_seed(7)
    init = model_lib.build_model(MODEL_CONFIG)
    init_path = str(tmp_path / "init.weights.h5")
    init.save_weights(init_path)

    model_dir = str(tmp_path / "run")
    argv = [
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        *TINY,
        "--epochs=1",
        "--flip=false",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        f"--init_weights={init_path}",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, *argv],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MirroredStrategy, 2 replica(s) in sync" in proc.stdout
    assert "1 epochs x 1 steps (2 exam(s) per step)" in proc.stdout

    # Reference: one replica, gradients of both exams averaged, one Adam step.
    model = model_lib.build_model(MODEL_CONFIG)
    model.load_weights(init_path)
    dataset = input_pipeline.make_dataset(data_dir, "train", config_lib.InputConfig(), False)
    grads = []
    for volume, targets in dataset:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model_lib.compute_loss(targets, model(volume, training=True)))
        grads.append(tape.gradient(loss, model.trainable_variables))
    assert len(grads) == 2
    assert grads[0][0] is not None
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    optimizer.apply_gradients(
        zip([(a + b) / 2.0 for a, b in zip(*grads)], model.trainable_variables)
    )

    trained = model_lib.build_model(MODEL_CONFIG)
    trained.load_weights(os.path.join(model_dir, "best.keras"))
    moved = 0.0
    for ref, got, start in zip(model.get_weights(), trained.get_weights(), init.get_weights()):
        # Tolerance: float32 sums of per-replica gradients in another order, through Adam's
        # first step (~lr * sign(g)), stay far below one step (1e-3).
        np.testing.assert_allclose(got, ref, atol=2e-6)
        moved = max(moved, float(np.abs(got - start).max()))
    assert moved > 5e-4  # The step did move the weights.


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_two_processes_agree_on_weights(tmp_path):
    data_dir = str(tmp_path / "records")
    train_fixtures.write_records(data_dir, {"train": 4, "val": 2})
    model_dir = str(tmp_path / "run")
    argv = [
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        *TINY,
        "--epochs=1",
        "--strategy=multi_worker",
    ]
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _RUN, *argv],
                cwd=REPO,
                env=_env(TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "MultiWorkerMirroredStrategy, 2 replica(s) in sync" in outputs[0]
    assert "1 epochs x 2 steps" in outputs[0]
    assert "mri_keras training" not in outputs[1]  # Only the chief reports.
    assert _fingerprint(outputs[0]) == _fingerprint(outputs[1])
    # The chief wrote the run; the other worker left nothing behind in it.
    assert sorted(os.listdir(model_dir)) == sorted(run_dir.RUN_FILES)
    rows = run_dir.read_metrics_csv(os.path.join(model_dir, "metrics.csv"))
    assert [r["epoch"] for r in rows] == [1]
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")).endswith("ckpt-1")


def test_multi_worker_without_tf_config_is_a_clear_error(tmp_path):
    data_dir = str(tmp_path / "records")
    train_fixtures.write_records(data_dir, {"train": 2, "val": 2})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mri_keras.train",
            f"--data_dir={data_dir}",
            f"--model_dir={tmp_path / 'run'}",
            "--strategy=multi_worker",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "TF_CONFIG" in proc.stderr and "mri_keras.train: error:" in proc.stderr


def test_fewer_training_exams_than_replicas_is_a_clear_error(tmp_path):
    data_dir = str(tmp_path / "records")
    train_fixtures.write_records(data_dir, {"train": 1, "val": 2})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mri_keras.train",
            f"--data_dir={data_dir}",
            f"--model_dir={tmp_path / 'run'}",
            "--strategy=mirrored",
            "--cpu_replicas=2",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "1 training exam(s) for 2 replicas" in proc.stderr
    assert not os.path.exists(tmp_path / "run")
