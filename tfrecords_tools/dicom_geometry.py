"""Geometry of the selected phases: slice order, voxel grids and reorientation.

Sorts each phase's slices along the slice normal and checks the spacing, places the two
per-breast series of a unilateral protocol on one grid without resampling, and maps the
stored axes to the canonical (slice -> S, row -> P, col -> L) by permutation and flips.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from tfrecords_tools.dicom_header import ExamError, ReaderOptions
from tfrecords_tools.dicom_phases import Group


def close(a, b, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """``np.allclose`` for a few numbers, without its per-call cost."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def _cross(a, b) -> np.ndarray:
    """Cross product of two 3-vectors (np.cross costs 20x more for one pair)."""
    return np.array(
        [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
    )


def _slice_stack(exam_dir, phase: str, g: Group, options: ReaderOptions):
    """Sorted images, slice gap and (3,3) axis directions of one phase; checks the grid."""
    iop = g.images[0].iop
    row_dir, col_dir = iop[:3], iop[3:]  # Along a row (col index), along a column (row index).
    normal = _cross(row_dir, col_dir)
    ipps = np.asarray([im.ipp for im in g.images])
    pos = ipps @ normal
    order = np.argsort(pos, kind="stable")
    images = [g.images[i] for i in order]
    pos = pos[order]
    ipps = ipps[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise ExamError(exam_dir, f"{phase}: duplicate slice positions in the series")
    # The smallest gap is the slice spacing: a missing slice only ever makes a gap larger.
    gap = float(gaps.min())
    if np.any(gaps - gap > options.spacing_tolerance * gap):
        worst = int(np.argmax(gaps))
        ratio = gaps[worst] / gap
        whole = abs(ratio - round(ratio)) <= options.spacing_tolerance * round(ratio)
        kind = "missing slice(s)" if whole else "non-uniform slice spacing"
        raise ExamError(
            exam_dir,
            f"{phase}: {kind}: gap of {gaps[worst]:.3g} mm after slice {worst} of "
            f"{len(images)} where the series has {gap:.3g} mm",
        )
    # Slices must stack along the normal (no gantry tilt / shear).
    offsets = ipps - ipps[0]
    lateral = offsets - np.outer(offsets @ normal, normal)
    pixel_spacing = list(images[0].pixel_spacing)
    if np.max(np.linalg.norm(lateral, axis=1)) > 0.5 * min(pixel_spacing):
        raise ExamError(exam_dir, f"{phase}: slices are not stacked along the slice normal")
    directions = np.stack([normal, col_dir, row_dir])
    spacing = (float(np.mean(gaps)), pixel_spacing[0], pixel_spacing[1])
    return images, spacing, directions


@dataclasses.dataclass
class Grid:
    """The voxel grid of one phase in stored axes (slice, row, col) and the images filling it.

    Attributes:
      parts: list of (sorted images, (slice, row, col) index of their first voxel): one part,
        or one per breast for unilateral series.
      shape: (slices, rows, cols).
      spacing: (slice, row, col) spacing in mm.
      directions: (3, 3) LPS direction of each stored axis.
      origin: (3,) LPS position of voxel (0, 0, 0).
    """

    parts: list
    shape: tuple
    spacing: tuple
    directions: np.ndarray
    origin: np.ndarray


def phase_grid(exam_dir, phase: str, parts: tuple, options: ReaderOptions) -> Grid:
    """The grid of one phase: its one stack, or its per-breast stacks side by side.

    Per-breast series are placed on one grid without resampling: same orientation and
    spacing, offset by whole voxels, not overlapping; the gap between them stays zero.
    """
    stacks = [_slice_stack(exam_dir, phase, g, options) for g in parts]
    images, spacing, directions = stacks[0]
    first = images[0]
    if len(stacks) == 1:
        return Grid(
            [(images, (0, 0, 0))],
            (len(images), first.rows, first.cols),
            spacing,
            directions,
            first.ipp,
        )
    (other, other_spacing, other_dirs) = stacks[1]
    why = None
    if not close(other_dirs, directions, atol=1e-3):
        why = "are oriented differently"
    elif not close(other_spacing, spacing, rtol=1e-3, atol=1e-3):
        why = f"have different voxel spacing ({fmt(spacing)} and {fmt(other_spacing)} mm)"
    steps = (other[0].ipp - first.ipp) @ directions.T / np.asarray(spacing)  # In voxels.
    if why is None and np.max(np.abs(steps - np.rint(steps))) > 0.05:
        why = "are offset by a fraction of a voxel"
    if why is not None:
        raise ExamError(
            exam_dir,
            f"{phase}: the two per-breast (unilateral) series {why}: assembling one bilateral "
            "volume would need resampling",
        )
    steps = np.rint(steps).astype(int)
    sizes = [
        np.array([len(images), first.rows, first.cols]),
        np.array([len(other), other[0].rows, other[0].cols]),
    ]
    low = np.minimum(0, steps)
    high = np.maximum(sizes[0], steps + sizes[1])
    starts = [-low, steps - low]
    overlap = np.minimum(starts[0] + sizes[0], starts[1] + sizes[1]) - np.maximum(*starts)
    if np.all(overlap > 0):
        raise ExamError(
            exam_dir,
            f"{phase}: the two per-breast (unilateral) series overlap; assembling one "
            "bilateral volume would need resampling or a choice between them",
        )
    origin = first.ipp + (low * np.asarray(spacing)) @ directions
    return Grid(
        [(images, tuple(int(v) for v in starts[0])), (other, tuple(int(v) for v in starts[1]))],
        tuple(int(v) for v in high - low),
        spacing,
        directions,
        origin,
    )


def axis_permutation(exam_dir, directions: np.ndarray, max_obliquity_deg: float):
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


def fmt(values: Iterable[float], form: str = ".3g") -> str:
    return "x".join(f"{v:{form}}" for v in values)
