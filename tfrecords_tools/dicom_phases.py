"""Candidate images -> series groups -> the four DCE phases, with reasons when none fit.

Groups images by series and temporal position, clusters the groups by geometry and sequence,
recognises unilateral (per-breast) protocols, orders phases by acquisition (``t0`` first) and
applies a phase map when one is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from tfrecords_tools import schema
from tfrecords_tools.dicom_header import ExamError, Image, ReaderOptions, Seen

PHASES = schema.PHASES


@dataclasses.dataclass
class Group:
    series_uid: str
    temporal_position: object
    images: list
    acq_time: object = None  # datetime or None
    series_number: object = None


def group_images(images: Sequence[Image]) -> list:
    """Groups images by series and temporal position (one group = one candidate phase)."""
    by_key: dict = {}
    for im in images:
        by_key.setdefault((im.series_uid, im.temporal_position), []).append(im)
    groups = []
    for (uid, tpi), ims in by_key.items():
        # A multi-phase series without TemporalPositionIdentifier: repeated positions told apart
        # by AcquisitionNumber, TriggerTime or AcquisitionTime, whichever splits the series
        # into stacks without repeated positions.
        if tpi is None and _has_repeated_positions(ims):
            split = _split_repeated(ims)
            if split is not None:
                groups += [Group(uid, key, sims) for key, sims in split]
                continue
        groups.append(Group(uid, tpi, ims))
    for g in groups:
        times = [im.acq_time for im in g.images if im.acq_time is not None]
        g.acq_time = min(times) if len(times) == len(g.images) else None
        g.series_number = g.images[0].series_number
    return groups


def _split_repeated(ims):
    """Splits a series with repeated slice positions into per-phase stacks, or None."""
    for name, keyfn in (
        ("acquisition", lambda im: im.acquisition_number),
        ("trigger", lambda im: im.trigger_time),
        ("time", lambda im: im.acq_time),
    ):
        sub: dict = {}
        for im in ims:
            sub.setdefault(keyfn(im), []).append(im)
        if (
            len(sub) > 1
            and None not in sub
            and not any(_has_repeated_positions(v) for v in sub.values())
        ):
            return [((name, k), v) for k, v in sub.items()]
    return None


def _has_repeated_positions(ims) -> bool:
    keys = {tuple(np.round(im.ipp, 2)) for im in ims}
    return len(keys) < len(ims)


def _round(values, step):
    return tuple(int(round(float(v) / step)) for v in values)


def _geometry_key(g: Group):
    """Orientation, matrix and pixel spacing shared by all images, or None (mixed: localizer)."""
    exact = {(im.iop.tobytes(), im.rows, im.cols, im.pixel_spacing) for im in g.images}
    if len(exact) == 1:  # The usual case, without rounding every image.
        im = g.images[0]
        return (_round(im.iop, 1e-3), im.rows, im.cols, _round(im.pixel_spacing, 1e-3))
    keys = {
        (_round(im.iop, 1e-3), im.rows, im.cols, _round(im.pixel_spacing, 1e-3)) for im in g.images
    }
    return keys.pop() if len(keys) == 1 else None


def _sequence_key(g: Group):
    return g.images[0].sequence


def _order_phases(exam_dir, groups: list) -> list:
    """Sorts candidate phase groups in acquisition order (t0 first)."""
    same_series = len({g.series_uid for g in groups}) == 1
    tpis = [g.temporal_position for g in groups]
    if same_series and all(isinstance(t, int) for t in tpis):
        keyfn = lambda g: g.temporal_position  # noqa: E731
    elif (
        same_series and all(isinstance(t, tuple) for t in tpis) and len({t[0] for t in tpis}) == 1
    ):  # Split by AcquisitionNumber / TriggerTime / AcquisitionTime.
        keyfn = lambda g: g.temporal_position[1]  # noqa: E731
    elif all(g.acq_time is not None for g in groups):
        keyfn = lambda g: g.acq_time  # noqa: E731
    elif all(g.series_number is not None for g in groups):
        keyfn = lambda g: g.series_number  # noqa: E731
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


def select_phases(exam_dir, groups: list, options: ReaderOptions, seen: Seen) -> list:
    """Picks the four DCE phases (heuristics in the `dicom_reader` docstring).

    Returns:
      Per phase ``t0``..``t3`` a tuple of groups: one series (or temporal position), or the
      two per-breast series of a unilateral protocol.
    """
    candidates = [g for g in groups if len(g.images) >= options.min_slices]
    clusters: dict = {}
    by_sequence: dict = {}
    mixed = []  # Multi-frame phases whose frames differ in geometry.
    for g in candidates:
        gk = _geometry_key(g)
        if gk is None:
            if any(im.frame is not None for im in g.images):
                mixed.append(g)
            continue  # Mixed orientations in one series: a localizer.
        sk = _sequence_key(g)
        clusters.setdefault((gk, sk), []).append(g)
        by_sequence.setdefault(sk, {}).setdefault(gk, []).append(g)
    try:
        selected = _select_from_clusters(exam_dir, clusters, by_sequence, candidates, seen)
    except ExamError:
        if mixed:
            raise _mixed_geometry_error(exam_dir, mixed[0]) from None
        raise
    uids = {g.series_uid for phase in selected for g in phase}
    for g in mixed:
        if g.series_uid in uids:
            raise _mixed_geometry_error(exam_dir, g)
    return selected


def _mixed_geometry_error(exam_dir, g: Group) -> ExamError:
    kinds = [
        name
        for name, values in (
            ("orientation", {_round(im.iop, 1e-3) for im in g.images}),
            ("pixel spacing", {_round(im.pixel_spacing, 1e-3) for im in g.images}),
            ("matrix", {(im.rows, im.cols) for im in g.images}),
        )
        if len(values) > 1
    ]
    return ExamError(
        exam_dir,
        f"frames of different geometry in one phase of a multi-frame series: they differ in "
        f"{' and '.join(kinds)} (reading them as one volume would need resampling)",
        g.images[0].file,
    )


def _select_from_clusters(exam_dir, clusters, by_sequence, candidates, seen: Seen) -> list:
    if not clusters:
        raise ExamError(
            exam_dir, f"no DCE series found: no original image series; {seen.summary()}"
        )
    best = max(len(v) for v in clusters.values())
    top = [k for k, v in clusters.items() if len(v) == best]
    if best >= len(PHASES):
        # Unilateral protocols: each breast its own series per phase, so two locations of
        # one sequence (one cluster, or two when the breasts' matrices differ).
        for sk in {k[1] for k in top}:
            groups = [
                g for k, v in clusters.items() if k[1] == sk and len(v) >= len(PHASES) for g in v
            ]
            if len(groups) < 2 * len(PHASES):
                continue  # Not enough series for two sides.
            pairs = _lateral_pairs(exam_dir, groups)
            if pairs is not None:
                return pairs[: len(PHASES)]
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
            f"the largest such set has {best} (series found: {len(candidates)}); "
            f"{seen.summary()}",
        )
    if len(top) > 1:
        raise ExamError(
            exam_dir,
            f"ambiguous DCE series: {len(top)} sets of {best} series share a geometry and "
            "sequence; give the phases with --phase_map",
        )
    ordered = _order_phases(exam_dir, clusters[top[0]])
    # Protocols with more post-contrast phases: t0 and the first three after it.
    return [(g,) for g in ordered[: len(PHASES)]]


def _extent(g: Group) -> np.ndarray:
    """``(2, 3)`` LPS bounding box (min, max) of the voxel centres of a group."""
    im = g.images[0]
    pos = np.asarray([x.ipp for x in g.images])
    across = im.iop[:3] * (im.cols - 1) * im.pixel_spacing[1]
    down = im.iop[3:] * (im.rows - 1) * im.pixel_spacing[0]
    corners = np.concatenate([pos, pos + across, pos + down, pos + across + down])
    return np.stack([corners.min(axis=0), corners.max(axis=0)])


def _lateral_pairs(exam_dir, groups: list) -> list | None:
    """Pairs the per-breast series of a unilateral protocol phase by phase, or None.

    Applies when the groups sit at exactly two locations, each holding at least four phases,
    one toward the patient's right and one toward the left (separated along L-R). Each side's
    phases are ordered on their own and paired in that order (right, left).
    """
    locations: list = []
    for g in groups:
        box = _extent(g)
        for loc in locations:
            if np.max(np.abs(loc[0] - box)) <= 1.0:
                loc[1].append(g)
                break
        else:
            locations.append((box, [g]))
    if len(locations) != 2 or min(len(v) for _, v in locations) < len(PHASES):
        return None
    (box_a, side_a), (box_b, side_b) = sorted(locations, key=lambda loc: loc[0][:, 0].mean())
    centre_shift = np.abs(box_b.mean(axis=0) - box_a.mean(axis=0))
    if np.argmax(centre_shift) != 0:
        return None  # Not side by side along L-R: two other acquisitions.
    overlap = box_a[1, 0] - box_b[0, 0]
    if (
        overlap > -0.01
        and np.all(box_a[1, 1:] >= box_b[0, 1:])
        and np.all(box_b[1, 1:] >= box_a[0, 1:])
    ):
        raise ExamError(
            exam_dir,
            f"unilateral series (one per breast and phase) overlap by {overlap:.3g} mm across "
            "the midline; assembling one bilateral volume would need resampling or a choice "
            "between them",
        )
    right = _order_phases(exam_dir, side_a)
    left = _order_phases(exam_dir, side_b)
    return list(zip(right, left))


def override_phases(exam_dir, groups: list, overrides: Mapping[str, str]) -> list:
    """The phases a phase map names: one series per phase, or two (one per breast) for all."""
    phase_to_uids: dict = {}
    for uid, phase in overrides.items():
        if phase not in PHASES:
            raise ExamError(exam_dir, f"phase map gives unknown phase {phase!r}")
        phase_to_uids.setdefault(phase, []).append(uid)
    counts = {len(v) for v in phase_to_uids.values()}
    if max(counts) > 2 or len(counts) > 1:
        phase = max(phase_to_uids, key=lambda p: len(phase_to_uids[p]))
        raise ExamError(
            exam_dir,
            f"phase map gives phase {phase} to two series or more: give one series per phase, "
            "or two (one per breast) for every phase",
        )
    missing = [p for p in PHASES if p not in phase_to_uids]
    if missing:
        raise ExamError(exam_dir, f"phase map lacks phase(s) {', '.join(missing)}")
    selected = []
    for phase in PHASES:
        parts = []
        for key in phase_to_uids[phase]:
            uid, _, position = key.partition(":")
            matches = [g for g in groups if g.series_uid == uid]
            if position:  # "UID:N" picks TemporalPositionIdentifier N of a multi-phase series.
                matches = [g for g in matches if str(g.temporal_position) == position.strip()]
            if not matches:
                raise ExamError(
                    exam_dir,
                    f"phase map series for {phase} is not in the exam folder"
                    + (f" (or has no temporal position {position})" if position else ""),
                )
            if len(matches) > 1:
                raise ExamError(
                    exam_dir,
                    f"phase map series for {phase} holds several temporal positions; give one "
                    "with the phase map's temporal_position column",
                )
            parts.append(matches[0])
        selected.append(tuple(parts))
    return selected
