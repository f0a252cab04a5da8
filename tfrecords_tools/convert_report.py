"""What a conversion reports: manifest.json, failures.csv, the private id map, the summary.

Under the output directory everything is pseudonymised: exams and patients by keyed hash, and
failure reasons scrubbed of anything UID-like. The folder names and full error messages go to
the id map and ``failures_detail.csv`` next to it, outside the output directory.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re

import numpy as np

from tfrecords_tools import fileio, schema

DETAIL_NAME = "failures_detail.csv"

_UID_RE = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def scrub(reason: str) -> str:
    """Removes anything UID-like from a failure reason (it goes under the output dir)."""
    return _UID_RE.sub("<uid>", reason)


def failure_rows(failed: list) -> list:
    """(exam pseudonym, scrubbed reason) of each failed exam, as failures.csv lists them."""
    return [(r["exam_id"], scrub(r["reason"])) for r in failed]


def _summary_stats(exams: list) -> dict:
    if not exams:
        return {"min": None, "max": None}
    arr = np.asarray(exams, dtype=np.float64)
    return {"min": arr.min(axis=0).tolist(), "max": arr.max(axis=0).tolist()}


def _label_counts(labels: list) -> dict:
    arr = np.asarray(labels, dtype=np.int64).reshape(-1, len(schema.LABELS))
    return {name: int(arr[:, i].sum()) for i, name in enumerate(schema.LABELS)}


def _prevalence(labels: list) -> dict:
    n = len(labels)
    counts = _label_counts(labels)
    return {name: (counts[name] / n if n else None) for name in schema.LABELS}


def build_manifest(plans: dict, metas: list, num_labelled: int, num_failures: int, flags) -> dict:
    """The manifest of a conversion.

    Args:
      plans: dict split -> shards.SplitPlan.
      metas: list of dict. Metadata of every converted exam.
      num_labelled: int. Exams in the labels CSV.
      num_failures: int. Exams that failed.
      flags: dict. The conversion settings (``ConvertConfig.manifest_flags``).
    """
    manifest_splits = {}
    for split in schema.SPLITS:
        plan = plans[split]
        manifest_splits[split] = {
            "shards": plan.names,
            "num_exams": len(plan.metas),
            "num_patients": len({m["patient_id"] for m in plan.metas}),
            "exams": [
                {k: m[k] for k in ("exam_id", "patient_id", "labels", "shape", "spacing")}
                for m in plan.metas
            ],
            "label_counts": _label_counts([m["labels"] for m in plan.metas]),
        }
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "phases": list(flags.get("phases", schema.PHASES)),
        "labels": list(schema.LABELS),
        "voxel_dtypes": {
            name: sum(m["voxel_dtype"] == name for m in metas)
            for name in schema.VOXEL_DTYPES
            if any(m["voxel_dtype"] == name for m in metas)
        },
        "splits": manifest_splits,
        "shapes": _summary_stats([m["shape"] for m in metas]),
        "spacings": _summary_stats([m["spacing"] for m in metas]),
        "prevalence": {
            "all": _prevalence([m["labels"] for m in metas]),
            **{
                s: _prevalence([e["labels"] for e in manifest_splits[s]["exams"]])
                for s in schema.SPLITS
            },
        },
        "num_labelled": num_labelled,
        "num_exams": len(metas),
        "num_failures": num_failures,
        "flags": flags,
    }


def _write_csv(path: str, header, rows, write, *, private: bool = False) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write(path, buf.getvalue(), private=private)


def write_failures(output_dir: str, failure_list: list, write=fileio.atomic_write_text) -> None:
    """failures.csv: ``exam,reason`` (pseudonym, scrubbed reason).

    ``write(path, text, private=...)`` replaces a file in one step: ``fileio`` here, Beam's
    file systems for object storage (``beam_files.write_text``).
    """
    path = os.path.join(output_dir, schema.FAILURES_NAME)
    _write_csv(path, ("exam", "reason"), failure_list, write)


def write_manifest(output_dir: str, manifest: dict, write=fileio.atomic_write_text) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=False) + "\n"
    write(os.path.join(output_dir, schema.MANIFEST_NAME), text, private=False)


def write_private(id_map: str, ids: list, failed: list, write=fileio.atomic_write_text) -> None:
    """The id map and, next to it, ``failures_detail.csv`` (kept outside the output directory).

    Args:
      id_map: str. The id map's path (a local path, or a URL such as ``gs://...``).
      ids: list of (exam pseudonym, patient pseudonym or "", exam folder), one per labelled
        exam.
      failed: list of dict. The failed exams (``exam_id``, ``exam``, ``detail``).
      write: how to replace a file (see ``write_failures``).
    """
    if "://" in id_map:  # Object storage: no folders to make, no local permissions.
        directory = id_map.rsplit("/", 1)[0]
        detail = f"{directory}/{DETAIL_NAME}"
    else:
        directory = os.path.dirname(os.path.abspath(id_map))
        os.makedirs(directory, exist_ok=True)
        detail = os.path.join(directory, DETAIL_NAME)
    # Both map pseudonyms back to exam folders (and the details may quote header text):
    # readable by the owner only, like the pseudonym key.
    _write_csv(id_map, ("exam_id", "patient_id", "exam"), ids, write, private=True)
    rows = [(r["exam_id"], r["exam"], r["detail"]) for r in failed]
    _write_csv(detail, ("exam_id", "exam", "detail"), rows, write, private=True)


def print_summary(result, output_dir: str, id_map: str, stream) -> None:
    """Writes what ``result`` (a ``convert_lib.ConvertResult``) did to ``stream``."""
    m = result.manifest
    lines = [
        f"converted {result.num_converted}/{result.num_labelled} exams into "
        f"{output_dir} ({result.num_cached} resumed from an earlier run)",
        "  "
        + ", ".join(
            f"{s}: {m['splits'][s]['num_exams']} exams / {m['splits'][s]['num_patients']} "
            f"patients in {len(m['splits'][s]['shards'])} shards"
            for s in schema.SPLITS
        ),
        f"  id map (pseudonym -> folder, keep private): {id_map}",
    ]
    if result.failures:
        lines.append(
            f"  {len(result.failures)} exam(s) failed (see failures.csv; folder names "
            f"in failures_detail.csv next to the id map):"
        )
        lines += [f"    {e}: {r}" for e, r in result.failures[:20]]
        if len(result.failures) > 20:
            lines.append(f"    ... and {len(result.failures) - 20} more")
    stream.write("\n".join(lines) + "\n")
    stream.flush()
