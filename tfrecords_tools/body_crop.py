"""Cropping an exam to the body's bounding box at conversion (``--crop_to_body``).

Air around the patient is a large part of a breast MRI field of view; it costs bytes on disk,
CPU to read and decode, and accelerator FLOPs, and carries nothing. The box is found on the
voxel values of all phases together: a voxel is body when any phase exceeds
``threshold`` x the 99th percentile of the exam; the box is the extent of body voxels along
slices and rows plus ``margin`` voxels, and along cols **symmetric about the image centre**,
so the midline stays at W/2 and the left breast (col > W/2 in canonical orientation) stays on
its side: labels are unaffected. An exam with no body voxel is kept whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DEFAULT_THRESHOLD = 0.05
DEFAULT_MARGIN = 4


def body_box(
    values: Mapping[str, np.ndarray],
    threshold: float = DEFAULT_THRESHOLD,
    margin: int = DEFAULT_MARGIN,
) -> tuple[slice, slice, slice]:
    """The body's bounding box of one exam.

    Args:
      values: mapping phase -> ``(S, H, W)`` voxel values (any real dtype; one shape).
      threshold: float. Body = above this fraction of the exam's 99th percentile (of the
        voxel-wise maximum over phases). Defaults to 0.05.
      margin: int. Voxels kept around the box on every side. Defaults to 4.

    Returns:
      ``(slices, rows, cols)`` as Python slices; cols symmetric about ``W / 2``.
    """
    stack = np.max(np.stack([np.asarray(v, np.float32) for v in values.values()]), axis=0)
    s, h, w = stack.shape
    high = float(np.percentile(stack, 99.0))
    low = float(stack.min())
    body = stack > low + threshold * (high - low)
    if high <= low or not body.any():
        return slice(0, s), slice(0, h), slice(0, w)

    def extent(axis_any, n):
        idx = np.flatnonzero(axis_any)
        return max(0, int(idx[0]) - margin), min(n, int(idx[-1]) + 1 + margin)

    s0, s1 = extent(body.any(axis=(1, 2)), s)
    r0, r1 = extent(body.any(axis=(0, 2)), h)
    c0, c1 = extent(body.any(axis=(0, 1)), w)
    keep = min(c0, w - c1)  # Same number of cols off each side: the centre stays the centre.
    return slice(s0, s1), slice(r0, r1), slice(keep, w - keep)


def crop(volumes: Mapping[str, np.ndarray], box) -> dict:
    """Every phase cut to ``box`` (views; ``np.ascontiguousarray`` them to copy)."""
    return {p: v[box] for p, v in volumes.items()}
