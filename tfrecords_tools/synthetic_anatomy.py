"""Voxel phantom of a prone bilateral breast DCE-MRI exam (used by `synthetic`).

All shapes live in normalised coordinates of the canonical grid (``x`` across the field of view
from the patient's right (-0.5) to left (+0.5), ``y`` from anterior (0) to posterior (1), ``z``
from inferior (-0.5) to superior (+0.5)), so an exam looks alike at any matrix size. Lesion
sizes are in in-plane voxels.

Signal model (fat-suppressed T1 gradient echo, arbitrary units): each tissue has a
pre-contrast value and a relative enhancement per post-contrast phase; a phase is
``gain * coil_bias * (S0 + REFERENCE * RE_phase)`` with Rician noise. Lesions keep the
pre-contrast value of the tissue they sit in (within a few percent), so ``t0`` alone shows them
barely; they are defined by their enhancement:

* malignant: fast wash-in (peak at ``t1``) then plateau or wash-out, irregular lobulated margin
  with spicules, heterogeneous or rim enhancement;
* benign: slow persistent enhancement, round or oval, smooth margin;
* overlap on purpose: some benign lesions enhance fast and strongly, some malignant ones are
  small, faint and persistent; background parenchymal enhancement (BPE) of the
  fibroglandular tissue ranges from minimal to marked and is patchy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Enhancement is relative to this pre-contrast signal (about that of fibroglandular tissue).
REFERENCE_SIGNAL = 200.0
# ``Anatomy.breasts`` order: the right breast first (smaller column index, radiological view).
BREAST_ORDER = ("right", "left")
PATHOLOGIES = ("benign", "malignant")


@dataclasses.dataclass(frozen=True)
class Breast:
    """One breast: half an ellipsoid hanging anteriorly from the chest wall (normalised units).

    Attributes:
      center_x: float. Centre across the field of view (right breast < 0 < left breast).
      half_width: float. Semi-axis along x.
      depth: float. Anterior extent from the chest wall along y.
      half_height: float. Semi-axis along z.
      center_z: float. Centre along z.
    """

    center_x: float
    half_width: float
    depth: float
    half_height: float
    center_z: float


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """A patient's body as seen in one exam (normalised units).

    Attributes:
      chest_wall: float. y of the chest wall at the midline.
      chest_curve: float. How far the chest wall recedes posteriorly per x**2.
      body_half_width: float. Semi-axis of the thorax along x.
      breasts: (right, left) Breast.
      heart: 6 floats. Centre (x, y below the chest wall, z) and semi-axes (x, y, z).
      density: float. Fraction of the breast that is fibroglandular tissue.
      texture_seed: int. Seed of the fibroglandular texture (shared by a patient's exams).
    """

    chest_wall: float
    chest_curve: float
    body_half_width: float
    breasts: tuple[Breast, Breast]
    heart: tuple[float, float, float, float, float, float]
    density: float
    texture_seed: int


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One enhancing lesion.

    Attributes:
      side: str. "left" or "right" (patient side).
      pathology: str. "benign" or "malignant".
      center: 3 ints. Canonical voxel (slice, row, col) of the centre.
      radius: float. In-plane radius in voxels (the extent along slices follows the spacing).
      enhancement: 3 floats. Relative enhancement at t1, t2, t3.
      spiculated: bool. Irregular lobulated margin with spicules (else round/oval, smooth).
      rim: bool. Rim enhancement (stronger at the margin than in the centre).
      pre_contrast: float. Relative change of the pre-contrast signal inside the lesion.
      shape_seed: int. Seed of the lesion's shape details.
    """

    side: str
    pathology: str
    center: tuple[int, int, int]
    radius: float
    enhancement: tuple[float, float, float]
    spiculated: bool
    rim: bool
    pre_contrast: float
    shape_seed: int


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draws a patient's anatomy."""
    chest_wall = rng.uniform(0.42, 0.52)
    breasts = []
    size = rng.uniform(0.8, 1.2)  # both breasts of one patient are alike
    for sign in (-1.0, 1.0):
        breasts.append(
            Breast(
                center_x=sign * rng.uniform(0.2, 0.24),
                half_width=size * rng.uniform(0.14, 0.17),
                depth=min(chest_wall - 0.06, size * rng.uniform(0.27, 0.34)),
                half_height=size * rng.uniform(0.32, 0.4),
                center_z=rng.uniform(-0.06, 0.06),
            )
        )
    heart = (  # centre left of the midline, as the heart is
        rng.uniform(0.06, 0.1),
        rng.uniform(0.2, 0.26),
        rng.uniform(-0.25, -0.1),
        rng.uniform(0.12, 0.16),
        rng.uniform(0.11, 0.14),
        rng.uniform(0.35, 0.5),
    )
    return Anatomy(
        chest_wall=chest_wall,
        chest_curve=rng.uniform(0.4, 0.8),
        body_half_width=rng.uniform(0.44, 0.48),
        breasts=(breasts[0], breasts[1]),
        heart=heart,
        density=float(rng.choice([0.12, 0.25, 0.4, 0.55], p=[0.1, 0.4, 0.4, 0.1]))
        * rng.uniform(0.85, 1.15),
        texture_seed=int(rng.integers(2**31)),
    )


def jitter_anatomy(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """The same patient positioned a little differently in another exam."""
    dx, dy, dz = rng.uniform(-0.015, 0.015, size=3)
    breasts = tuple(
        dataclasses.replace(b, center_x=b.center_x + dx, center_z=b.center_z + dz)
        for b in anatomy.breasts
    )
    return dataclasses.replace(anatomy, chest_wall=anatomy.chest_wall + dy, breasts=breasts)


def place_lesion(
    rng: np.random.Generator,
    anatomy: Anatomy,
    shape: Sequence[int],
    spacing: Sequence[float],
    side: str,
    pathology: str,
) -> Lesion:
    """Draws a lesion of the given kind inside one breast, with its kinetics and shape.

    Args:
      rng: random generator.
      anatomy: Anatomy of the exam.
      shape: (S, H, W) of the canonical grid.
      spacing: 3 floats, mm along (slice, row, col).
      side: "left" or "right".
      pathology: "benign" or "malignant".

    Returns:
      The Lesion, centre in canonical voxel coordinates.
    """
    if side not in BREAST_ORDER or pathology not in PATHOLOGIES:
        raise ValueError(f"Unknown lesion kind. Received: side={side!r}, pathology={pathology!r}")
    slices, rows, cols = shape
    scale = min(rows, cols) / 96.0  # radius range 3-8 voxels at 96 x 96
    atypical = rng.uniform() < (0.15 if pathology == "malignant" else 0.2)
    if pathology == "malignant":
        if atypical:  # small, faint, persistent: looks benign
            radius = rng.uniform(2.5, 4.0)
            peak = rng.uniform(0.7, 1.05)
            enhancement = (0.6 * peak, 0.85 * peak, peak)
        else:  # fast wash-in, then plateau or wash-out
            radius = rng.uniform(3.0, 8.0)
            peak = rng.uniform(1.3, 2.2)
            if rng.uniform() < 0.5:
                enhancement = (peak, 0.88 * peak, 0.78 * peak)
            else:
                enhancement = (peak, 0.98 * peak, 0.95 * peak)
        spiculated = not atypical or rng.uniform() < 0.5
        rim = rng.uniform() < 0.3
    else:
        radius = rng.uniform(3.0, 7.0)
        if atypical:  # fast and strong, like a cancer
            peak = rng.uniform(1.0, 1.6)
            enhancement = (peak, 0.97 * peak, 0.95 * peak)
        else:  # slow, persistent
            final = rng.uniform(0.5, 1.1)
            enhancement = (0.45 * final, 0.75 * final, final)
        spiculated = False
        rim = False
    radius = round(max(2.0, radius * scale), 1)

    breast = anatomy.breasts[BREAST_ORDER.index(side)]
    # Keep the lesion inside the breast: sample the centre in the inner part of the ellipsoid.
    semi_vox = min(breast.half_width * cols, breast.depth * rows)
    reach = float(np.clip(1.0 - (radius + 1.5) / semi_vox, 0.15, 0.7))
    while True:
        u = rng.uniform(-1.0, 1.0, size=3)
        if np.sum(u**2) <= 1.0 and u[1] >= -0.2:
            break
    x = breast.center_x + reach * u[0] * breast.half_width
    z = breast.center_z + reach * u[2] * breast.half_height
    y = _chest_wall_y(anatomy, x) - (0.45 + 0.45 * reach * u[1]) * breast.depth
    center = (
        int(np.clip(round((z + 0.5) * slices - 0.5), 0, slices - 1)),
        int(np.clip(round(y * rows - 0.5), 0, rows - 1)),
        int(np.clip(round((x + 0.5) * cols - 0.5), 0, cols - 1)),
    )
    return Lesion(
        side=side,
        pathology=pathology,
        center=center,
        radius=float(radius),
        enhancement=tuple(round(float(e), 4) for e in enhancement),
        spiculated=bool(spiculated),
        rim=bool(rim),
        pre_contrast=float(rng.uniform(-0.08, 0.03)),
        shape_seed=int(rng.integers(2**31)),
    )


@dataclasses.dataclass(frozen=True)
class RenderedExam:
    """Float signal volumes of one exam in canonical orientation.

    Attributes:
      phases: dict "t0".."t3" -> float32 (S, H, W).
      t2w: float32 (S, H, W) T2-weighted contrast, or None.
      scout: float32 (S, H, W) non-fat-suppressed T1 contrast (for localizers), or None.
    """

    phases: dict[str, np.ndarray]
    t2w: np.ndarray | None
    scout: np.ndarray | None


# Tissue values: (pre-contrast T1 FS, enhancement t1, t2, t3, T2w, non-FS T1).
_TISSUES = {
    "fat": (70.0, 0.01, 0.02, 0.02, 60.0, 360.0),
    "skin": (230.0, 0.1, 0.15, 0.2, 120.0, 220.0),
    "muscle": (170.0, 0.15, 0.25, 0.3, 50.0, 160.0),
    "soft": (110.0, 0.2, 0.3, 0.35, 90.0, 140.0),
    "lung": (20.0, 0.03, 0.04, 0.05, 10.0, 15.0),
    "fgt": (210.0, 0.0, 0.0, 0.0, 140.0, 200.0),  # enhancement comes from the BPE map
    "blood": (140.0, 3.5, 2.6, 2.1, 30.0, 120.0),
}
_LESION_T2W = {"benign": 260.0, "malignant": 150.0}


class _Canvas:
    """Channels painted layer by layer with soft masks (partial volume at the edges)."""

    def __init__(self, shape, extra_contrasts):
        names = ["s0", "re1", "re2", "re3"] + (["t2w", "scout"] if extra_contrasts else [])
        self.channels = {n: np.zeros(shape, np.float32) for n in names}
        self._index = {"s0": 0, "re1": 1, "re2": 2, "re3": 3, "t2w": 4, "scout": 5}

    def paint(self, mask, tissue, enhancement_map=None):
        values = _TISSUES[tissue]
        mask = mask.astype(np.float32, copy=False)
        for name, arr in self.channels.items():
            value = values[self._index[name]]
            if enhancement_map is not None and name.startswith("re"):
                value = enhancement_map[int(name[2]) - 1]
            arr -= mask * (arr - value)


def _soft(signed_distance):
    """Partial-volume fraction from a signed distance in voxels (negative inside)."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0).astype(np.float32)


def _chest_wall_y(anatomy: Anatomy, x):
    return anatomy.chest_wall + anatomy.chest_curve * np.square(x)


def smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise (periodic), normalised to zero mean and unit std."""
    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = np.fft.rfftn(white)
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*freqs, indexing="ij", sparse=True)
    exponent = sum((s * f) ** 2 for s, f in zip(sigma, grids))
    field = np.fft.irfftn(
        spectrum * np.exp(-2.0 * np.pi**2 * exponent), s=shape, axes=tuple(range(len(shape)))
    )
    field -= field.mean()
    field /= field.std() + 1e-12
    return field.astype(np.float32)


def _grid(shape):
    slices, rows, cols = shape
    z = ((np.arange(slices, dtype=np.float32) + 0.5) / slices - 0.5)[:, None, None]
    y = ((np.arange(rows, dtype=np.float32) + 0.5) / rows)[None, :, None]
    x = ((np.arange(cols, dtype=np.float32) + 0.5) / cols - 0.5)[None, None, :]
    return z, y, x


def render_exam(
    shape: Sequence[int],
    spacing: Sequence[float],
    anatomy: Anatomy,
    lesions: Sequence[Lesion],
    *,
    bpe: float,
    gain: float,
    noise_sigma: float,
    rng: np.random.Generator,
    extra_contrasts: bool = False,
) -> RenderedExam:
    """Renders the four DCE phases (and optionally T2w / scout contrasts) of one exam.

    Args:
      shape: (S, H, W) canonical grid.
      spacing: 3 floats, mm along (slice, row, col).
      anatomy: Anatomy of the exam.
      lesions: the exam's lesions.
      bpe: float. Relative enhancement of fibroglandular tissue at t3 (background parenchymal
        enhancement; ~0.05 minimal to ~0.7 marked).
      gain: float. Receiver gain applied to the whole exam.
      noise_sigma: float. Standard deviation of the complex noise (before gain).
      rng: random generator for this exam's BPE pattern and noise.
      extra_contrasts: bool. Also render T2w and non-fat-suppressed contrasts. Defaults to False.

    Returns:
      RenderedExam.
    """
    shape = tuple(int(s) for s in shape)
    slices, rows, cols = shape
    z, y, x = _grid(shape)
    canvas = _Canvas(shape, extra_contrasts)
    vox_y = 1.0 / rows  # normalised size of one voxel along y / x
    vox_x = 1.0 / cols
    wall = _chest_wall_y(anatomy, x)  # (1, 1, W)

    # Thorax: ellipse behind the chest wall, constant along z.
    bw = anatomy.body_half_width
    cy = anatomy.chest_wall + 0.55
    rho_body = np.sqrt((x / bw) ** 2 + ((y - cy) / 0.62) ** 2)
    body_sd = np.maximum((rho_body - 1.0) * bw / vox_x, (wall - y) / vox_y)
    canvas.paint(np.broadcast_to(_soft(body_sd), (1, rows, cols)), "skin")
    canvas.paint(_soft(body_sd + 1.0), "fat")
    canvas.paint(_soft(np.maximum(body_sd + 0.035 / vox_x, (wall - y) / vox_y)), "muscle")
    inner = _soft(np.maximum(body_sd + 0.04 / vox_x, (wall + 0.06 - y) / vox_y))
    canvas.paint(inner, "soft")
    for sign in (-1.0, 1.0):  # lungs
        rho = np.sqrt(((x - sign * 0.2) / 0.14) ** 2 + ((y - wall - 0.3) / 0.24) ** 2)
        canvas.paint(inner * _soft((rho - 1.0) * 0.14 / vox_x), "lung")
    hx, hy, hz, rx, ry, rz = anatomy.heart
    rho = np.sqrt(
        ((x - hx) / rx) ** 2 + ((y - anatomy.chest_wall - hy) / ry) ** 2 + ((z - hz) / rz) ** 2
    )
    canvas.paint(inner * _soft((rho - 1.0) * min(rx, ry) / vox_x), "blood")
    aorta = np.sqrt((x - 0.07) ** 2 + (y - anatomy.chest_wall - 0.42) ** 2)
    canvas.paint(inner * _soft((aorta - 0.035) / vox_x), "blood")
    for sign in (-1.0, 1.0):  # internal mammary vessels, just behind the chest wall muscle
        d = np.sqrt((x - sign * 0.08) ** 2 + (y - anatomy.chest_wall - 0.045) ** 2)
        canvas.paint(np.broadcast_to(_soft((d - 0.006) / vox_x), (1, rows, cols)), "blood")

    # Breasts: skin, fat, fibroglandular tissue with texture, a few vessels.
    texture_rng = np.random.default_rng(anatomy.texture_seed)
    texture = smooth_noise(texture_rng, shape, (0.6, 0.02 * rows, 0.02 * cols))
    patches = smooth_noise(rng, shape, (1.0, 0.06 * rows, 0.06 * cols))
    bpe_map = bpe * np.clip(0.6 + 0.7 * patches, 0.0, 2.0)
    for breast in anatomy.breasts:
        dy = np.maximum(wall - y, 0.0) / breast.depth
        rho = np.sqrt(
            ((x - breast.center_x) / breast.half_width) ** 2
            + dy**2
            + ((z - breast.center_z) / breast.half_height) ** 2
        )
        semi = min(breast.half_width / vox_x, breast.depth / vox_y)
        attached = _soft((y - wall - 0.02) / vox_y)  # no breast tissue behind the chest wall
        sd = (rho - 1.0) * semi
        canvas.paint(_soft(sd) * attached, "skin")
        canvas.paint(_soft(sd + 1.0) * attached, "fat")
        inside = _soft(sd + 2.0) * attached
        score = texture + 2.0 * (1.0 - rho)  # glandular tissue gathers centrally
        breast_scores = score[inside > 0.5]
        if breast_scores.size:
            threshold = np.quantile(breast_scores, 1.0 - anatomy.density)
            fgt = np.clip((score - threshold) / 0.4 + 0.5, 0.0, 1.0) * inside
            curve = np.array([0.45, 0.75, 1.0], np.float32)[:, None, None, None]
            canvas.paint(fgt, "fgt", enhancement_map=curve * bpe_map[None])
        canvas.paint(_breast_vessels(rng, shape, anatomy, breast) * inside, "blood")

    for lesion in lesions:
        _paint_lesion(canvas, lesion, shape, spacing)

    # Coil sensitivity: stronger anteriorly, near the breast coil; same for every phase.
    tilt = rng.uniform(-0.1, 0.1)
    bias = (gain * (1.12 - 0.25 * y + tilt * x)).astype(np.float32)
    s0 = canvas.channels["s0"]
    phases = {}
    for index, phase in enumerate(("t0", "t1", "t2", "t3")):
        signal = s0 if index == 0 else s0 + REFERENCE_SIGNAL * canvas.channels[f"re{index}"]
        phases[phase] = _rician(rng, signal * bias, noise_sigma * gain)
    t2w = scout = None
    if extra_contrasts:
        t2w = _rician(rng, canvas.channels["t2w"] * bias, noise_sigma * gain)
        scout = _rician(rng, canvas.channels["scout"] * bias, noise_sigma * gain)
    return RenderedExam(phases=phases, t2w=t2w, scout=scout)


def _rician(rng, signal, sigma):
    real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    imag = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt(real * real + imag * imag)


def _breast_vessels(rng, shape, anatomy, breast):
    """1-voxel vessels running from the chest wall toward the nipple (enhancing distractors)."""
    slices, rows, cols = shape
    out = np.zeros(shape, np.float32)
    t = np.linspace(0.0, 1.0, 4 * max(rows, cols))
    for _ in range(int(rng.integers(2, 4))):
        x0 = breast.center_x + rng.uniform(-0.6, 0.6) * breast.half_width
        z0 = breast.center_z + rng.uniform(-0.6, 0.6) * breast.half_height
        bend_x = rng.uniform(-0.4, 0.4) * breast.half_width
        bend_z = rng.uniform(-0.3, 0.3) * breast.half_height
        xs = x0 + bend_x * np.sin(np.pi * t * rng.uniform(0.5, 1.5))
        zs = z0 + bend_z * t
        ys = _chest_wall_y(anatomy, xs) - t * breast.depth * rng.uniform(0.5, 0.85)
        k = np.clip(np.round((zs + 0.5) * slices - 0.5), 0, slices - 1).astype(int)
        i = np.clip(np.round(ys * rows - 0.5), 0, rows - 1).astype(int)
        j = np.clip(np.round((xs + 0.5) * cols - 0.5), 0, cols - 1).astype(int)
        out[k, i, j] = rng.uniform(0.5, 0.9)
    return out


def lesion_weight(lesion: Lesion, shape: Sequence[int], spacing: Sequence[float]):
    """The lesion's enhancement weight (0..1) in a box around it.

    Returns:
      (box, weight): a tuple of 3 slices into the canonical grid and a float32 array of the
      box's shape.
    """
    shape_rng = np.random.default_rng(lesion.shape_seed)
    r = lesion.radius
    z_scale = spacing[0] / spacing[1]  # slice offsets in in-plane voxel units
    reach = 2.5 * r + 2.0
    half = (int(np.ceil(reach / z_scale)), int(np.ceil(reach)), int(np.ceil(reach)))
    box = tuple(
        slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip(lesion.center, half, shape)
    )
    dz, dy, dx = np.meshgrid(
        *[np.arange(b.start, b.stop, dtype=np.float32) - c for b, c in zip(box, lesion.center)],
        indexing="ij",
    )
    dz = dz * np.float32(z_scale)
    dist = np.sqrt(dz**2 + dy**2 + dx**2) + 1e-6
    if lesion.spiculated:
        # Lobulated margin: radius bulges toward a few random directions.
        lobes = shape_rng.standard_normal((5, 3))
        lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
        units = np.stack([dz, dy, dx]) / dist
        bulge = np.einsum("kc,c...->k...", lobes, units)
        amps = shape_rng.uniform(0.2, 0.5, size=5)[:, None, None, None]
        modulation = 0.85 + np.sum(amps * np.maximum(bulge, 0.0) ** 3, axis=0)
        core = _soft((dist / (r * modulation) - 1.0) * r * 1.5)
        spicules = np.zeros_like(core)
        for _ in range(int(shape_rng.integers(4, 10))):
            angle = shape_rng.uniform(0.0, 2.0 * np.pi)
            direction = np.array([shape_rng.uniform(-0.3, 0.3), np.cos(angle), np.sin(angle)])
            direction /= np.linalg.norm(direction)
            along = direction[0] * dz + direction[1] * dy + direction[2] * dx
            across = np.sqrt(np.maximum(dist**2 - along**2, 0.0))
            length = r * shape_rng.uniform(1.6, 2.4)
            ray = (
                np.clip(1.0 - along / length, 0.0, 1.0)
                * (along > 0)
                * np.clip(1.0 - across / 0.8, 0.0, 1.0)  # about one voxel thick
            )
            spicules = np.maximum(spicules, ray)
        mottle = shape_rng.uniform(0.55, 0.75) + shape_rng.uniform(0.0, 0.5, size=core.shape)
        inner = core * np.minimum(mottle, 1.0)
        if lesion.rim:
            inner = inner * np.where(dist < 0.55 * r, 0.45, 1.0)
        weight = np.maximum(inner, 0.7 * spicules)
    else:
        angle = shape_rng.uniform(0.0, np.pi)
        ratio = shape_rng.uniform(0.6, 1.0)
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        depth = r * shape_rng.uniform(0.7, 1.0)
        rho = np.sqrt((u / r) ** 2 + (v / (r * ratio)) ** 2 + (dz / depth) ** 2)
        weight = _soft((rho - 1.0) * r * ratio / 1.3)
    return box, weight.astype(np.float32)


def _paint_lesion(canvas: _Canvas, lesion: Lesion, shape, spacing):
    box, weight = lesion_weight(lesion, shape, spacing)
    channels = canvas.channels
    channels["s0"][box] *= 1.0 + lesion.pre_contrast * weight
    for index in range(3):
        channels[f"re{index + 1}"][box] += lesion.enhancement[index] * weight
    if "t2w" in channels:
        region = channels["t2w"][box]
        region -= weight * (region - _LESION_T2W[lesion.pathology])
