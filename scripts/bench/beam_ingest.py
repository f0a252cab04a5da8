r"""Beam converter benchmark: exams/s of ``tfrecords_tools.beam_convert`` on the DirectRunner
against ``tfrecords_tools.convert`` (the local process pool), same cohort, same workers.

Generates (or reuses, in ``--work_dir``) one synthetic cohort per ``--num_patients`` value
(1-3 exams per patient, 4 phases x ``--slices`` x ``--rows`` x ``--cols``, 16-bit, one file per
slice), reads it once so both converters see a warm page cache, then runs both command lines
alternately ``--repeats`` times as a user would (a fresh process each: start-up included),
``--num_workers`` processes each (``--num_workers`` / ``--direct_num_workers``). Prints JSON
lines: per cohort the median wall seconds and exams/s of each; with two cohort sizes, also the
marginal rate (extra exams / extra seconds between the two), which leaves out fixed start-up
costs (Beam's worker processes each import TensorFlow). CPU seconds (the command and its worker
processes) are reported too: on a machine shared with other jobs they move less than wall time.

  .venv/bin/python scripts/bench/beam_ingest.py --num_patients=8,24 --work_dir=/tmp/beam_bench
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tfrecords_tools import dicom_reader, synthetic  # noqa: E402

flags.DEFINE_list("num_patients", ["8", "24"], "Cohort sizes (patients; 1-3 exams each).")
flags.DEFINE_integer("slices", 96, "Slices per phase.")
flags.DEFINE_integer("rows", 256, "Rows per slice.")
flags.DEFINE_integer("cols", 256, "Columns per slice.")
flags.DEFINE_integer("num_workers", 2, "Worker processes of both converters.")
flags.DEFINE_integer("repeats", 2, "Alternating repetitions (median reported).")
flags.DEFINE_string("work_dir", "", "Where cohorts and records go; default a temp dir.")
flags.DEFINE_bool("keep", False, "Keep the work dir.")


def _emit(**fields):
    print(json.dumps({"bench": "beam_ingest", **fields}), flush=True)


def _cohort(base: str, patients: int) -> tuple:
    """(DICOM root, labels CSV, number of exams), generated once per size in ``base``."""
    F = flags.FLAGS
    root = os.path.join(base, f"dicom_{patients}")
    params = [patients, F.slices, F.rows, F.cols]
    params_file = root + ".json"
    labels = os.path.join(root, synthetic.LABELS_CSV)
    if not (os.path.exists(params_file) and json.load(open(params_file)) == params):
        synthetic.generate_cohort(
            root, patients, seed=0, slices=F.slices, rows=F.rows, cols=F.cols, workers=1,
            overwrite=True,
        )  # fmt: skip
        with open(params_file, "w") as f:
            json.dump(params, f)
    with open(labels) as f:
        exams = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    files = [
        os.path.join(root, e, n)
        for e in exams
        for n in dicom_reader.list_files(os.path.join(root, e))
    ]
    for path in files:  # Warm the page cache for both converters.
        with open(path, "rb") as fh:
            fh.read()
    mb = sum(os.path.getsize(p) for p in files) / 1e6
    _emit(what="cohort", patients=patients, exams=len(exams), files=len(files), dicom_mb=round(mb))
    return root, labels, len(exams)


def _cpu() -> float:
    """CPU seconds of the reaped children: the command and its workers (robust to a busy
    machine, unlike wall time)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def _run(module: str, args: list) -> tuple:
    start, cpu = time.perf_counter(), _cpu()
    proc = subprocess.run(
        [sys.executable, "-m", f"tfrecords_tools.{module}", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, cpu


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    base = F.work_dir or tempfile.mkdtemp(prefix="beam-bench-")
    os.makedirs(base, exist_ok=True)
    n = F.num_workers
    rates = {}
    for patients in [int(p) for p in F.num_patients]:
        root, labels, exams = _cohort(base, patients)
        out = os.path.join(base, "records")
        common = [
            f"--dicom_root={root}",
            f"--labels={labels}",
            f"--output_dir={out}",
            f"--pseudonym_key_file={os.path.join(base, 'private', 'key')}",
        ]
        runs = {"local": [], "beam": []}
        for _ in range(F.repeats):
            for name, module, extra in (
                ("local", "convert", [f"--num_workers={n}", "--noprogress"]),
                ("beam", "beam_convert", [f"--direct_num_workers={n}"]),
            ):
                shutil.rmtree(out, ignore_errors=True)
                runs[name].append(_run(module, common + extra))
        for name, timed in runs.items():
            wall = statistics.median(w for w, _ in timed)
            cpu = statistics.median(c for _, c in timed)
            rates.setdefault(name, []).append((exams, wall, cpu))
            _emit(
                what=name, exams=exams, workers=n, wall_s=[round(w, 2) for w, _ in timed],
                median_s=round(wall, 2), exams_per_s=round(exams / wall, 2),
                cpu_s=[round(c, 2) for _, c in timed], cpu_s_per_exam=round(cpu / exams, 3),
            )  # fmt: skip
    for name, points in rates.items():
        if len(points) >= 2:  # Fixed start-up costs cancel out.
            (e0, w0, c0), (e1, w1, c1) = points[0], points[-1]
            _emit(
                what=f"{name}_marginal", exams_per_s=round((e1 - e0) / (w1 - w0), 2),
                cpu_s_per_exam=round((c1 - c0) / (e1 - e0), 3),
            )  # fmt: skip
    with open("/proc/loadavg") as f:
        _emit(what="machine", cpus=os.cpu_count(), loadavg=f.read().split()[:3])
    if not F.keep and not F.work_dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
