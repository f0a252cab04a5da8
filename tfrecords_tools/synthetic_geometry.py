"""Acquisition geometry of the synthetic cohort: canonical volume -> DICOM slice stacks.

The canonical array has axes ``(slice, row, col)`` running toward patient Superior, Posterior
and Left (DICOM LPS+ directions ``+z``, ``+y``, ``+x``). An acquisition shows the same voxels
through another geometry: its stored array is a permutation and flip of the canonical axes
(no interpolation), and its DICOM header (ImageOrientationPatient, ImagePositionPatient per
slice, PixelSpacing, slice spacing) is derived from that permutation, so a reader that undoes
the geometry with the header alone recovers the canonical array exactly.

DICOM conventions used here: the first IOP triplet is the direction in which the *column index*
increases (along a row), the second the direction in which the *row index* increases; the
position of pixel ``(r, c)`` of a slice is ``IPP + c * PixelSpacing[1] * iop[:3] +
r * PixelSpacing[0] * iop[3:]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Direction (LPS) in which each canonical axis index increases: slice -> S, row -> P, col -> L.
CANONICAL_DIRECTIONS = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@dataclasses.dataclass(frozen=True)
class Orientation:
    """How an acquisition's stored axes relate to the canonical axes.

    Attributes:
      name: str. Name of the orientation.
      permutation: 3 ints. Stored axis ``m`` (slice, row, col of the acquisition) walks along
        canonical axis ``permutation[m]``.
      flips: 3 bools. Stored axis ``m`` walks against the direction of its canonical axis.
    """

    name: str
    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def __post_init__(self):
        if sorted(self.permutation) != [0, 1, 2] or len(self.flips) != 3:
            raise ValueError(
                f"Orientation {self.name!r} needs a permutation of (0, 1, 2) and 3 flips. "
                f"Received: permutation={self.permutation}, flips={self.flips}"
            )

    def axis_directions(self) -> np.ndarray:
        """Returns ``(3, 3)``: LPS direction in which each stored axis index increases."""
        signs = np.where(np.asarray(self.flips), -1.0, 1.0)
        return CANONICAL_DIRECTIONS[list(self.permutation)] * signs[:, None]

    def image_orientation(self) -> np.ndarray:
        """Returns ImageOrientationPatient (6,): column-index direction, then row-index one."""
        directions = self.axis_directions()
        return np.concatenate([directions[2], directions[1]])


ORIENTATIONS = {
    # Axial, slices inferior -> superior, rows anterior -> posterior, cols right -> left.
    "standard": Orientation("standard", (0, 1, 2), (False, False, False)),
    # Axial with the column direction reversed (IOP row cosines -1, 0, 0).
    "reversed_cols": Orientation("reversed_cols", (0, 1, 2), (False, False, True)),
    # Axial, first instance most superior: positions descend along the IOP normal.
    "descending_slices": Orientation("descending_slices", (0, 1, 2), (True, False, False)),
    # Sagittal: slices right -> left, rows superior -> inferior, cols anterior -> posterior;
    # IOP (0, 1, 0, 0, 0, -1), the usual sagittal header.
    "sagittal": Orientation("sagittal", (2, 0, 1), (False, True, False)),
    # Coronal: slices anterior -> posterior, rows superior -> inferior, cols right -> left.
    "coronal": Orientation("coronal", (1, 0, 2), (False, True, False)),
}


@dataclasses.dataclass(frozen=True)
class SliceStack:
    """One acquisition of a canonical volume, in stored (file) order.

    Attributes:
      pixels: array ``(N, rows, cols)``. Slice ``n`` is the pixel array of the ``n``-th file.
      positions: float64 ``(N, 3)``. ImagePositionPatient (mm, LPS) of each slice.
      orientation: float64 ``(6,)``. ImageOrientationPatient shared by all slices.
      pixel_spacing: 2 floats. PixelSpacing: (between rows, between columns), mm.
      slice_spacing: float. Distance between consecutive slice positions, mm.
    """

    pixels: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    @property
    def normal(self) -> np.ndarray:
        """Slice normal: cross product of the IOP row and column direction cosines."""
        return np.cross(self.orientation[:3], self.orientation[3:])


def acquire(
    volume: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    orientation: Orientation,
    decimals: int = 4,
) -> SliceStack:
    """Shows a canonical volume through an acquisition geometry.

    Args:
      volume: array ``(S, H, W)`` in canonical orientation.
      spacing: 3 floats. Canonical voxel spacing (mm) along (slice, row, col).
      origin: 3 floats. LPS position (mm) of canonical voxel ``(0, 0, 0)``.
      orientation: Orientation. The acquisition geometry.
      decimals: int. Positions are rounded to this many decimals, as written to the header.
        Defaults to 4.

    Returns:
      The SliceStack: stored pixels (a view of ``volume``), per-slice positions and the header
      geometry.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (S, H, W). Received shape: {volume.shape}")
    spacing = np.asarray(spacing, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    perm = list(orientation.permutation)
    stored = volume.transpose(perm)
    for axis, flip in enumerate(orientation.flips):
        if flip:
            stored = np.flip(stored, axis=axis)
    # Canonical index of stored voxel (0, 0, 0): the far end of every flipped axis.
    first_index = np.zeros(3)
    for axis, flip in enumerate(orientation.flips):
        if flip:
            first_index[perm[axis]] = volume.shape[perm[axis]] - 1
    first = origin + (first_index * spacing) @ CANONICAL_DIRECTIONS
    step = orientation.axis_directions()[0] * spacing[perm[0]]
    positions = first[None, :] + np.arange(stored.shape[0])[:, None] * step[None, :]
    positions = np.round(positions, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    return SliceStack(
        pixels=stored,
        positions=positions,
        orientation=orientation.image_orientation(),
        pixel_spacing=(float(spacing[perm[1]]), float(spacing[perm[2]])),
        slice_spacing=float(spacing[perm[0]]),
    )
