"""Reads and checks the labels CSV, the phase map CSV and the exam folders they name.

Every problem of the inputs is collected and reported in one message before any exam is read,
naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import posixpath
from collections.abc import Sequence

from tfrecords_tools import dicom_reader, schema

EXAM_COLUMN = "exam"
SPLIT_COLUMN = "split"
PHASE_MAP_COLUMNS = ("exam", "series_instance_uid", "phase")
TEMPORAL_POSITION_COLUMN = "temporal_position"  # Optional: picks one phase of a series.
_MAX_LISTED = 50


class InputError(ValueError):
    """The labels CSV, the phase map or the DICOM root is not usable as given."""


@dataclasses.dataclass(frozen=True)
class LabelRow:
    exam: str  # Normalised folder path relative to the DICOM root ("/"-separated).
    labels: tuple
    split: str | None
    line: int


def normalise_exam(value: str) -> str:
    """Normalises an exam folder path from the CSV ("./P1\\E2/" -> "P1/E2")."""
    value = value.strip().replace("\\", "/")
    norm = posixpath.normpath(value) if value else ""
    return "" if norm == "." else norm


def _listing(items: Sequence[str]) -> str:
    shown = list(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown.append(f"... and {len(items) - _MAX_LISTED} more")
    return "".join(f"\n    {s}" for s in shown)


def _read_csv(path: str):
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found.")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); save the CSV "
            "as UTF-8 (in Excel: 'CSV UTF-8')."
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    rows = []
    for row in reader:
        cleaned = {(k or "").strip(): _cell(v) for k, v in row.items()}
        if not any(cleaned.values()):
            continue  # ",,,,": a blank row as spreadsheets export them.
        rows.append((reader.line_num, cleaned))
    return header, rows


def _cell(value) -> str:
    if isinstance(value, list):  # Cells beyond the header (DictReader's restkey).
        return ",".join(v.strip() for v in value)
    return (value or "").strip()


def _header_hint(header: Sequence[str]) -> str:
    if len(header) == 1 and ";" in header[0]:
        return " The file looks semicolon-separated; save it comma-separated."
    return ""


class LocalTree:
    """The exam folders under a local DICOM root, as ``read_labels`` checks them."""

    def __init__(self, dicom_root: str):
        self.root = dicom_root

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def has_folder(self, exam: str) -> bool:
        return os.path.isdir(os.path.join(self.root, *exam.split("/")))

    def unlabelled_folders(self, labelled: Sequence[str]) -> list:
        return find_unlabelled_folders(self.root, labelled)


class ListedTree:
    """The exam folders under a DICOM root known from a listing of its files (object storage,
    where there are no folders to walk).

    Args:
      files: relative paths ("/"-separated) of every file under the root.
      read_head: callable(relative path) -> the file's first 132 bytes (b"" if unreadable).
    """

    def __init__(self, files: Sequence[str], read_head):
        self.files = sorted(files)
        self.read_head = read_head
        self.folders = {f.rsplit("/", 1)[0] for f in self.files if "/" in f}
        self.folders |= {d.rsplit("/", i)[0] for d in self.folders for i in range(d.count("/") + 1)}

    def exists(self) -> bool:
        return bool(self.files)

    def has_folder(self, exam: str) -> bool:
        return exam in self.folders

    def walk(self):
        """Like ``os.walk`` (top-down, relative paths, ``dirs`` may be pruned in place)."""
        children: dict = {}
        for f in self.files:
            parent, name = f.rsplit("/", 1) if "/" in f else ("", f)
            children.setdefault(parent, ([], []))[1].append(name)
        for d in sorted(self.folders):
            parent, name = d.rsplit("/", 1) if "/" in d else ("", d)
            children.setdefault(parent, ([], []))[0].append(name)
        stack = [""]
        while stack:
            rel = stack.pop()
            dirs, names = children.get(rel, ([], []))
            dirs = sorted(dirs)
            yield rel, dirs, sorted(names)
            stack += [posixpath.join(rel, d) for d in reversed(dirs)]

    def unlabelled_folders(self, labelled: Sequence[str]) -> list:
        def looks_like_dicom(rel: str) -> bool:
            return _head_looks_like_dicom(self.read_head(rel))

        return _unlabelled(self.walk(), labelled, looks_like_dicom)


def read_labels(path: str, dicom_root: str, tree=None) -> list:
    """Reads the labels CSV and checks it against the folders under ``dicom_root``.

    Args:
      path: str. CSV with ``exam`` and the four label columns (0/1), optional ``split``.
      dicom_root: str. Folder holding the exam folders.
      tree: LocalTree or ListedTree of ``dicom_root``. Defaults to LocalTree(dicom_root).

    Returns:
      LabelRow per exam, in file order.

    Raises:
      InputError: listing every problem (missing columns, values other than 0/1, duplicate
        exams, exams with no folder, unknown split values, DICOM folders with no labels).
    """
    tree = LocalTree(dicom_root) if tree is None else tree
    if not tree.exists():
        raise InputError(f"--dicom_root={dicom_root}: not a directory.")
    header, rows = _read_csv(path)
    missing = [c for c in (EXAM_COLUMN,) + schema.LABELS if c not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; the header must be "
            f"{','.join((EXAM_COLUMN,) + schema.LABELS)}[,{SPLIT_COLUMN}]. "
            f"Found: {','.join(header)}.{_header_hint(header)}"
        )
    if not rows:
        raise InputError(f"{path}: no exams listed.")
    has_split = SPLIT_COLUMN in header
    problems: dict = {}

    def problem(kind, text):
        problems.setdefault(kind, []).append(text)

    out, seen = [], {}
    for line, row in rows:
        exam = normalise_exam(row.get(EXAM_COLUMN, ""))
        where = f"line {line} (exam {row.get(EXAM_COLUMN, '')!r})"
        if not exam:
            problem("empty exam", f"line {line}")
            continue
        if exam.startswith("../") or exam == ".." or posixpath.isabs(exam):
            problem("exam outside --dicom_root", where)
            continue
        bad = [f"{c}={row.get(c, '')!r}" for c in schema.LABELS if row.get(c, "") not in ("0", "1")]
        if bad:
            problem("label values other than 0/1", f"{where}: {', '.join(bad)}")
        split = row.get(SPLIT_COLUMN, "") if has_split else None
        if has_split and split not in schema.SPLITS:
            problem(
                f"split values other than {'/'.join(schema.SPLITS)}", f"{where}: split={split!r}"
            )
        if exam in seen:
            problem("duplicate exams", f"{where} repeats line {seen[exam]}")
            continue
        seen[exam] = line
        if not tree.has_folder(exam):
            problem(f"exams with no folder under {dicom_root}", where)
        if not bad:
            labels = tuple(int(row[c]) for c in schema.LABELS)
            out.append(LabelRow(exam, labels, split or None, line))
    unlabelled = tree.unlabelled_folders(list(seen))
    if unlabelled:
        problems[f"folders with DICOM files and no labels in {path}"] = unlabelled
    if problems:
        raise InputError(
            f"{path}: the labels do not match the exams; fix these and run again:"
            + "".join(f"\n  {kind}:{_listing(items)}" for kind, items in problems.items())
        )
    return out


def _head_looks_like_dicom(head: bytes) -> bool:
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    return dicom_reader.head_is_bare_dicom(head)


def _looks_like_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return _head_looks_like_dicom(head)


def find_unlabelled_folders(dicom_root: str, labelled: Sequence[str]) -> list:
    """Folders holding DICOM files that are neither a labelled exam nor inside one.

    Labelled exam folders are not descended into. Each unlabelled finding is reported as the
    highest folder whose subtree holds no labelled exam (that is how a user names an exam).
    """

    def walk():
        for root, dirs, files in os.walk(dicom_root):
            yield (
                normalise_exam(os.path.relpath(root, dicom_root).replace(os.sep, "/")),
                dirs,
                files,
            )

    def looks_like_dicom(rel: str) -> bool:
        return _looks_like_dicom(os.path.join(dicom_root, *rel.split("/")))

    return _unlabelled(walk(), labelled, looks_like_dicom)


def _unlabelled(walk, labelled: Sequence[str], looks_like_dicom) -> list:
    """``find_unlabelled_folders`` over ``walk`` (top-down (relative folder, dirs, files),
    ``dirs`` pruned in place) with ``looks_like_dicom(relative file path)``."""
    labelled = set(labelled)
    # Every ancestor of a labelled exam ("P1" for "P1/E2").
    ancestors = {"/".join(e.split("/")[:i]) for e in labelled for i in range(1, e.count("/") + 1)}
    found = set()
    for rel, dirs, files in walk:
        dirs[:] = sorted(d for d in dirs if normalise_exam(posixpath.join(rel, d)) not in labelled)
        if rel in ancestors or rel == "":
            continue  # Files next to exam folders (notes, DICOMDIR) are not exams.
        if any(looks_like_dicom(posixpath.join(rel, n)) for n in sorted(files)):
            parts = rel.split("/")
            top = next(
                "/".join(parts[:i])
                for i in range(1, len(parts) + 1)
                if "/".join(parts[:i]) not in ancestors
            )
            found.add(top)
    return sorted(found)


def read_phase_map(path: str, exams: Sequence[str]) -> dict:
    """Reads the ``exam,series_instance_uid,phase[,temporal_position]`` CSV.

    Returns:
      {exam: {key: phase}}, key the SeriesInstanceUID, or ``"UID:N"`` where the optional
      ``temporal_position`` column gives TemporalPositionIdentifier N (multi-phase series).
      Each phase is given once, or twice for every phase (one series per breast).

    Raises:
      InputError: listing missing columns, unknown exams or phases and repeated series.
    """
    header, rows = _read_csv(path)
    missing = [c for c in PHASE_MAP_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; the header must be "
            f"{','.join(PHASE_MAP_COLUMNS)}.{_header_hint(header)}"
        )
    known = set(exams)
    problems, out = [], {}
    for line, row in rows:
        exam = normalise_exam(row["exam"])
        uid, phase = row["series_instance_uid"], row["phase"]
        position = row.get(TEMPORAL_POSITION_COLUMN, "")
        if position and not position.isdigit():
            problems.append(f"line {line}: temporal_position {position!r} is not a number")
            continue
        if position:
            uid = f"{uid}:{int(position)}"
        if exam not in known:
            problems.append(f"line {line}: exam {row['exam']!r} is not in the labels CSV")
        elif phase not in schema.PHASES:
            problems.append(f"line {line}: phase {phase!r} is not one of {schema.PHASES}")
        elif not uid:
            problems.append(f"line {line}: empty series_instance_uid")
        elif uid in out.get(exam, {}):
            problems.append(f"line {line}: series (and position) repeated for exam {row['exam']!r}")
        else:
            out.setdefault(exam, {})[uid] = phase
    for exam, mapping in out.items():
        phases = sorted(mapping.values())
        # Each phase once, or twice for unilateral protocols (one series per breast).
        if phases not in (sorted(schema.PHASES), sorted(schema.PHASES * 2)):
            problems.append(
                f"exam {exam!r}: phases {phases}, need each of "
                f"{', '.join(schema.PHASES)} exactly once (or exactly twice: one series per "
                "breast)"
            )
    if problems:
        raise InputError(f"{path}: phase map problems:{_listing(problems)}")
    return out
