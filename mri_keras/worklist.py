"""Prediction over a worklist: many exam folders scored in one process.

``python -m mri_keras.predict --model=M --worklist=W [--output=scores.csv|scores.jsonl]``

A worklist is either

- a folder: every sub-folder ``--worklist_depth`` levels down is one exam (depth 1:
  ``W/<exam>/``; depth 2: ``W/<patient>/<exam>/`` as the synthetic cohort is laid out), or
- a CSV with an ``exam`` column (or ``exam_dir``): one exam folder per row, relative paths
  resolved against ``--dicom_root`` (default: the CSV's folder). The converter's labels.csv is
  such a file.

Each exam gives one result, in worklist order: a JSON line (``{"exam": ..., "status": "ok",
"left": {...}, "right": {...}, ...}``, the single-exam output plus the worklist entry) or a CSV
row (``RESULT_COLUMNS``). An exam that cannot be read or scored gets ``"status": "failed"`` and
its ``error``, and the rest are still scored. The model is loaded once and the next exams'
DICOM are read on a thread while the current one is scored. The ``exam`` field is the worklist
entry as given (the user's own path), never a value from the DICOM headers.

Results are written to ``OUTPUT.partial`` as they come, then renamed to ``OUTPUT``; an existing
``OUTPUT`` is never overwritten. A progress line and a closing summary (exams/s) go to stderr.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import json
import os
import sys
import time

from mri_keras import constants

RESULT_COLUMNS = (
    "exam",
    "status",
    *constants.LABELS,
    "slices",
    "rows",
    "cols",
    "input",
    "tta",
    "calibrated",
    "heatmap_npy",
    "error",
)
CSV_COLUMNS = ("exam", "exam_dir")  # Accepted names of a worklist CSV's exam column.
EXIT_SOME_FAILED = 3


class WorklistError(ValueError):
    """The worklist itself is unusable (no such folder, a CSV without an exam column...)."""


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One exam of a worklist.

    Attributes:
      name: str. The entry as the worklist gives it (CSV value, or the folder's path relative
        to the worklist folder); the ``exam`` field of its result.
      exam_dir: str. The exam folder, absolute.
    """

    name: str
    exam_dir: str


def read_worklist(path: str, depth: int = 1, dicom_root: str | None = None) -> list[WorkItem]:
    """The exams of a worklist folder or CSV (see the module docstring), in order.

    Raises:
      WorklistError: no such path, a folder with no exam folders at that depth, a CSV without
        an ``exam`` column or with an empty entry (the row is named).
    """
    if os.path.isdir(path):
        if depth < 1:
            raise WorklistError(f"worklist_depth must be >= 1. Received: {depth}")
        items = []
        for dirpath, dirnames, _ in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, path)
            level = 0 if rel == "." else rel.count(os.sep) + 1
            if level == depth:
                items.append(WorkItem(rel, os.path.abspath(dirpath)))
                dirnames[:] = []
        if not items:
            raise WorklistError(
                f"{path}: no exam folders {depth} level(s) down (set --worklist_depth to where "
                "the exam folders are, e.g. 2 for ROOT/patient/exam)."
            )
        return items
    if not os.path.isfile(path):
        raise WorklistError(f"worklist {path!r} does not exist (expected a folder or a CSV).")
    root = dicom_root or os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        column = next((c for c in CSV_COLUMNS if c in (reader.fieldnames or ())), None)
        if column is None:
            raise WorklistError(
                f"{path}: no exam column; expected one of {CSV_COLUMNS} in the header, found "
                f"{reader.fieldnames}."
            )
        items = []
        for row_number, row in enumerate(reader, start=2):
            entry = (row.get(column) or "").strip()
            if not entry:
                raise WorklistError(f"{path}, row {row_number}: empty {column!r}.")
            items.append(WorkItem(entry, os.path.abspath(os.path.join(root, entry))))
    if not items:
        raise WorklistError(f"{path}: no rows.")
    return items


def result_row(name: str, result: dict | None, error: str | None = None) -> dict:
    """The worklist result of one exam: ``predict.score_exam``'s dict, or the error."""
    if result is None:
        return {"exam": name, "status": "failed", "error": error}
    return {"exam": name, "status": "ok", **result}


def _csv_row(row: dict) -> dict:
    out = {k: "" for k in RESULT_COLUMNS}
    out.update(exam=row["exam"], status=row["status"], error=row.get("error") or "")
    if row["status"] == "ok":
        for label in constants.LABELS:
            side, task = label.split("_", 1)
            out[label] = f"{row[side][task]:.6f}"
        out.update(slices=row["shape"][0], rows=row["shape"][1], cols=row["shape"][2])
        out.update(input=row["input"], tta=row["tta"], calibrated=int(row["calibrated"]))
        out["heatmap_npy"] = row.get("heatmap", {}).get("npy", "")
    return out


class _Writer:
    """Streams results to stdout or to ``OUTPUT.partial`` (renamed to OUTPUT when done)."""

    def __init__(self, output: str | None, stdout=None):
        self.output = output
        self.is_csv = bool(output) and output.lower().endswith(".csv")
        if output:
            self.partial = output + ".partial"
            self.file = open(self.partial, "w", newline="")
        else:
            self.file = stdout or sys.stdout
        self.csv = None
        if self.is_csv:
            self.csv = csv.DictWriter(self.file, fieldnames=RESULT_COLUMNS)
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv is not None:
            self.csv.writerow(_csv_row(row))
        else:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self, complete: bool) -> None:
        if not self.output:
            return
        self.file.close()
        if complete:
            os.replace(self.partial, self.output)


class _Progress:
    """One progress line on a terminal (redrawn), else a line per ~10% or 30 s."""

    def __init__(self, total: int, stream):
        self.total, self.stream = total, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.start = self.last = time.time()
        self.next_step = max(1, total // 10)

    def update(self, done: int, failed: int) -> None:
        now = time.time()
        rate = done / max(now - self.start, 1e-9)
        line = f"[{done}/{self.total}] {rate:.2f} exams/s, {failed} failed"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        elif done % self.next_step == 0 or done == self.total or now - self.last > 30:
            self.stream.write(line + "\n")
            self.last = now
        self.stream.flush()


def predict_worklist(
    config,
    items: list[WorkItem],
    output: str | None = None,
    *,
    predictor=None,
    log=None,
    stdout=None,
    prefetch: int = 2,
) -> dict:
    """Scores every exam of ``items`` with one loaded model.

    Args:
      config: ``predict.PredictConfig`` (its ``exam_dir`` is ignored); with ``heatmap_dir``
        each exam's heatmaps go to ``heatmap_dir/NNNNN`` (its position in the worklist).
      items: from ``read_worklist``.
      output: optional ``.csv`` or JSON-lines file; None streams JSON lines to ``stdout``.
      predictor: optional loaded ``inference.Predictor``.
      log: stream of the progress and the summary. Defaults to stderr.
      stdout: stream of the results when ``output`` is None. Defaults to sys.stdout.
      prefetch: exams read ahead on a thread while one is scored.

    Returns:
      dict: ``exams``, ``scored``, ``failed`` (list of ``{"exam", "error"}``), ``seconds``
      (after the model was loaded), ``exams_per_s``, ``load_seconds`` and ``output``.

    Raises:
      WorklistError: ``output`` exists already (it is never overwritten) or is a folder.
      FileNotFoundError: no model, or heatmaps asked for without best.keras.
    """
    from mri_keras import inference, predict

    log = log or sys.stderr
    if output and os.path.exists(output):
        raise WorklistError(f"output {output!r} exists; choose another path (it is kept).")
    if config.heatmap_dir and os.path.exists(config.heatmap_dir):
        if not os.path.isdir(config.heatmap_dir):
            raise WorklistError(f"heatmap_dir {config.heatmap_dir!r} exists and is not a folder.")
    load_start = time.time()
    predictor = predictor or inference.load_predictor(config.model, config.model_format, config.tta)
    if config.heatmap_dir:
        predictor.saliency_model()  # Fails now, not once per exam, without best.keras.
    load_seconds = time.time() - load_start

    writer = _Writer(output, stdout)
    progress = _Progress(len(items), log)
    failed, scored = [], 0
    start = time.time()
    complete = False
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = collections.deque()
            upcoming = iter(enumerate(items))
            for _ in range(max(1, prefetch)):
                _submit(pool, pending, upcoming)
            while pending:
                index, item, future = pending.popleft()
                _submit(pool, pending, upcoming)
                try:
                    exam = future.result()
                    exam_config = dataclasses.replace(
                        config,
                        exam_dir=item.exam_dir,
                        heatmap_dir=(
                            os.path.join(config.heatmap_dir, f"{index:05d}")
                            if config.heatmap_dir
                            else None
                        ),
                    )
                    row = result_row(item.name, predict.score_exam(exam_config, predictor, exam))
                    scored += 1
                except Exception as e:  # noqa: BLE001 (one exam's failure must not stop the rest)
                    reason = _reason(e)
                    row = result_row(item.name, None, reason)
                    failed.append({"exam": item.name, "error": reason})
                writer.write(row)
                progress.update(scored + len(failed), len(failed))
        complete = True
    finally:
        writer.close(complete)
    seconds = time.time() - start
    summary = {
        "exams": len(items),
        "scored": scored,
        "failed": failed,
        "seconds": round(seconds, 2),
        "exams_per_s": round(len(items) / seconds, 3) if seconds > 0 else None,
        "load_seconds": round(load_seconds, 2),
        "output": output,
    }
    log.write(
        f"scored {scored} of {len(items)} exams ({len(failed)} failed) in {seconds:.1f} s: "
        f"{summary['exams_per_s']} exams/s after {load_seconds:.1f} s loading the model"
        + (f"; wrote {output}" if output else "")
        + "\n"
    )
    for f in failed:
        log.write(f"  failed: {f['exam']}: {f['error']}\n")
    return summary


def _submit(pool, pending, upcoming) -> None:
    from mri_keras import predict

    nxt = next(upcoming, None)
    if nxt is not None:
        index, item = nxt
        pending.append((index, item, pool.submit(predict.read_exam, item.exam_dir)))


def _reason(error: Exception) -> str:
    from tfrecords_tools import dicom_reader

    if isinstance(error, dicom_reader.ExamError):
        return f"not a usable exam: {error}"
    return f"{type(error).__name__}: {error}"
