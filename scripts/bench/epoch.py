"""Where a training epoch goes: the bare train step x steps against the epoch's wall time.

For a records directory and training flagfile(s) (default ``configs/demo.flags``), one run:

* ``matmul``: fp32 GFLOP/s of a 2048x2048 matmul (what kind of CPU this is; see BENCHMARKS.md);
* ``bare_step``: median time of the train step (``train_lib._make_train_step``, the loop's own
  step) on one in-memory exam of the records' shape, after warm-up: no input pipeline, no
  validation, no bookkeeping;
* ``epoch`` (one line per epoch and variant): ``python -m mri_keras.train`` for ``--epochs``
  epochs in a child process, from ``metrics.csv``: the epoch's wall time, the time inside the
  train steps (with the input pipeline they wait on), the validation pass and the rest
  (checkpoint, best model, summaries), against steps x bare step;
* ``process``: the child's wall, user and system CPU seconds.

Variants (``--variants``, comma-separated): ``tuned`` (the CLI as shipped: glibc malloc tuned,
``tfrecords_tools.memory.tune_malloc``) and ``default_malloc`` (the same with
``MRI_KERAS_DEFAULT_MALLOC=1``). They run alternately, ``--repeats`` times each.

Usage::

    python scripts/bench/epoch.py --data_dir=RECORDS [--flagfile=configs/demo.flags]
        [--epochs=3] [--variants=tuned,default_malloc] [--repeats=1] [-- extra train flags]

Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = {"tuned": {}, "default_malloc": {"MRI_KERAS_DEFAULT_MALLOC": "1"}}


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _config(flagfiles, extra, data_dir, model_dir):
    from absl import flags as absl_flags

    from mri_keras import flags as flags_lib

    fv = absl_flags.FlagValues()
    flags_lib.define_flags(fv)
    argv = flags_lib.expand_flagfiles(
        [
            "epoch.py",
            *(f"--flagfile={f}" for f in flagfiles),
            *extra,
            f"--data_dir={data_dir}",
            f"--model_dir={model_dir}",
        ]
    )
    fv(argv)
    return flags_lib.train_config_from_flags(fv)


def matmul_gflops() -> float:
    import tensorflow as tf

    a = tf.random.normal((2048, 2048))
    for _ in range(3):
        tf.linalg.matmul(a, a).numpy()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        tf.linalg.matmul(a, a).numpy()
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def bare_step_ms(config, shape, steps: int = 60) -> float:
    """Median ms of the training loop's own step on one in-memory exam of ``shape``."""
    import keras
    import tensorflow as tf

    from mri_keras import constants, schedules, train_lib
    from mri_keras import model as model_lib

    keras.utils.set_random_seed(0)
    model = model_lib.build_model(config.model, config.input.channels)
    optimizer = schedules.make_optimizer(config, 100)
    optimizer.build(model.trainable_variables)
    volume = tf.random.normal((1, *shape, config.input.channels))
    targets = {k: tf.constant([[1.0, 0.0]]) for k in constants.LABELS}
    iterator = iter(tf.data.Dataset.from_tensors((volume, targets)).repeat())
    step = train_lib._make_train_step(model, optimizer, tf.distribute.get_strategy(), False)
    for _ in range(5):
        float(step(iterator))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        float(step(iterator))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run_training(flagfiles, extra, data_dir, epochs, env_extra) -> dict:
    with tempfile.TemporaryDirectory(prefix="epoch_bench_") as tmp:
        model_dir = os.path.join(tmp, "run")
        cmd = [
            sys.executable,
            "-m",
            "mri_keras.train",
            *(f"--flagfile={f}" for f in flagfiles),
            *extra,
            f"--data_dir={data_dir}",
            f"--model_dir={model_dir}",
            f"--epochs={epochs}",
            "--noprogress",
        ]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env_extra)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True)
        wall = time.time() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise RuntimeError(f"training failed:\n{proc.stderr[-3000:]}")
        from mri_keras import run_dir

        rows = run_dir.read_metrics_csv(os.path.join(model_dir, "metrics.csv"))
    return {
        "rows": rows,
        "wall_s": wall,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
    }


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--flagfile", action="append", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", default="tuned,default_malloc")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    flagfiles = [
        os.path.abspath(f)
        for f in (args.flagfile or [os.path.join(_REPO, "configs", "demo.flags")])
    ]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    sys.path.insert(0, _REPO)
    from mri_keras import model as model_lib
    from tfrecords_tools import schema

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(flagfiles, extra, args.data_dir, os.path.join(tmp, "m"))
    manifest = schema.read_manifest(args.data_dir)
    shape = tuple(manifest["splits"]["train"]["exams"][0]["shape"])
    info_steps = manifest["splits"]["train"]["num_exams"]
    _emit(
        {
            "benchmark": "setup",
            "command": "scripts/bench/epoch.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "shape": shape,
            "train_exams": info_steps,
            "val_exams": manifest["splits"]["val"]["num_exams"],
        }
    )
    _emit({"benchmark": "matmul_fp32", "n": 2048, "gflops": round(matmul_gflops(), 1)})
    step_ms = bare_step_ms(config, shape)
    _emit(
        {
            "benchmark": "bare_step",
            "shape": shape,
            "ms": round(step_ms, 2),
            "train_step_gflop": round(3 * model_lib.count_flops(config.model, *shape) / 1e9, 3),
        }
    )
    for repeat in range(args.repeats):
        for variant in variants:
            result = run_training(flagfiles, extra, args.data_dir, args.epochs, VARIANTS[variant])
            for row in result["rows"]:
                ideal = info_steps * step_ms / 1000
                _emit(
                    {
                        "benchmark": "epoch",
                        "variant": variant,
                        "repeat": repeat,
                        "epoch": row["epoch"],
                        "seconds": round(row["seconds"], 2),
                        "train_steps_s": round(row["train_seconds"], 2),
                        "validation_s": round(row["val_seconds"], 2),
                        "other_s": round(
                            row["seconds"] - row["train_seconds"] - row["val_seconds"], 2
                        ),
                        "steps_x_bare_step_s": round(ideal, 2),
                        "epoch_over_bare_steps": round(row["seconds"] / ideal, 2),
                    }
                )
            _emit(
                {
                    "benchmark": "process",
                    "variant": variant,
                    "repeat": repeat,
                    "epochs": args.epochs,
                    "wall_s": round(result["wall_s"], 1),
                    "user_s": round(result["user_s"], 1),
                    "sys_s": round(result["sys_s"], 1),
                }
            )


if __name__ == "__main__":
    main()
