"""Reads one DCE-MRI exam folder into canonical volumes (the contract in DESIGN.md).

``load_exam(exam_dir)`` walks the folder (any nesting, any file names), skips files that are not
DICOM, groups the images into series (and into temporal positions inside a multi-phase series),
drops localizers, derived/subtraction images and series whose geometry or sequence differs from
the DCE acquisition, orders the DCE phases by acquisition time (``t0`` first), sorts slices by
ImagePositionPatient projected on the slice normal, applies RescaleSlope/Intercept per slice and
reorients each volume by axis permutation and flips only to the canonical axes
``(slice, row, col)`` = (toward Superior, toward Posterior, toward patient Left).

Each file is read once, completely: grouping uses the headers already in memory and only the
pixels of the selected series are decoded.

Every problem raises ``ExamError`` whose ``reason`` names the problem without any header text or
file name (safe for logs); ``str(error)`` adds the exam folder and, where one is to blame, the
file.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import pydicom
import pydicom.errors
from pydicom.pixels import get_decoder

PHASES = ("t0", "t1", "t2", "t3")

CODECS_HINT = "pip install 'mri_keras[dicom-codecs]'"

# ImageType values marking images that are not an original acquisition of a DCE phase.
_DERIVED_MARKERS = frozenset(
    {"DERIVED", "SUBTRACTION", "SUB", "MIP", "MPR", "PROJECTION IMAGE", "REFORMATTED", "MOCO"}
)
_LOCALIZER_MARKERS = frozenset({"LOCALIZER", "SCOUT", "SURVEY"})


class ExamError(Exception):
    """An exam folder cannot be turned into canonical volumes.

    Attributes:
      exam: str. The exam folder as given to ``load_exam``.
      reason: str. What is wrong, free of header text and file names (safe to log).
      file: str or None. The file (relative to the exam folder) to blame, if one is.
    """

    def __init__(self, exam: str, reason: str, file: str | None = None):
        self.exam = str(exam)
        self.reason = reason
        self.file = file
        msg = f"exam {self.exam}: {reason}"
        if file:
            msg += f" (file {file})"
        super().__init__(msg)

    def __reduce__(self):  # Keeps the attributes across process boundaries.
        return (ExamError, (self.exam, self.reason, self.file))


@dataclasses.dataclass(frozen=True)
class ReaderOptions:
    """Tolerances of the reader.

    Attributes:
      max_obliquity_deg: float. Largest angle between an image axis and the nearest patient
        axis that is still reoriented by permutation/flip; beyond it the exam is rejected.
      min_slices: int. Series with fewer images are ignored (localizers, single-slice scouts).
      spacing_tolerance: float. Relative deviation of a slice gap from the median gap that is
        still "uniform".
    """

    max_obliquity_deg: float = 15.0
    min_slices: int = 2
    spacing_tolerance: float = 0.05


@dataclasses.dataclass(frozen=True)
class CanonicalExam:
    """One exam in canonical orientation.

    Attributes:
      volumes: dict phase -> float32 ``(S, H, W)``; slice toward Superior, row toward Posterior,
        col toward patient Left. All phases share one grid.
      spacing: (slice, row, col) voxel spacing in mm.
      patient_id: raw DICOM PatientID, only for pseudonymisation; never write it anywhere.
    """

    volumes: dict
    spacing: tuple
    patient_id: str = dataclasses.field(repr=False)

    @property
    def shape(self) -> tuple:
        return tuple(self.volumes[PHASES[0]].shape)


@dataclasses.dataclass
class _Image:
    ds: pydicom.Dataset
    file: str  # Relative to the exam folder.
    iop: np.ndarray  # (6,)
    ipp: np.ndarray  # (3,)


@dataclasses.dataclass
class _Group:
    series_uid: str
    temporal_position: object
    images: list
    acq_time: object = None  # datetime or None
    series_number: object = None


def list_files(exam_dir: str) -> list:
    """All regular files below ``exam_dir``, relative paths in sorted order (deterministic)."""
    out = []
    for root, dirs, files in os.walk(exam_dir):
        dirs.sort()
        for name in sorted(files):
            out.append(os.path.relpath(os.path.join(root, name), exam_dir))
    return out


def _read_images(exam_dir: str) -> list:
    images = []
    for rel in list_files(exam_dir):
        path = os.path.join(exam_dir, rel)
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue  # Not DICOM (notes, DICOMDIR without preamble, ...).
        except Exception as e:  # noqa: BLE001 - a DICOM file whose header cannot be parsed.
            raise ExamError(exam_dir, f"unreadable DICOM header ({type(e).__name__})", rel)
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            continue  # Structured reports, presentation states, DICOMDIR, ...
        image_type = {str(v).upper() for v in ds.get("ImageType", [])}
        if image_type & _LOCALIZER_MARKERS or image_type & _DERIVED_MARKERS:
            continue
        try:
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], np.float64)
        except (AttributeError, ValueError, TypeError):
            raise ExamError(exam_dir, "image without valid position/orientation", rel)
        if iop.shape != (6,) or ipp.shape != (3,):
            raise ExamError(exam_dir, "malformed ImageOrientation/ImagePosition", rel)
        images.append(_Image(ds, rel, iop, ipp))
    return images


def _dicom_datetime(date, time):
    """Parses DA + TM strings into a datetime (None when the time is missing)."""
    time = str(time or "").strip()
    if not time:
        return None
    date = str(date or "").strip() or "19000101"
    hhmmss, _, frac = time.partition(".")
    hhmmss = (hhmmss + "0000")[:6] if len(hhmmss) < 6 else hhmmss[:6]
    try:
        base = datetime.datetime.strptime(date[:8] + hhmmss, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    micro = int((frac + "000000")[:6]) if frac.isdigit() else 0
    return base + datetime.timedelta(microseconds=micro)


def _acquisition_time(ds):
    for date_kw, time_kw in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
    ):
        t = _dicom_datetime(ds.get(date_kw, "") or ds.get("StudyDate", ""), ds.get(time_kw, ""))
        if t is not None:
            return t
    return None


def _group_images(images: Sequence[_Image]) -> list:
    """Groups images by series and temporal position (one group = one candidate phase)."""
    by_key: dict = {}
    for im in images:
        tpi = im.ds.get("TemporalPositionIdentifier", None)
        key = (str(im.ds.get("SeriesInstanceUID", "")), None if tpi in (None, "") else int(tpi))
        by_key.setdefault(key, []).append(im)
    groups = []
    for (uid, tpi), ims in by_key.items():
        # A multi-phase series without TemporalPositionIdentifier: repeated positions told apart
        # by AcquisitionNumber.
        if tpi is None and _has_repeated_positions(ims):
            sub: dict = {}
            for im in ims:
                sub.setdefault(im.ds.get("AcquisitionNumber", None), []).append(im)
            if len(sub) > 1:
                for acq, sims in sub.items():
                    groups.append(_Group(uid, ("acq", acq), sims))
                continue
        groups.append(_Group(uid, tpi, ims))
    for g in groups:
        times = [t for t in (_acquisition_time(im.ds) for im in g.images) if t is not None]
        g.acq_time = min(times) if len(times) == len(g.images) else None
        g.series_number = g.images[0].ds.get("SeriesNumber", None)
    return groups


def _has_repeated_positions(ims) -> bool:
    keys = {tuple(np.round(im.ipp, 2)) for im in ims}
    return len(keys) < len(ims)


def _round(values, step):
    return tuple(int(round(float(v) / step)) for v in values)


def _geometry_key(g: _Group):
    """Orientation, matrix and pixel spacing shared by all images, or None (mixed: localizer)."""
    keys = set()
    for im in g.images:
        ds = im.ds
        keys.add(
            (
                _round(im.iop, 1e-3),
                int(ds.get("Rows", 0)),
                int(ds.get("Columns", 0)),
                _round(ds.get("PixelSpacing", [0, 0]), 1e-3),
            )
        )
        if len(keys) > 1:
            return None
    return keys.pop()


def _sequence_key(g: _Group):
    ds = g.images[0].ds

    def num(kw):
        v = ds.get(kw, None)
        try:
            return None if v in (None, "") else round(float(v), 2)
        except (TypeError, ValueError):
            return None

    return (
        str(ds.get("ScanningSequence", "")),
        num("RepetitionTime"),
        num("EchoTime"),
        num("FlipAngle"),
    )


def _order_phases(exam_dir, groups: list) -> list:
    """Sorts candidate phase groups in acquisition order (t0 first)."""
    same_series = len({g.series_uid for g in groups}) == 1
    tpis = [g.temporal_position for g in groups]
    if same_series and all(isinstance(t, int) for t in tpis):
        keyfn = lambda g: g.temporal_position  # noqa: E731
    elif all(g.acq_time is not None for g in groups):
        keyfn = lambda g: g.acq_time  # noqa: E731
    elif all(g.series_number not in (None, "") for g in groups):
        keyfn = lambda g: int(g.series_number)  # noqa: E731
    else:
        raise ExamError(
            exam_dir,
            "cannot order the DCE phases: no AcquisitionTime, TemporalPositionIdentifier or "
            "SeriesNumber on every series; give them with --phase_map",
        )
    ordered = sorted(groups, key=keyfn)
    keys = [keyfn(g) for g in ordered]
    if len(set(keys)) != len(keys):
        raise ExamError(
            exam_dir,
            "cannot order the DCE phases: two candidate series share one acquisition time; "
            "give the phases with --phase_map",
        )
    return ordered


def _select_phases(exam_dir, groups: list, options: ReaderOptions) -> list:
    """Picks the four DCE phase groups (heuristics in the module docstring)."""
    candidates = [g for g in groups if len(g.images) >= options.min_slices]
    clusters: dict = {}
    by_sequence: dict = {}
    for g in candidates:
        gk = _geometry_key(g)
        if gk is None:
            continue  # Mixed orientations in one series: a localizer.
        sk = _sequence_key(g)
        clusters.setdefault((gk, sk), []).append(g)
        by_sequence.setdefault(sk, {}).setdefault(gk, []).append(g)
    if not clusters:
        raise ExamError(exam_dir, "no DCE series found: no original image series in the folder")
    best = max(len(v) for v in clusters.values())
    if best < len(PHASES):
        for geos in by_sequence.values():
            if sum(len(v) for v in geos.values()) >= len(PHASES) and len(geos) > 1:
                raise ExamError(
                    exam_dir,
                    "DCE phases on different grids: series with one sequence have "
                    + ", ".join(
                        f"{len(v)} series of {k[1]}x{k[2]} px spacing "
                        f"{k[3][0] / 1e3:g}x{k[3][1] / 1e3:g} mm"
                        for k, v in geos.items()
                    ),
                )
        raise ExamError(
            exam_dir,
            f"no DCE series found: need {len(PHASES)} phases with one geometry and sequence, "
            f"the largest such set has {best} (series found: {len(candidates)})",
        )
    top = [k for k, v in clusters.items() if len(v) == best]
    if len(top) > 1:
        raise ExamError(
            exam_dir,
            f"ambiguous DCE series: {len(top)} sets of {best} series share a geometry and "
            "sequence; give the phases with --phase_map",
        )
    ordered = _order_phases(exam_dir, clusters[top[0]])
    # Protocols with more post-contrast phases: t0 and the first three after it.
    return ordered[: len(PHASES)]


def _override_phases(exam_dir, groups: list, overrides: Mapping[str, str]) -> list:
    phase_to_uid = {}
    for uid, phase in overrides.items():
        if phase not in PHASES:
            raise ExamError(exam_dir, f"phase map gives unknown phase {phase!r}")
        if phase in phase_to_uid:
            raise ExamError(exam_dir, f"phase map gives phase {phase} to two series")
        phase_to_uid[phase] = uid
    missing = [p for p in PHASES if p not in phase_to_uid]
    if missing:
        raise ExamError(exam_dir, f"phase map lacks phase(s) {', '.join(missing)}")
    selected = []
    for phase in PHASES:
        matches = [g for g in groups if g.series_uid == phase_to_uid[phase]]
        if not matches:
            raise ExamError(exam_dir, f"phase map series for {phase} is not in the exam folder")
        if len(matches) > 1:
            raise ExamError(
                exam_dir,
                f"phase map series for {phase} holds several temporal positions; "
                "a multi-phase series cannot be split by the phase map",
            )
        selected.append(matches[0])
    return selected


def _axis_permutation(exam_dir, directions: np.ndarray, max_obliquity_deg: float):
    """Maps array axes with LPS ``directions`` (3x3, one row per axis) to canonical axes.

    Returns:
      (perm, flips): ``np.transpose(vol, perm)`` then flipping canonical axes where ``flips``
      gives (slice->S, row->P, col->L).
    """
    cos_limit = np.cos(np.deg2rad(max_obliquity_deg))
    dominant = np.argmax(np.abs(directions), axis=1)  # LPS index per array axis.
    worst = np.min(np.abs(directions[np.arange(3), dominant]))
    if worst < cos_limit or len(set(dominant.tolist())) != 3:
        angle = np.rad2deg(np.arccos(np.clip(worst, -1.0, 1.0)))
        raise ExamError(
            exam_dir,
            f"oblique acquisition: an image axis is {angle:.1f} degrees from the nearest patient "
            f"axis (limit {max_obliquity_deg:g}); reorientation without resampling is not exact",
        )
    # Canonical axis a points along LPS index target[a]: slice->S(2), row->P(1), col->L(0).
    target = (2, 1, 0)
    perm = tuple(int(np.nonzero(dominant == t)[0][0]) for t in target)
    flips = tuple(bool(directions[perm[a], target[a]] < 0) for a in range(3))
    return perm, flips


def _decode(exam_dir, im: _Image) -> np.ndarray:
    ds = im.ds
    ts = ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ExamError(exam_dir, f"unsupported transfer syntax {ts.name} ({ts})", im.file)
    if not decoder.is_available:
        raise ExamError(
            exam_dir,
            f"pixel data is compressed with {ts.name} ({ts}) and no decoder for it is "
            f"installed; {CODECS_HINT}",
            im.file,
        )
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ExamError(exam_dir, "multi-frame (enhanced) images are not supported", im.file)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ExamError(exam_dir, "colour images are not MR magnitude images", im.file)
    try:
        return ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken pixel data.
        raise ExamError(
            exam_dir, f"unreadable pixel data ({type(e).__name__}: {_first_line(e)})", im.file
        )


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""


def _slice_stack(exam_dir, phase: str, g: _Group, options: ReaderOptions):
    """Sorted images, slice gap and (3,3) axis directions of one phase; checks the grid."""
    iop = g.images[0].iop
    row_dir, col_dir = iop[:3], iop[3:]  # Along a row (col index), along a column (row index).
    normal = np.cross(row_dir, col_dir)
    pos = np.asarray([im.ipp for im in g.images]) @ normal
    order = np.argsort(pos, kind="stable")
    images = [g.images[i] for i in order]
    pos = pos[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise ExamError(exam_dir, f"{phase}: duplicate slice positions in the series")
    gap = float(np.median(gaps))
    if np.any(np.abs(gaps - gap) > options.spacing_tolerance * gap):
        worst = int(np.argmax(np.abs(gaps - gap)))
        kind = "missing slice(s)" if gaps[worst] > gap else "non-uniform slice spacing"
        raise ExamError(
            exam_dir,
            f"{phase}: {kind}: gap of {gaps[worst]:.3g} mm after slice {worst} of "
            f"{len(images)} where the series has {gap:.3g} mm",
        )
    # Slices must stack along the normal (no gantry tilt / shear).
    offsets = np.asarray([im.ipp for im in images]) - images[0].ipp
    lateral = offsets - np.outer(offsets @ normal, normal)
    pixel_spacing = [float(v) for v in images[0].ds.PixelSpacing]
    if np.max(np.linalg.norm(lateral, axis=1)) > 0.5 * min(pixel_spacing):
        raise ExamError(exam_dir, f"{phase}: slices are not stacked along the slice normal")
    directions = np.stack([normal, col_dir, row_dir])
    spacing = (gap, pixel_spacing[0], pixel_spacing[1])
    return images, spacing, directions


def _volume(exam_dir, phase: str, images: list) -> np.ndarray:
    first = images[0].ds
    rows, cols = int(first.Rows), int(first.Columns)
    out = np.empty((len(images), rows, cols), np.float32)
    for k, im in enumerate(images):
        pixels = _decode(exam_dir, im)
        if pixels.shape != (rows, cols):
            raise ExamError(
                exam_dir, f"{phase}: image of {pixels.shape} in a {rows}x{cols} series", im.file
            )
        slope = float(im.ds.get("RescaleSlope", 1) or 1)
        intercept = float(im.ds.get("RescaleIntercept", 0) or 0)
        if slope == 1.0 and intercept == 0.0:
            out[k] = pixels
        else:
            out[k] = pixels.astype(np.float64) * slope + intercept
    return out


def load_exam(
    exam_dir: str,
    phase_overrides: Mapping[str, str] | None = None,
    options: ReaderOptions = ReaderOptions(),
) -> CanonicalExam:
    """Reads the four DCE phases of one exam folder into canonical orientation.

    Args:
      exam_dir: str. Folder holding the exam's DICOM files (any nesting and names).
      phase_overrides: optional mapping SeriesInstanceUID -> phase (``t0``..``t3``) for this
        exam, all four phases given; replaces the phase heuristics. Defaults to None.
      options: ReaderOptions. Tolerances. Defaults to ReaderOptions().

    Returns:
      CanonicalExam with float32 ``(S, H, W)`` volumes for ``t0``..``t3``.

    Raises:
      ExamError: the folder holds no usable DCE acquisition (see ``reason``).
    """
    if not os.path.isdir(exam_dir):
        raise ExamError(exam_dir, "exam folder does not exist")
    images = _read_images(exam_dir)
    if not images:
        raise ExamError(exam_dir, "no DCE series found: no DICOM images in the folder")
    groups = _group_images(images)
    if phase_overrides:
        selected = _override_phases(exam_dir, groups, phase_overrides)
    else:
        selected = _select_phases(exam_dir, groups, options)

    stacks = [_slice_stack(exam_dir, p, g, options) for p, g in zip(PHASES, selected)]
    ref_images, ref_spacing, ref_dirs = stacks[0]
    for phase, (ims, spacing, dirs) in zip(PHASES[1:], stacks[1:]):
        same = (
            len(ims) == len(ref_images)
            and ims[0].ds.Rows == ref_images[0].ds.Rows
            and ims[0].ds.Columns == ref_images[0].ds.Columns
            and np.allclose(dirs, ref_dirs, atol=1e-3)
            and np.allclose(spacing, ref_spacing, rtol=1e-3, atol=1e-3)
            and np.linalg.norm(ims[0].ipp - ref_images[0].ipp) <= 0.5 * min(ref_spacing)
        )
        if not same:
            raise ExamError(
                exam_dir,
                f"DCE phases on different grids: t0 is {len(ref_images)}x"
                f"{ref_images[0].ds.Rows}x{ref_images[0].ds.Columns} at spacing "
                f"{_fmt(ref_spacing)} mm, {phase} is {len(ims)}x{ims[0].ds.Rows}x"
                f"{ims[0].ds.Columns} at spacing {_fmt(spacing)} mm (or shifted/rotated)",
            )

    patient_ids = {str(im.ds.get("PatientID", "")).strip() for g in selected for im in g.images}
    if len(patient_ids) != 1:
        raise ExamError(exam_dir, "the DCE series carry different PatientIDs")
    patient_id = patient_ids.pop()
    if not patient_id:
        raise ExamError(exam_dir, "no PatientID in the DCE series (needed for patient splits)")

    perm, flips = _axis_permutation(exam_dir, ref_dirs, options.max_obliquity_deg)
    volumes = {}
    for phase, (ims, _, _) in zip(PHASES, stacks):
        vol = np.transpose(_volume(exam_dir, phase, ims), perm)
        flip_axes = tuple(a for a in range(3) if flips[a])
        if flip_axes:
            vol = np.flip(vol, flip_axes)
        volumes[phase] = np.ascontiguousarray(vol)
    spacing = tuple(float(ref_spacing[perm[a]]) for a in range(3))
    return CanonicalExam(volumes=volumes, spacing=spacing, patient_id=patient_id)


def _fmt(spacing: Iterable[float]) -> str:
    return "x".join(f"{s:.3g}" for s in spacing)
