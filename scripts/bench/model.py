"""Model benchmarks (issues 4 and 5): one run prints every figure as JSON lines.

Sections (``--sections``, comma-separated; default all):

* ``matmul``: measured fp32 GFLOP/s of a 2048x2048 matmul in TensorFlow (median of 20).
* ``train_step``: train-step time of a ``--slices x --size x --size`` exam (default 16x224x224)
  at ``--width``, the analytic forward FLOPs (``model.count_flops``), train-step FLOPs taken
  as 3x forward (backward = input gradients + weight gradients, each about one forward), the
  achieved GFLOP/s and its fraction of the matmul figure (target >= 0.75); also the
  ``time_distributed`` slice mode for comparison.
* ``pipeline``: ``scripts/bench/pipeline_bench.measure_pipeline`` at the train-step shape, plus
  a record comparing the pipeline's exams/s with the exams/s the train step consumes
  (target >= 3x) and its MB/s with raw reads (target >= 0.8x).
* ``remat``: step time and memory at ``--remat_slices`` x 448 x 448 with and without
  slice-chunked recomputation (chunk ``--remat_chunk``): activation memory = peak RSS during
  the step minus RSS of the built, compiled model just before it.
* ``precision``: step time with mixed_bfloat16, mixed_float16 and XLA (jit_compile) against
  float32 at the train-step shape.

Every step measurement runs in a fresh subprocess (``--worker``), so memory figures are not
polluted by earlier measurements. "Compiled" means: the train step (a ``tf.function`` with a
shape-polymorphic signature) has been traced and run once on a small exam (4 x 64 x 64), so
graph optimisation, optimizer slots and thread pools exist before the measured step.

Usage::

    python scripts/bench/model.py                       # everything (slow on 2 cores)
    python scripts/bench/model.py --quick               # CI-sized: small shapes, narrow model
    python scripts/bench/model.py --sections=matmul,train_step --steps=5
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = ("matmul", "train_step", "pipeline", "remat", "precision")


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakSampler:
    """Polls RSS every `interval` seconds in a thread; `.peak` is the highest value seen."""

    def __init__(self, interval=0.002):
        self.interval, self.peak = interval, _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


# ----------------------------------------------------------------------------- workers


def measure_matmul(n: int = 2048, repeats: int = 20) -> dict:
    """fp32 GFLOP/s of an n x n matmul in TensorFlow (median of `repeats`)."""
    import tensorflow as tf

    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)
    matmul = tf.function(lambda a, b: tf.linalg.matmul(a, b))
    matmul(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).numpy()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "benchmark": "matmul_fp32",
        "n": n,
        "seconds": round(seconds, 5),
        "gflops": round(2 * n**3 / seconds / 1e9, 1),
        "cpus": os.cpu_count(),
    }


def measure_step(
    slices: int,
    size: int,
    width: int,
    remat_chunk: int = 0,
    dtype_policy: str = "float32",
    jit_compile: bool = False,
    slice_mode: str = "fold",
    steps: int = 3,
) -> dict:
    """Builds the model, compiles a train step, measures memory of one step and step time.

    Returns a dict with first_step_s, step_s (median of `steps` further steps; the first step
    when steps == 0), rss_model_mb, peak_rss_mb, activation_mb (first measured step) and
    activation_steady_mb (a later step, measured the same way).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from mri_keras import constants
    from mri_keras import model as model_lib
    from mri_keras.config import ModelConfig

    config = ModelConfig(
        width=width, remat_chunk=remat_chunk, dtype_policy=dtype_policy, slice_mode=slice_mode
    )
    model = model_lib.build_model(config)
    optimizer = keras.optimizers.Adam(learning_rate=1e-5)
    if dtype_policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    variables = model.trainable_variables
    optimizer.build(variables)

    def forward_backward(volume, targets):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model_lib.compute_loss(targets, model(volume, training=True)))
            scaled = optimizer.scale_loss(loss)
        return loss, tape.gradient(scaled, variables)

    if jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    spec = tf.TensorSpec((1, None, None, None, 1), tf.float32)
    target_spec = {k: tf.TensorSpec((1, 2), tf.float32) for k in constants.LABELS}

    @tf.function(input_signature=[spec, target_spec])
    def train_step(volume, targets):
        loss, grads = forward_backward(volume, targets)
        optimizer.apply(grads, variables)
        return loss

    rng = np.random.default_rng(0)
    targets = {k: tf.one_hot([int(rng.integers(0, 2))], 2) for k in constants.LABELS}
    small = tf.constant(rng.normal(size=(1, min(slices, 4), 64, 64, 1)).astype("float32"))
    train_step(small, targets).numpy()  # trace + run once: "built, compiled"
    volume = tf.constant(rng.normal(size=(1, slices, size, size, 1)).astype("float32"))

    import resource

    def cpu_seconds():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    cpu_times = []

    def measured_step():
        rss_before = _rss_bytes()
        with _PeakSampler() as sampler:
            start, cpu_start = time.perf_counter(), cpu_seconds()
            train_step(volume, targets).numpy()
            seconds = time.perf_counter() - start
            cpu_times.append(cpu_seconds() - cpu_start)
        return seconds, rss_before, sampler.peak

    first_s, rss_model, peak = measured_step()
    # ru_maxrss (KiB) is the exact high-water mark; it exceeds the warm-up's, so it is this step's.
    peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    times, steady = [], None
    for _ in range(steps):
        seconds, before, later_peak = measured_step()
        times.append(seconds)
        steady = later_peak - before if steady is None else max(steady, later_peak - before)
    mb = 1 << 20
    forward_flops = model_lib.count_flops(config, slices, size, size)
    step_s = statistics.median(times) if times else first_s
    return {
        "slices": slices,
        "size": size,
        "width": width,
        "slice_mode": slice_mode,
        "remat_chunk": remat_chunk,
        "dtype_policy": dtype_policy,
        "jit_compile": jit_compile,
        "steps_timed": len(times),
        "first_step_s": round(first_s, 3),
        "step_s": round(step_s, 3),
        # CPU seconds (user+sys, all threads) are steadier than wall time on a shared machine.
        "step_cpu_s": round(statistics.median(cpu_times[1:] or cpu_times), 3),
        "forward_gflop": round(forward_flops / 1e9, 2),
        "train_gflop": round(3 * forward_flops / 1e9, 2),
        "achieved_gflops": round(3 * forward_flops / step_s / 1e9, 1),
        "rss_model_mb": round(rss_model / mb, 1),
        "peak_rss_mb": round(peak / mb, 1),
        "activation_mb": round((peak - rss_model) / mb, 1),
        "activation_steady_mb": None if steady is None else round(steady / mb, 1),
    }


def _worker_main(flags) -> None:
    if flags.worker == "matmul":
        result = measure_matmul(repeats=flags.matmul_repeats)
    elif flags.worker == "step":
        result = measure_step(
            flags.slices,
            flags.size,
            flags.width,
            remat_chunk=flags.remat_chunk,
            dtype_policy=flags.dtype_policy,
            jit_compile=flags.jit_compile,
            slice_mode=flags.slice_mode,
            steps=flags.steps,
        )
    else:
        raise ValueError(f"Unknown worker. Received: worker={flags.worker!r}")
    print("RESULT " + json.dumps(result), flush=True)


def _run_worker(timeout_s: float, env_overrides=None, **args) -> dict:
    """Runs one measurement in a fresh Python process and returns its result dict."""
    if args.get("worker") == "step":
        # Every worker flag explicit: the worker must not inherit the parent's defaults.
        args = {
            "remat_chunk": 0,
            "dtype_policy": "float32",
            "jit_compile": False,
            "slice_mode": "fold",
            **args,
        }
    cmd = [sys.executable, os.path.abspath(__file__)]
    cmd += [f"--{k}={v}" for k, v in args.items()]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=_REPO, **(env_overrides or {}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "args": args}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
            if env_overrides:
                result["env"] = env_overrides
            return result
    return {"error": f"worker exited {proc.returncode}: {proc.stderr[-1500:]}", "args": args}


# ----------------------------------------------------------------------------- sections


def run(flags) -> None:
    sections = [s.strip() for s in flags.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"Unknown sections {unknown}; choose from {SECTIONS}.")
    size, slices, width = flags.size, flags.slices, flags.width
    timeout = flags.worker_timeout_s
    _emit(
        {
            "benchmark": "setup",
            "command": " ".join(sys.argv),
            "cpus": os.cpu_count(),
            "sections": sections,
            "gpu": "none (CPU-only machine)",
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    )

    matmul = None
    if "matmul" in sections or "train_step" in sections:
        matmul = _run_worker(timeout, worker="matmul", matmul_repeats=flags.matmul_repeats)
        _emit(matmul)

    step = None
    if "train_step" in sections or "pipeline" in sections:
        step = _run_worker(
            timeout, worker="step", slices=slices, size=size, width=width, steps=flags.steps
        )
        record = {
            "benchmark": "train_step",
            **step,
            "flops_convention": "train = 3 x analytic forward (conv+dense MACs x 2)",
        }
        if matmul and "gflops" in matmul and "achieved_gflops" in step:
            # The machine is shared: bracket the step with a second matmul measurement and
            # compare with the mean of the two.
            after = _run_worker(timeout, worker="matmul", matmul_repeats=flags.matmul_repeats)
            _emit({**after, "benchmark": "matmul_fp32_after_train_step"})
            gflops = [m["gflops"] for m in (matmul, after) if "gflops" in m]
            record["matmul_gflops_mean"] = round(sum(gflops) / len(gflops), 1)
            record["fraction_of_matmul"] = round(
                step["achieved_gflops"] / record["matmul_gflops_mean"], 3
            )
            record["target_fraction"] = 0.75
            record["target_met"] = record["fraction_of_matmul"] >= 0.75
        _emit(record)
    if "train_step" in sections and flags.time_distributed:
        # TF 2.21's oneDNN kernels crash (double free / segfault) in the gradient of
        # TimeDistributed's vectorized_map on CPU, so both modes are timed with oneDNN off.
        no_onednn = {"TF_ENABLE_ONEDNN_OPTS": "0"}
        fold = _run_worker(
            timeout,
            env_overrides=no_onednn,
            worker="step",
            slices=slices,
            size=size,
            width=width,
            steps=flags.steps,
        )
        _emit({"benchmark": "train_step_fold_onednn_off", **fold})
        td = _run_worker(
            timeout,
            env_overrides=no_onednn,
            worker="step",
            slices=slices,
            size=size,
            width=width,
            steps=flags.steps,
            slice_mode="time_distributed",
        )
        if "step_s" in td and "step_s" in fold:
            td["vs_fold"] = round(td["step_s"] / fold["step_s"], 2)
        _emit({"benchmark": "train_step_time_distributed_onednn_off", **td})

    if "pipeline" in sections:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        try:
            import pipeline_bench  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            _emit({"benchmark": "input_pipeline", "error": f"pipeline_bench unavailable: {e}"})
        else:
            results = pipeline_bench.measure_pipeline(
                slices=slices, height=size, width=size, num_exams=flags.pipeline_exams
            )
            for r in results:
                _emit(r)
            pipe = next((r for r in results if r.get("benchmark") == "input_pipeline"), None)
            if pipe and step and "step_s" in step:
                consumed = 1.0 / step["step_s"]
                ratio = pipe["exams_per_s"] / consumed
                _emit(
                    {
                        "benchmark": "pipeline_vs_train_step",
                        "pipeline_exams_per_s": pipe["exams_per_s"],
                        "train_step_exams_per_s": round(consumed, 3),
                        "ratio": round(ratio, 2),
                        "target_ratio": 3.0,
                        "target_met": ratio >= 3.0,
                        "vs_raw_read": pipe.get("vs_raw_read"),
                        "target_vs_raw_read": 0.8,
                        "raw_read_target_met": (pipe.get("vs_raw_read") or 0) >= 0.8,
                    }
                )

    if "remat" in sections:
        rows = {}
        for s in [int(v) for v in flags.remat_slices.split(",")]:
            for chunk in (0, flags.remat_chunk):
                r = _run_worker(
                    timeout,
                    worker="step",
                    slices=s,
                    size=flags.remat_size,
                    width=flags.remat_width,
                    remat_chunk=chunk,
                    steps=flags.remat_steps,
                )
                rows[(s, chunk)] = r
                _emit({"benchmark": "remat_step", **r})
        _emit(_remat_summary(rows, flags.remat_chunk))

    if "precision" in sections:
        # float32 re-measured next to the others: the machine's load drifts between sections.
        base = _run_worker(
            timeout, worker="step", slices=slices, size=size, width=width, steps=flags.steps
        )
        _emit({"benchmark": "precision_step", **base})
        for kwargs in (
            {"dtype_policy": "mixed_bfloat16"},
            {"dtype_policy": "mixed_float16"},
            {"jit_compile": True},
        ):
            r = _run_worker(
                timeout,
                worker="step",
                slices=slices,
                size=size,
                width=width,
                steps=flags.steps,
                **kwargs,
            )
            if "step_s" in r and "step_s" in base:
                r["vs_float32"] = round(r["step_s"] / base["step_s"], 2)
            _emit({"benchmark": "precision_step", **r})


def _remat_summary(rows: dict, chunk: int) -> dict:
    slices = sorted({s for s, _ in rows})
    ok = all("activation_mb" in r for r in rows.values())
    summary = {"benchmark": "remat_summary", "chunk": chunk, "slices": slices}
    if not ok or len(slices) < 2:
        summary["error"] = "missing measurements"
        return summary
    lo, hi = slices[-2], slices[-1]

    def growth(c):
        return (rows[(hi, c)]["activation_mb"] - rows[(lo, c)]["activation_mb"]) / (hi - lo)

    base_act, remat_act = rows[(hi, 0)]["activation_mb"], rows[(hi, chunk)]["activation_mb"]
    g0, g1 = growth(0), growth(chunk)
    time_ratio = rows[(hi, chunk)]["step_s"] / rows[(hi, 0)]["step_s"]
    if "step_cpu_s" in rows[(hi, 0)] and "step_cpu_s" in rows[(hi, chunk)]:
        summary[f"step_cpu_time_ratio_at_{hi}"] = round(
            rows[(hi, chunk)]["step_cpu_s"] / rows[(hi, 0)]["step_cpu_s"], 3
        )
    summary.update(
        {
            f"activation_mb_at_{hi}": {"default": base_act, "remat": remat_act},
            "activation_reduction": round(base_act / max(remat_act, 1e-9), 2),
            f"growth_mb_per_slice_{lo}_to_{hi}": {"default": round(g0, 2), "remat": round(g1, 2)},
            "growth_reduction": round(g0 / g1, 2) if g1 > 0 else "inf (no growth)",
            f"step_time_ratio_at_{hi}": round(time_ratio, 3),
            "targets": {
                "activation_reduction>=": 2.0,
                "growth_reduction>=": 4.0,
                "step_time_ratio<=": 1.4,
            },
            "targets_met": {
                "activation": base_act / max(remat_act, 1e-9) >= 2.0,
                "growth": g1 <= 0 or g0 / g1 >= 4.0,
                "time": time_ratio <= 1.4,
            },
        }
    )
    return summary


def _define_flags():
    from absl import flags

    flags.DEFINE_string("sections", ",".join(SECTIONS), f"Comma-separated subset of {SECTIONS}.")
    flags.DEFINE_boolean("quick", False, "CI-sized run: 4x64x64 exams, width 8, short remat.")
    flags.DEFINE_integer("slices", 16, "Slices of the train-step exam.")
    flags.DEFINE_integer("size", 224, "Height and width of the train-step exam.")
    flags.DEFINE_integer("width", 64, "Model width (64 = the paper).")
    flags.DEFINE_integer("steps", 3, "Timed steps after the measured first step (median).")
    flags.DEFINE_boolean("time_distributed", True, "Also time slice_mode=time_distributed.")
    flags.DEFINE_integer("matmul_repeats", 20, "Timed 2048^2 matmuls (median).")
    flags.DEFINE_integer("pipeline_exams", 24, "Synthetic exams for the pipeline benchmark.")
    flags.DEFINE_string("remat_slices", "32,64,128", "Slice counts of the remat comparison.")
    flags.DEFINE_integer("remat_size", 448, "In-plane size of the remat comparison.")
    flags.DEFINE_integer("remat_width", 64, "Model width of the remat comparison.")
    flags.DEFINE_integer("remat_chunk", 4, "Slices per recomputation chunk.")
    flags.DEFINE_integer("remat_steps", 1, "Timed steps per remat configuration.")
    flags.DEFINE_float("worker_timeout_s", 3600, "Limit per measurement subprocess.")
    # Internal: one measurement in this process (used by the subprocesses).
    flags.DEFINE_enum("worker", None, ["matmul", "step"], "Internal.")
    flags.DEFINE_string("dtype_policy", "float32", "Internal (worker).")
    flags.DEFINE_boolean("jit_compile", False, "Internal (worker).")
    flags.DEFINE_string("slice_mode", "fold", "Internal (worker).")


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.worker:
        _worker_main(f)
        return
    if f.quick:
        overrides = dict(
            slices=4,
            size=64,
            width=8,
            steps=2,
            matmul_repeats=5,
            pipeline_exams=8,
            remat_slices="4,8",
            remat_size=64,
            remat_width=8,
            remat_chunk=2,
        )
        for name, value in overrides.items():
            if not f[name].present:
                setattr(f, name, value)
    run(f)


if __name__ == "__main__":
    sys.path.insert(0, _REPO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main)
