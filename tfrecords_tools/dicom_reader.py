"""Reads one DCE-MRI exam folder into canonical volumes (the contract in DESIGN.md).

``load_exam(exam_dir)`` walks the folder (any nesting, any file names), skips files that are not
DICOM, groups the images into series (and into temporal positions inside a multi-phase series),
drops localizers, derived/subtraction images and series whose geometry or sequence differs from
the DCE acquisition, orders the DCE phases by acquisition time (``t0`` first), sorts slices by
ImagePositionPatient projected on the slice normal, applies RescaleSlope/Intercept per slice and
reorients each volume by axis permutation and flips only to the canonical axes
``(slice, row, col)`` = (toward Superior, toward Posterior, toward patient Left).

Enhanced MR and Legacy Converted Enhanced MR objects (multi-frame) are read frame by frame:
each frame becomes an image like a single-frame slice, placed by its PlanePositionSequence,
with orientation, pixel spacing and rescale from its own functional groups or else the shared
ones (`dicom_multiframe`), and a temporal position from its TemporalPositionIndex, else its
FrameAcquisitionDateTime (the k-th time at each slice position is phase k), else the
DimensionIndexValues entry that the DimensionIndexSequence declares temporal; never from frame
order. From there frames take the same path as single-frame images (grouping, phase order,
slice order, volume), so one file holding every phase, one file per phase and a mix with
single-frame series all read alike; an object's pixels are decoded once, by the same codec path.

Unilateral protocols (each breast its own series per phase, usually sagittal) are recognised
as two locations side by side along the patient's left-right axis, each holding the phases;
each side's phases are ordered on their own and paired, and each pair is placed on one
bilateral grid without resampling (same orientation and spacing, whole-voxel offset, no
overlap; the gap stays zero), or refused with a reason saying resampling would be needed.

Archive export debris is tolerated: files are found under any name (also without the DICOM
preamble), links to folders are followed, non-DICOM files, zero-byte files and dangling links
are skipped, and an exact copy of an image (same SOPInstanceUID and position) counts once.
MONOCHROME1 (inverted grey scale) images are rejected rather than read inverted.

Each file is read once, completely: grouping uses the headers already in memory and only the
pixels of the selected series are decoded.

Every problem raises ``ExamError`` whose ``reason`` names the problem without any header text or
file name (safe for logs); ``str(error)`` adds the exam folder and, where one is to blame, the
file. When no DCE series is found, the reason counts what the folder held (series, original
images, images skipped as DERIVED or localizer, objects of other SOP classes, non-DICOM files).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from tfrecords_tools import schema
from tfrecords_tools.dicom_files import (
    head_is_bare_dicom,
    list_files,
    looks_like_bare_dicom,
    read_images,
)
from tfrecords_tools.dicom_geometry import axis_permutation, close, fmt, phase_grid
from tfrecords_tools.dicom_header import MULTIFRAME_SOP_CLASSES, ExamError, ReaderOptions, Seen
from tfrecords_tools.dicom_phases import group_images, override_phases, select_phases
from tfrecords_tools.dicom_pixels import CODECS_HINT, grid_volume, stored_dtype

__all__ = [
    "CODECS_HINT",
    "MULTIFRAME_SOP_CLASSES",
    "PHASES",
    "CanonicalExam",
    "ExamError",
    "ReaderOptions",
    "head_is_bare_dicom",
    "list_files",
    "load_exam",
    "looks_like_bare_dicom",
]

PHASES = schema.PHASES


@dataclasses.dataclass(frozen=True)
class CanonicalExam:
    """One exam in canonical orientation.

    Attributes:
      volumes: dict phase -> ``(S, H, W)`` array; slice toward Superior, row toward Posterior,
        col toward patient Left. All phases share one grid and one dtype: float32 voxel values
        (stored value x RescaleSlope + RescaleIntercept), or, when ``rescale`` is set, the
        DICOM's stored int16/uint16 values.
      spacing: (slice, row, col) voxel spacing in mm.
      patient_id: raw DICOM PatientID, only for pseudonymisation; never write it anywhere.
      rescale: None (volumes are voxel values), or dict phase -> (slope, intercept) with
        voxel values ``schema.voxel_values(volumes[phase], slope, intercept)``.
    """

    volumes: dict
    spacing: tuple
    patient_id: str = dataclasses.field(repr=False)
    rescale: dict | None = None

    def voxel_values(self, phase: str) -> np.ndarray:
        """float32 voxel values of ``phase`` (whichever form ``volumes`` holds)."""
        if self.rescale is None:
            return self.volumes[phase]
        return schema.voxel_values(self.volumes[phase], *self.rescale[phase])

    @property
    def shape(self) -> tuple:
        return tuple(self.volumes[PHASES[0]].shape)


def load_exam(
    exam_dir: str,
    phase_overrides: Mapping[str, str] | None = None,
    options: ReaderOptions = ReaderOptions(),
    keep_stored: bool = False,
) -> CanonicalExam:
    """Reads the four DCE phases of one exam folder into canonical orientation.

    Args:
      exam_dir: str. Folder holding the exam's DICOM files (any nesting and names).
      phase_overrides: optional mapping SeriesInstanceUID -> phase (``t0``..``t3``) for this
        exam, all four phases given, each to one series or each to two (the per-breast series
        of a unilateral protocol); replaces the phase heuristics. A key
        ``"<SeriesInstanceUID>:<N>"`` picks TemporalPositionIdentifier N of a multi-phase
        series (or TemporalPositionIndex N of an Enhanced MR series). Defaults to None.
      options: ReaderOptions. Tolerances. Defaults to ReaderOptions().
      keep_stored: bool. Return the DICOM's stored integers and each phase's rescale instead
        of voxel values where that is exact (see ``CanonicalExam``). Defaults to False.

    Returns:
      CanonicalExam with ``(S, H, W)`` volumes for ``t0``..``t3``: float32 voxel values, or
      with ``keep_stored`` int16/uint16 stored values and ``rescale`` where possible.

    Raises:
      ExamError: the folder holds no usable DCE acquisition (see ``reason``).
    """
    if os.path.isfile(exam_dir):
        raise ExamError(
            exam_dir,
            "is a file, not an exam folder (give the folder holding the exam's DICOM series)",
        )
    if not os.path.isdir(exam_dir):
        raise ExamError(exam_dir, "exam folder does not exist")
    seen = Seen()
    images = read_images(exam_dir, seen)
    if not images:
        what = "no DICOM images in the folder" if not seen.series else "no original images"
        raise ExamError(exam_dir, f"no DCE series found: {what}; {seen.summary()}")
    groups = group_images(images)
    if phase_overrides:
        selected = override_phases(exam_dir, groups, phase_overrides)
    else:
        selected = select_phases(exam_dir, groups, options, seen)

    grids = [phase_grid(exam_dir, p, parts, options) for p, parts in zip(PHASES, selected)]
    ref = grids[0]
    for phase, grid in zip(PHASES[1:], grids[1:]):
        same = (
            grid.shape == ref.shape
            and close(grid.directions, ref.directions, atol=1e-3)
            and close(grid.spacing, ref.spacing, rtol=1e-3, atol=1e-3)
            and np.linalg.norm(grid.origin - ref.origin) <= 0.5 * min(ref.spacing)
        )
        if not same and grid.shape[0] != ref.shape[0]:
            raise ExamError(
                exam_dir,
                f"DCE phases on different grids: {phase} has {grid.shape[0]} slices, t0 has "
                f"{ref.shape[0]} (slices missing at one end, or another coverage)",
            )
        if not same:
            raise ExamError(
                exam_dir,
                f"DCE phases on different grids: t0 is {fmt(ref.shape, 'd')} at spacing "
                f"{fmt(ref.spacing)} mm, {phase} is {fmt(grid.shape, 'd')} at spacing "
                f"{fmt(grid.spacing)} mm (or shifted/rotated)",
            )

    patient_ids = {im.patient_id for parts in selected for g in parts for im in g.images}
    if len(patient_ids) != 1:
        raise ExamError(exam_dir, "the DCE series carry different PatientIDs")
    patient_id = patient_ids.pop()
    if not patient_id and options.require_patient_id:
        raise ExamError(exam_dir, "no PatientID in the DCE series (needed for patient splits)")

    perm, flips = axis_permutation(exam_dir, ref.directions, options.max_obliquity_deg)
    decoded, rescale = {}, {}
    for phase, grid in zip(PHASES, grids):
        decoded[phase], rescale[phase] = grid_volume(exam_dir, phase, grid, keep_stored)
    dtype = stored_dtype(decoded, rescale) if keep_stored else None
    volumes = {}
    for phase in PHASES:
        if dtype is not None:
            vol = decoded.pop(phase).astype(dtype, copy=False)
        elif rescale[phase] is not None:
            vol = schema.voxel_values(decoded.pop(phase), *rescale[phase])
        else:
            vol = decoded.pop(phase)
        vol = np.transpose(vol, perm)
        flip_axes = tuple(a for a in range(3) if flips[a])
        if flip_axes:
            vol = np.flip(vol, flip_axes)
        volumes[phase] = np.ascontiguousarray(vol)
    spacing = tuple(float(ref.spacing[perm[a]]) for a in range(3))
    return CanonicalExam(
        volumes=volumes,
        spacing=spacing,
        patient_id=patient_id,
        rescale=dict(rescale) if dtype is not None else None,
    )
