"""Frames of Enhanced MR / Legacy Converted Enhanced MR objects -> one image per frame.

Geometry and rescale from each frame's functional groups (`dicom_multiframe`), else the shared
ones; the temporal position from TemporalPositionIndex, else FrameAcquisitionDateTime, else the
temporal DimensionIndexValues entry; never from frame order.
"""

from __future__ import annotations

import struct

import numpy as np

from tfrecords_tools import dicom_multiframe
from tfrecords_tools.dicom_header import (
    T_ACQ_DATETIME,
    T_COLUMNS,
    T_ECHO_PULSE_SEQUENCE,
    T_FLIP,
    T_IMAGE_TYPE,
    T_NUMBER_OF_FRAMES,
    T_PATIENT_ID,
    T_ROWS,
    T_SCANNING_SEQUENCE,
    T_SERIES_NUMBER,
    T_SERIES_UID,
    T_SOP_INSTANCE_UID,
    T_TE,
    T_TR,
    ExamError,
    Image,
    Seen,
    acquisition_time,
    dicom_datetime_text,
    number,
    rounded,
    skip_kind,
    text,
    us,
)


def parse_frames(exam_dir: str, rel: str, ds, seen: Seen) -> list:
    """One `Image` per original frame of an Enhanced MR / Legacy Converted Enhanced MR object.

    Position, orientation, spacing and rescale come from the frame's functional groups, else
    the shared ones; the phase from the frame's TemporalPositionIndex, else its
    FrameAcquisitionDateTime, else the DimensionIndexValues entry the DimensionIndexSequence
    declares temporal; never from frame order.
    """
    implicit, little = getattr(ds, "original_encoding", (False, True))
    if little is False:
        raise ExamError(exam_dir, "big-endian multi-frame objects are not supported", rel)
    try:
        shared = dicom_multiframe.shared_header(ds, bool(implicit))
        frames = dicom_multiframe.frame_headers(ds, shared, bool(implicit))
    except (ValueError, struct.error, IndexError) as e:  # The message may quote header text.
        raise ExamError(
            exam_dir,
            f"malformed functional groups in a multi-frame object ({type(e).__name__})",
            rel,
        ) from None
    count = int(number(ds, T_NUMBER_OF_FRAMES, 0) or 0)
    if count != len(frames):
        raise ExamError(
            exam_dir,
            f"multi-frame object with {count} frames has {len(frames)} items in "
            "PerFrameFunctionalGroupsSequence",
            rel,
        )
    for what, value, group in (
        ("position", frames.ipp, "PlanePositionSequence"),
        ("orientation", frames.iop, "PlaneOrientationSequence"),
        ("pixel spacing", frames.pixel_spacing, "PixelMeasuresSequence"),
    ):
        if value is None:
            raise ExamError(
                exam_dir,
                f"multi-frame object without a {what} for every frame ({group} "
                "missing from the per-frame and shared functional groups)",
                rel,
            )
    image_type = text(ds, T_IMAGE_TYPE)
    kinds: dict = {}  # Frames share a few FrameType values: classify each value once.
    keep = []
    for i, frame_type in enumerate(frames.frame_type):
        frame_type = frame_type or image_type
        if frame_type not in kinds:
            kinds[frame_type] = skip_kind(frame_type)
        kind = kinds[frame_type]
        if kind:
            setattr(seen, kind, getattr(seen, kind) + 1)
        else:
            keep.append(i)
    seen.original += len(keep)
    if not keep:
        return []
    phases, times = _frame_phases(exam_dir, rel, frames, keep, shared.temporal_dimension)
    file_time = dicom_datetime_text(text(ds, T_ACQ_DATETIME)) or acquisition_time(ds)
    series_number = number(ds, T_SERIES_NUMBER)
    scanning = (
        text(ds, T_SCANNING_SEQUENCE)
        or shared.sequence[0]
        or _ECHO_PULSE.get((text(ds, T_ECHO_PULSE_SEQUENCE) or "").upper(), "")
    )
    tr, te, flip = shared.sequence[1:]
    sequence = (
        scanning,
        rounded(number(ds, T_TR) if tr is None else tr),
        rounded(number(ds, T_TE) if te is None else te),
        rounded(number(ds, T_FLIP) if flip is None else flip),
    )
    common = dict(
        ds=ds,
        file=rel,
        series_uid=text(ds, T_SERIES_UID) or "",
        sop_uid=text(ds, T_SOP_INSTANCE_UID) or "",
        acquisition_number=None,
        trigger_time=None,
        series_number=None if series_number is None else int(series_number),
        rows=us(ds, T_ROWS),
        cols=us(ds, T_COLUMNS),
        sequence=sequence,
        patient_id=(text(ds, T_PATIENT_ID) or "").strip(),
        frames_cache={},
    )
    spacings = [tuple(row) for row in frames.pixel_spacing[keep].tolist()]
    slopes = frames.slope[keep].tolist()
    intercepts = frames.intercept[keep].tolist()
    return [
        Image(
            iop=frames.iop[i],
            ipp=frames.ipp[i],
            temporal_position=phase,
            acq_time=file_time if time is None else time,
            pixel_spacing=spacing,
            slope=slope or 1.0,
            intercept=intercept,
            frame=i,
            **common,
        )
        for i, phase, time, spacing, slope, intercept in zip(
            keep, phases, times, spacings, slopes, intercepts
        )
    ]


# EchoPulseSequence (Enhanced MR) -> the ScanningSequence a single-frame image would carry, so
# that phases stored either way share one sequence key.
_ECHO_PULSE = {"GRADIENT": "GR", "SPIN": "SE", "BOTH": "SE\\GR"}


def _frame_phases(exam_dir, rel, frames, keep: list, temporal_dimension) -> tuple:
    """Temporal position and acquisition time of each kept frame of one object.

    Returns:
      (positions, times): per kept frame, an int (TemporalPositionIndex or the temporal
      dimension's index value), a ("time", datetime) for phases told by
      FrameAcquisitionDateTime, or None (the object holds one phase); and its datetime or None.

    Raises:
      ExamError: a temporal index missing on some frames, or repeated at one position.
    """
    n = len(keep)
    parsed: dict = {}  # Frames of one phase often share one datetime: parse each text once.
    times = []
    for i in keep:
        text = frames.acquisition_datetime[i]
        if text not in parsed:
            parsed[text] = dicom_datetime_text(text)
        times.append(parsed[text])
    slices = [tuple(row) for row in np.round(frames.ipp[keep], 2).tolist()]
    tpis = [frames.temporal_index[i] for i in keep]
    k = temporal_dimension
    source, keys = None, [None] * n
    if any(t is not None for t in tpis):
        source, keys = "TemporalPositionIndex", tpis
    elif all(t is not None for t in times):
        source, keys = "FrameAcquisitionDateTime", _phases_by_time(exam_dir, rel, slices, times)
    elif k is not None:  # Decoded only here: most objects never need them.
        dims = [frames.dimension_values[i] for i in keep]
        if any(d is not None and len(d) > k for d in dims):
            source = "temporal DimensionIndexValues"
            keys = [d[k] if d is not None and len(d) > k else None for d in dims]
    missing = sum(key is None for key in keys)
    if source and missing:
        raise ExamError(
            exam_dir, f"multi-frame object: {source} missing in {missing} of {n} frames", rel
        )
    seen = set()
    for key, where in zip(keys, slices):
        if (key, where) in seen:
            if source is None:
                dated = sum(t is not None for t in times)
                why = (
                    f"FrameAcquisitionDateTime missing in {n - dated} of {n} frames, no "
                    "TemporalPositionIndex or temporal dimension"
                    if dated
                    else "no TemporalPositionIndex, FrameAcquisitionDateTime or temporal dimension"
                )
                raise ExamError(
                    exam_dir,
                    "multi-frame object holds several frames at one slice position "
                    f"and nothing tells its phases apart ({why})",
                    rel,
                )
            shown = key if isinstance(key, int) else "one value"
            raise ExamError(
                exam_dir,
                f"multi-frame object: {source} {shown} repeated at one slice "
                "position (two frames for one phase and slice)",
                rel,
            )
        seen.add((key, where))
    return keys, times


def _phases_by_time(exam_dir, rel, slices: list, times: list) -> list:
    """Phases of frames told apart by acquisition time: the k-th time at each slice position.

    Slices of one phase may be acquired at different times (2D, or k-space order), so times
    are compared only between the frames of one position. Each phase is named by its first
    frame's time, so phases of several objects of one series order by time.
    """
    if len(set(slices)) == len(slices):  # One phase (one frame per position).
        return [("time", min(times))] * len(times)
    by_slice: dict = {}
    for j, (where, t) in enumerate(zip(slices, times)):
        by_slice.setdefault(where, []).append((t, j))
    counts = {len(v) for v in by_slice.values()}
    if len(counts) > 1:
        raise ExamError(
            exam_dir,
            f"multi-frame object: slice positions hold {min(counts)} to {max(counts)} "
            "frames (FrameAcquisitionDateTime tells phases apart only if every position has "
            "one frame per phase)",
            rel,
        )
    rank = [0] * len(times)
    for members in by_slice.values():
        members.sort()
        for r, (t, j) in enumerate(members):
            if r and t == members[r - 1][0]:
                raise ExamError(
                    exam_dir,
                    "multi-frame object: FrameAcquisitionDateTime repeated at one "
                    "slice position (two frames for one phase and slice)",
                    rel,
                )
            rank[j] = r
    first = {}
    for r, t in zip(rank, times):
        first[r] = min(first.get(r, t), t)
    return [("time", first[r]) for r in rank]
