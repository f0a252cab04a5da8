"""Summaries, numpy exports and PNG previews of a converted records directory."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from tfrecords_tools import schema
from tfrecords_tools.records import Records


def read_failures(records_dir: str) -> list:
    path = os.path.join(records_dir, schema.FAILURES_NAME)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [(r["exam"], r["reason"]) for r in csv.DictReader(f)]


def _range(stats: dict) -> str:
    if not stats or stats.get("min") is None:
        return "-"
    lo, hi = stats["min"], stats["max"]
    return " x ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in zip(lo, hi))


def summary(records_dir: str, verify: bool = False) -> str:
    """Text summary: exams/patients/shards per split, label prevalence, shape and spacing
    ranges, failures. With ``verify`` every record is read and checked against the manifest.
    """
    records = Records.open(records_dir)
    m = records.manifest
    lines = [f"records: {os.path.abspath(records_dir)} (schema version {m['schema_version']})"]
    labels = m.get("labels") or list(schema.LABELS)
    lines.append(
        f"{'split':<6} {'exams':>6} {'patients':>8} {'shards':>6} {'MiB':>9}  "
        + "  ".join(f"{name:>15}" for name in labels)
    )
    # Entries a manifest written by another tool may lack are shown as "-", not a traceback.
    for split in schema.SPLITS:
        s = records.split_entry(split)
        size = sum(os.path.getsize(p) for p in records.shard_paths(split)) if s.get("shards") else 0
        size /= 2**20
        label_counts = s.get("label_counts") or {}
        counts = "  ".join(
            f"{label_counts.get(name, '-'):>5} "
            f"({_pct(label_counts.get(name), s.get('num_exams', 0)):>6})"
            for name in labels
        )
        lines.append(
            f"{split:<6} {s.get('num_exams', 0):>6} {s.get('num_patients', '-'):>8} "
            f"{len(s.get('shards') or []):>6} {size:>9.1f}  {counts}"
        )
    lines.append(f"shape (S x H x W): {_range(m.get('shapes'))}")
    lines.append(f"spacing mm (slice x row x col): {_range(m.get('spacings'))}")
    dtypes = m.get("voxel_dtypes") or {}
    lines.append(
        "stored voxels: "
        + (", ".join(f"{name} {count} exams" for name, count in dtypes.items()) or "none")
        + " (readers apply each phase's rescale: float32 voxel values)"
    )
    failures = read_failures(records_dir)
    lines.append(f"failures: {len(failures)} of {m.get('num_labelled', '?')} labelled exams")
    for exam, reason in failures:
        lines.append(f"  {exam}: {reason}")
    if verify:
        lines.append(verify_records(records_dir))
    return "\n".join(lines)


def _pct(n, total) -> str:
    return f"{100.0 * n / total:.1f}%" if total and n is not None else "-"


def verify_records(records_dir: str) -> str:
    """Reads every record and checks ids, labels and shapes against the manifest.

    Raises:
      ValueError: naming the first mismatch.
    """
    records = Records.open(records_dir)
    m = records.manifest
    expected = {
        e["exam_id"]: (split, e) for split in schema.SPLITS for e in m["splits"][split]["exams"]
    }
    seen = set()
    for split, rec in records.iter_numpy():
        exam_id = rec[schema.KEY_EXAM_ID]
        if exam_id not in expected or expected[exam_id][0] != split or exam_id in seen:
            raise ValueError(f"record {exam_id} in {split} does not match the manifest")
        e = expected[exam_id][1]
        if (
            list(rec[schema.KEY_SHAPE]) != e["shape"]
            or rec[schema.KEY_LABELS].tolist() != e["labels"]
            or rec[schema.KEY_PHASES] != tuple(m["phases"])
        ):
            raise ValueError(f"record {exam_id} differs from its manifest entry")
        seen.add(exam_id)
    if len(seen) != len(expected):
        raise ValueError(f"{len(expected) - len(seen)} exams of the manifest have no record")
    return f"verified: {len(seen)} records match the manifest"


def export_npz(records_dir: str, out_dir: str, splits: Sequence[str] = schema.SPLITS) -> int:
    """Writes ``out_dir/<exam_id>.npz`` (t0..t3 float32, labels (4,), spacing (3,)) per exam.

    Returns:
      Number of exams written.
    """
    os.makedirs(out_dir, exist_ok=True)
    n = 0
    for _, rec in Records.open(records_dir).iter_numpy(splits):
        arrays = {p: rec[p] for p in rec[schema.KEY_PHASES]}
        np.savez(
            os.path.join(out_dir, rec[schema.KEY_EXAM_ID] + ".npz"),
            labels=rec[schema.KEY_LABELS],
            spacing=rec[schema.KEY_SPACING],
            **arrays,
        )
        n += 1
    return n


def write_png(rec: dict, split: str, path: str) -> None:
    """Mid-slice preview: t0, t2 and t2 - t0 side by side, labelled, radiological view.

    Canonical arrays show the patient's right on the image's left (col increases toward
    patient Left), anterior at the top; the corners say so, to eyeball orientation.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    mid = rec[schema.KEY_SHAPE][0] // 2
    t0, t2 = rec["t0"][mid], rec["t2"][mid]
    panels = [("t0", t0, "gray"), ("t2", t2, "gray"), ("t2 - t0", t2 - t0, "magma")]
    fig = Figure(figsize=(12, 4.6), dpi=80)
    labels = rec[schema.KEY_LABELS]
    title = ", ".join(f"{name}={int(v)}" for name, v in zip(schema.LABELS, labels))
    fig.suptitle(
        f"{rec[schema.KEY_EXAM_ID]} ({split}, slice {mid} of {rec[schema.KEY_SHAPE][0]})\n{title}",
        fontsize=10,
    )
    spacing = rec[schema.KEY_SPACING]
    aspect = float(spacing[1] / spacing[2]) if spacing[2] else 1.0
    for i, (name, img, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        for x, y, text, ha, va in (
            (0.02, 0.5, "R", "left", "center"),
            (0.98, 0.5, "L", "right", "center"),
            (0.5, 0.98, "A", "center", "top"),
            (0.5, 0.02, "P", "center", "bottom"),
        ):
            ax.text(
                x,
                y,
                text,
                transform=ax.transAxes,
                ha=ha,
                va=va,
                color="yellow",
                fontsize=11,
                fontweight="bold",
            )
    fig.tight_layout()
    fig.savefig(path)


def export_png(
    records_dir: str, out_dir: str, splits: Sequence[str] = schema.SPLITS, max_exams: int = 0
) -> int:
    """Writes ``out_dir/<exam_id>.png`` previews; returns how many."""
    os.makedirs(out_dir, exist_ok=True)
    n = 0
    for split, rec in Records.open(records_dir).iter_numpy(splits):
        if max_exams and n >= max_exams:
            break
        write_png(rec, split, os.path.join(out_dir, rec[schema.KEY_EXAM_ID] + ".png"))
        n += 1
    return n
