"""Tests of tfrecords_tools.dicom_reader on hand-made exams and pydicom's bundled MR files."""

import copy
import itertools
import os

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from tfrecords_tools import dicom_files, dicom_pixels
from tfrecords_tools.dicom_reader import ExamError, ReaderOptions, load_exam

PHASES = ("t0", "t1", "t2", "t3")
# Canonical spacing (slice->S, row->P, col->L), all different so a swap shows.
CANON_SPACING = (3.0, 0.8, 0.7)
_UID_ROOT = "1.2.826.0.1.3680043.10.999."


def _template(name="MR_small.dcm"):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    for kw in ("RescaleSlope", "RescaleIntercept", "TemporalPositionIdentifier"):
        if kw in ds:
            delattr(ds, kw)
    ds.PatientID = "SYNPID-READER-1"
    return ds


def _write(ds, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path)


def _acquire(canon, u, v, spacing=CANON_SPACING):
    """Samples a canonical (S,H,W) volume as a DICOM stack.

    Args:
      canon: (S, H, W) array in canonical axes.
      u: LPS direction of increasing column index (DICOM row cosine), a signed unit axis.
      v: LPS direction of increasing row index (DICOM column cosine).

    Returns:
      (pixels (K, I, J), slice positions (K, 3), pixel spacing [di, dj], slice gap).
    """
    u, v = np.asarray(u, float), np.asarray(v, float)
    n = np.cross(u, v)
    # Spacing along each LPS axis: L<-col(2), P<-row(1), S<-slice(0).
    lps_spacing = np.array([spacing[2], spacing[1], spacing[0]])
    lps_size = np.array([canon.shape[2], canon.shape[1], canon.shape[0]])
    axis = lambda d: int(np.argmax(np.abs(d)))  # noqa: E731
    dj, di, dk = lps_spacing[axis(u)], lps_spacing[axis(v)], lps_spacing[axis(n)]
    nj, ni, nk = lps_size[axis(u)], lps_size[axis(v)], lps_size[axis(n)]
    k, i, j = np.meshgrid(np.arange(nk), np.arange(ni), np.arange(nj), indexing="ij")
    pos = k[..., None] * dk * n + i[..., None] * di * v + j[..., None] * dj * u
    pos = pos - pos.reshape(-1, 3).min(axis=0)
    idx = np.rint(pos / lps_spacing).astype(int)  # (K, I, J, 3) LPS voxel index
    pixels = canon[idx[..., 2], idx[..., 1], idx[..., 0]]
    origin = np.array([-100.0, -80.0, 20.0])
    slice_pos = origin + pos[:, 0, 0, :]
    return pixels, slice_pos, [float(di), float(dj)], float(dk)


def _write_series(
    exam_dir,
    pixels,
    positions,
    iop,
    pixel_spacing,
    series_uid,
    template=None,
    acq_time="101500",
    series_number=1,
    temporal_position=None,
    image_type=None,
    slope=None,
    intercept=None,
    tr="4.5",
    prefix="img",
    file_order=None,
):
    template = template if template is not None else _template()
    order = list(range(len(pixels))) if file_order is None else file_order
    for n, k in enumerate(order):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"{series_uid}.{k + 1}.{temporal_position or 0}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = series_number
        ds.InstanceNumber = n + 1
        ds.AcquisitionTime = acq_time
        ds.RepetitionTime = tr
        ds.ImageOrientationPatient = [f"{x:.6f}" for x in iop]
        ds.ImagePositionPatient = [f"{x:.4f}" for x in positions[k]]
        ds.PixelSpacing = [f"{x:g}" for x in pixel_spacing]
        if temporal_position is not None:
            ds.TemporalPositionIdentifier = temporal_position
        if image_type is not None:
            ds.ImageType = image_type
        if slope is not None:
            ds.RescaleSlope = f"{slope[k]:g}"
            ds.RescaleIntercept = f"{intercept[k]:g}"
        arr = np.ascontiguousarray(pixels[k], dtype=np.int16)
        ds.Rows, ds.Columns = arr.shape
        ds.PixelData = arr.tobytes()
        _write(ds, os.path.join(exam_dir, f"{prefix}_{series_number}_{n:03d}.dcm"))


def _canonical_phases(shape=(5, 6, 7), seed=0):
    rng = np.random.default_rng(seed)
    return {p: rng.integers(0, 3000, size=shape).astype(np.int16) for p in PHASES}


def _write_dce(exam_dir, canon, u, v, **kwargs):
    iop = list(u) + list(v)
    for t, phase in enumerate(PHASES):
        pixels, positions, ps, _ = _acquire(canon[phase], u, v)
        _write_series(
            exam_dir,
            pixels,
            positions,
            iop,
            ps,
            series_uid=f"{_UID_ROOT}{t + 1}",
            acq_time=f"10{t + 1:02d}00",
            series_number=10 + t,
            **kwargs,
        )


def _signed_axes():
    for a, b in itertools.permutations(range(3), 2):
        for sa, sb in itertools.product((1, -1), repeat=2):
            u = np.zeros(3)
            v = np.zeros(3)
            u[a], v[b] = sa, sb
            yield u, v


_ORIENTATIONS = list(_signed_axes())  # 24 acquisitions: axial/coronal/sagittal, every sign.


@pytest.mark.parametrize(
    "u,v", _ORIENTATIONS, ids=[f"u{u.astype(int)}v{v.astype(int)}" for u, v in _ORIENTATIONS]
)
def test_every_axis_aligned_orientation_reads_back_canonical(tmp_path, u, v):
    canon = _canonical_phases()
    _write_dce(str(tmp_path), canon, u, v)
    exam = load_exam(str(tmp_path))
    assert exam.spacing == pytest.approx(CANON_SPACING)
    assert exam.patient_id == "SYNPID-READER-1"
    for p in PHASES:
        assert exam.volumes[p].dtype == np.float32
        np.testing.assert_array_equal(exam.volumes[p], canon[p].astype(np.float32))


def test_left_marker_lands_at_high_columns_for_axial_radiological_storage(tmp_path):
    # Axial, stored the common way: col index toward patient Left, row index toward Posterior.
    canon = {p: np.zeros((4, 6, 8), np.int16) for p in PHASES}
    for p in PHASES:
        canon[p][:, :, 6] = 1000  # A bright stripe in the patient's left.
    # Acquire with columns running toward patient Right (u = -L): files hold it mirrored.
    _write_dce(str(tmp_path), canon, u=(-1, 0, 0), v=(0, 1, 0))
    raw = pydicom.dcmread(sorted(tmp_path.glob("*.dcm"))[0]).pixel_array
    assert raw[:, 1].max() == 1000  # In the file, the stripe is at a low column.
    exam = load_exam(str(tmp_path))
    assert exam.volumes["t0"][:, :, 6].min() == 1000
    assert exam.volumes["t0"].shape[2] == 8


def test_slice_order_from_positions_not_file_names(tmp_path):
    canon = _canonical_phases((6, 4, 5))
    u, v = (1, 0, 0), (0, 1, 0)
    _write_dce(str(tmp_path), canon, u, v, file_order=[3, 0, 5, 1, 4, 2])
    exam = load_exam(str(tmp_path))
    np.testing.assert_array_equal(exam.volumes["t2"], canon["t2"].astype(np.float32))


def test_phase_order_by_acquisition_time_not_series_number(tmp_path):
    canon = _canonical_phases((3, 4, 5))
    u, v = (1, 0, 0), (0, 1, 0)
    times = ["103000", "101000", "104500", "102000"]  # Series 10..13 acquired out of order.
    for t, phase in enumerate(PHASES):
        pixels, positions, ps, _ = _acquire(canon[phase], u, v)
        _write_series(
            str(tmp_path),
            pixels,
            positions,
            list(u) + list(v),
            ps,
            series_uid=f"{_UID_ROOT}{t}",
            acq_time=times[t],
            series_number=10 + t,
        )
    exam = load_exam(str(tmp_path))
    expected_order = [PHASES[i] for i in np.argsort(times)]
    for got, src in zip(PHASES, expected_order):
        np.testing.assert_array_equal(exam.volumes[got], canon[src].astype(np.float32))


def test_multiphase_series_split_by_temporal_position(tmp_path):
    canon = _canonical_phases((3, 4, 5))
    u, v = (1, 0, 0), (0, 1, 0)
    for t, phase in enumerate(PHASES):
        pixels, positions, ps, _ = _acquire(canon[phase], u, v)
        _write_series(
            str(tmp_path),
            pixels,
            positions,
            list(u) + list(v),
            ps,
            series_uid=f"{_UID_ROOT}7",
            acq_time="101000",
            series_number=7,
            temporal_position=t + 1,
            prefix=f"tp{t}",
        )
    exam = load_exam(str(tmp_path))
    for p in PHASES:
        np.testing.assert_array_equal(exam.volumes[p], canon[p].astype(np.float32))


@pytest.mark.parametrize("told_apart_by", ["AcquisitionNumber", "TriggerTime", "AcquisitionTime"])
def test_multiphase_series_without_temporal_position(tmp_path, told_apart_by):
    canon = _canonical_phases((3, 4, 5))
    u, v = (1, 0, 0), (0, 1, 0)
    tpl = _template()
    for t, phase in enumerate((2, 0, 3, 1)):  # Files of later phases written first.
        ds = copy.deepcopy(tpl)
        ds.AcquisitionNumber = 1
        if told_apart_by == "AcquisitionNumber":
            ds.AcquisitionNumber = phase + 1
        elif told_apart_by == "TriggerTime":
            ds.TriggerTime = f"{phase * 60000.5:g}"
        pixels, positions, ps, _ = _acquire(canon[PHASES[phase]], u, v)
        _write_series(
            str(tmp_path),
            pixels,
            positions,
            list(u) + list(v),
            ps,
            template=ds,
            series_uid=f"{_UID_ROOT}7",
            series_number=7,
            prefix=f"x{t}",
            acq_time=f"10{phase}000" if told_apart_by == "AcquisitionTime" else "101000",
        )
    exam = load_exam(str(tmp_path))
    for p in PHASES:
        np.testing.assert_array_equal(exam.volumes[p], canon[p].astype(np.float32))


def test_phase_overrides_pick_temporal_positions_of_one_series(tmp_path):
    canon = _canonical_phases((3, 4, 5))
    u, v = (1, 0, 0), (0, 1, 0)
    for t, phase in enumerate(PHASES):
        pixels, positions, ps, _ = _acquire(canon[phase], u, v)
        _write_series(
            str(tmp_path),
            pixels,
            positions,
            list(u) + list(v),
            ps,
            series_uid=f"{_UID_ROOT}7",
            series_number=7,
            temporal_position=t + 1,
            prefix=f"tp{t}",
        )
    uid = f"{_UID_ROOT}7"
    overrides = {f"{uid}:4": "t0", f"{uid}:1": "t1", f"{uid}:2": "t2", f"{uid}:3": "t3"}
    exam = load_exam(str(tmp_path), phase_overrides=overrides)
    np.testing.assert_array_equal(exam.volumes["t0"], canon["t3"].astype(np.float32))
    np.testing.assert_array_equal(exam.volumes["t1"], canon["t0"].astype(np.float32))
    with pytest.raises(ExamError, match="several temporal positions.*temporal_position"):
        load_exam(
            str(tmp_path),
            phase_overrides={uid: "t0", f"{uid}:1": "t1", f"{uid}:2": "t2", f"{uid}:3": "t3"},
        )
    with pytest.raises(ExamError, match="no temporal position 9"):
        load_exam(
            str(tmp_path),
            phase_overrides={
                f"{uid}:9": "t0",
                f"{uid}:1": "t1",
                f"{uid}:2": "t2",
                f"{uid}:3": "t3",
            },
        )


def test_ignores_non_dicom_localizer_derived_and_other_series(tmp_path):
    canon = _canonical_phases((4, 6, 6))
    u, v = (1, 0, 0), (0, 1, 0)
    _write_dce(str(tmp_path / "dce"), canon, u, v)
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 300)
    rng = np.random.default_rng(1)
    # Subtraction series (derived) with the DCE geometry and sequence.
    pixels, positions, ps, _ = _acquire(canon["t2"] - canon["t0"], u, v)
    _write_series(
        str(tmp_path / "sub"),
        pixels,
        positions,
        list(u) + list(v),
        ps,
        f"{_UID_ROOT}50",
        series_number=50,
        image_type=["DERIVED", "PRIMARY", "SUB"],
        acq_time="090000",
    )
    # Three-plane localizer (mixed orientations in one series), acquired first.
    for n, (lu, lv) in enumerate(
        [((1, 0, 0), (0, 1, 0)), ((0, 1, 0), (0, 0, -1)), ((1, 0, 0), (0, 0, -1))]
    ):
        _write_series(
            str(tmp_path / "loc"),
            rng.integers(0, 9, (1, 6, 6)),
            [np.zeros(3)],
            list(lu) + list(lv),
            [1, 1],
            f"{_UID_ROOT}60",
            series_number=1,
            acq_time="090000",
            prefix=f"loc{n}",
        )
    # T2 series: same geometry, other sequence (TR).
    for t in range(3):
        pixels, positions, ps, _ = _acquire(canon["t0"] + 7, u, v)
        _write_series(
            str(tmp_path / "t2w"),
            pixels,
            positions,
            list(u) + list(v),
            ps,
            f"{_UID_ROOT}7{t}",
            series_number=70 + t,
            acq_time=f"0900{t}0",
            tr="3000",
            prefix=f"t2w{t}",
        )
    exam = load_exam(str(tmp_path))
    for p in PHASES:
        np.testing.assert_array_equal(exam.volumes[p], canon[p].astype(np.float32))


def test_two_dce_like_sets_are_ambiguous(tmp_path):
    canon = _canonical_phases((3, 4, 4))
    _write_dce(str(tmp_path / "a"), canon, (1, 0, 0), (0, 1, 0))
    for t in range(4):
        pixels, positions, ps, _ = _acquire(canon["t0"], (1, 0, 0), (0, 1, 0))
        _write_series(
            str(tmp_path / "b"),
            pixels,
            positions,
            [1, 0, 0, 0, 1, 0],
            ps,
            f"{_UID_ROOT}8{t}",
            series_number=80 + t,
            tr="9.9",
            prefix=f"b{t}",
        )
    with pytest.raises(ExamError, match="ambiguous DCE series.*--phase_map"):
        load_exam(str(tmp_path))


def test_more_than_four_phases_keeps_first_four(tmp_path):
    canon = _canonical_phases((3, 4, 4))
    u, v = (1, 0, 0), (0, 1, 0)
    _write_dce(str(tmp_path), canon, u, v)
    pixels, positions, ps, _ = _acquire(canon["t0"] * 0 + 5, u, v)
    _write_series(
        str(tmp_path),
        pixels,
        positions,
        list(u) + list(v),
        ps,
        f"{_UID_ROOT}9",
        acq_time="110000",
        series_number=14,
    )
    exam = load_exam(str(tmp_path))
    np.testing.assert_array_equal(exam.volumes["t3"], canon["t3"].astype(np.float32))


def test_phase_overrides_replace_heuristics(tmp_path):
    canon = _canonical_phases((3, 4, 4))
    _write_dce(str(tmp_path), canon, (1, 0, 0), (0, 1, 0))
    uids = [f"{_UID_ROOT}{t + 1}" for t in range(4)]
    overrides = {uids[3]: "t0", uids[2]: "t1", uids[1]: "t2", uids[0]: "t3"}
    exam = load_exam(str(tmp_path), phase_overrides=overrides)
    np.testing.assert_array_equal(exam.volumes["t0"], canon["t3"].astype(np.float32))
    np.testing.assert_array_equal(exam.volumes["t3"], canon["t0"].astype(np.float32))
    with pytest.raises(ExamError, match="lacks phase"):
        load_exam(str(tmp_path), phase_overrides={uids[0]: "t0"})
    with pytest.raises(ExamError, match="not in the exam folder"):
        load_exam(
            str(tmp_path),
            phase_overrides={"1.2.3": "t0", uids[2]: "t1", uids[1]: "t2", uids[0]: "t3"},
        )
    with pytest.raises(ExamError, match="phase t1 to two series"):
        load_exam(str(tmp_path), phase_overrides={**overrides, uids[3]: "t1"} | {"9.9": "t1"})


def test_rescale_slope_and_intercept_per_slice(tmp_path):
    canon = _canonical_phases((3, 4, 4))
    u, v = (1, 0, 0), (0, 1, 0)
    slope, intercept = [0.5, 2.25, 1.0], [-10.0, 3.5, 0.0]
    for t, phase in enumerate(PHASES):
        pixels, positions, ps, _ = _acquire(canon[phase], u, v)
        _write_series(
            str(tmp_path),
            pixels,
            positions,
            list(u) + list(v),
            ps,
            f"{_UID_ROOT}{t}",
            acq_time=f"10{t}000",
            series_number=t,
            slope=slope,
            intercept=intercept,
        )
    exam = load_exam(str(tmp_path))
    expected = (
        canon["t1"].astype(np.float64) * np.array(slope)[:, None, None]
        + np.array(intercept)[:, None, None]
    )
    np.testing.assert_array_equal(exam.volumes["t1"], expected.astype(np.float32))


def test_keep_stored_gives_dicom_integers_and_rescale(tmp_path):
    canon = _canonical_phases((3, 4, 4))
    u, v = (0, 1, 0), (0, 0, -1)  # Sagittal: reorientation permutes and flips the axes.
    for t, phase in enumerate(PHASES):
        pixels, positions, ps, _ = _acquire(canon[phase], u, v)
        _write_series(
            str(tmp_path),
            pixels,
            positions,
            list(u) + list(v),
            ps,
            f"{_UID_ROOT}{t}",
            acq_time=f"10{t}000",
            series_number=t,
            slope=[0.75 + t] * 8,
            intercept=[-8.0 * t] * 8,
        )
    values = load_exam(str(tmp_path))
    stored = load_exam(str(tmp_path), keep_stored=True)
    assert values.rescale is None
    assert stored.rescale == {p: (0.75 + t, -8.0 * t) for t, p in enumerate(PHASES)}
    for phase in PHASES:
        assert stored.volumes[phase].dtype == np.int16
        np.testing.assert_array_equal(stored.volumes[phase], canon[phase])
        np.testing.assert_array_equal(stored.voxel_values(phase), values.volumes[phase])
        np.testing.assert_array_equal(values.voxel_values(phase), values.volumes[phase])


def test_keep_stored_falls_back_to_float32_for_per_slice_rescale(tmp_path):
    canon = _canonical_phases((3, 4, 4))
    u, v = (1, 0, 0), (0, 1, 0)
    for t, phase in enumerate(PHASES):
        pixels, positions, ps, _ = _acquire(canon[phase], u, v)
        slope = [0.5, 2.25, 1.0] if phase == "t2" else [1.5] * 3
        _write_series(
            str(tmp_path),
            pixels,
            positions,
            list(u) + list(v),
            ps,
            f"{_UID_ROOT}{t}",
            acq_time=f"10{t}000",
            series_number=t,
            slope=slope,
            intercept=[0.0] * 3,
        )
    stored = load_exam(str(tmp_path), keep_stored=True)
    values = load_exam(str(tmp_path))
    assert stored.rescale is None  # One phase cannot be stored exactly as integers: none are.
    for phase in PHASES:
        assert stored.volumes[phase].dtype == np.float32
        np.testing.assert_array_equal(stored.volumes[phase], values.volumes[phase])


def test_keep_stored_picks_uint16_above_int16_range(tmp_path):
    canon = _canonical_phases((3, 4, 4))
    canon = {
        p: v.astype(np.uint16) + np.uint16(40000 if p == "t3" else 0) for p, v in canon.items()
    }
    template = _template()
    template.PixelRepresentation = 0
    u, v = (1, 0, 0), (0, 1, 0)
    for t, phase in enumerate(PHASES):
        pixels, positions, ps, _ = _acquire(canon[phase], u, v)
        _write_series(
            str(tmp_path),
            pixels.astype(np.uint16).view(np.int16),
            positions,
            list(u) + list(v),
            ps,
            f"{_UID_ROOT}{t}",
            template=template,
            acq_time=f"10{t}000",
            series_number=t,
        )
    stored = load_exam(str(tmp_path), keep_stored=True)
    for phase in PHASES:
        assert stored.volumes[phase].dtype == np.uint16
        np.testing.assert_array_equal(stored.volumes[phase], canon[phase])


def test_slight_obliquity_accepted_strong_rejected(tmp_path):
    canon = _canonical_phases((3, 4, 4))
    for angle, ok in ((5.0, True), (30.0, False)):
        d = tmp_path / f"a{int(angle)}"
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        u, v = np.array([c, s, 0.0]), np.array([-s, c, 0.0])
        for t, phase in enumerate(PHASES):
            pixels, _, ps, _ = _acquire(canon[phase], (1, 0, 0), (0, 1, 0))
            positions = [np.array([0, 0, 3.0 * k]) for k in range(3)]
            _write_series(
                str(d),
                pixels,
                positions,
                list(u) + list(v),
                ps,
                f"{_UID_ROOT}{t}",
                acq_time=f"10{t}000",
                series_number=t,
            )
        if ok:
            assert load_exam(str(d)).shape == (3, 4, 4)
        else:
            with pytest.raises(ExamError, match="oblique"):
                load_exam(str(d), options=ReaderOptions(max_obliquity_deg=15))


def _dce_then(tmp_path, mutate):
    canon = _canonical_phases((5, 4, 4))
    _write_dce(str(tmp_path), canon, (1, 0, 0), (0, 1, 0))
    mutate(sorted(p for p in tmp_path.iterdir() if p.suffix == ".dcm"))
    return str(tmp_path)


def test_missing_slice_rejected(tmp_path):
    # Files are img_<series>_<n>; drop the middle slice of t2 (series 12).
    exam = _dce_then(
        tmp_path, lambda files: os.remove([f for f in files if f.name == "img_12_002.dcm"][0])
    )
    with pytest.raises(ExamError, match=r"t2: missing slice\(s\)") as e:
        load_exam(exam)
    assert exam in str(e.value)


def test_duplicate_slice_rejected(tmp_path):
    def dup(files):
        ds = pydicom.dcmread([f for f in files if f.name == "img_11_001.dcm"][0])
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
        ds.save_as(str(tmp_path / "img_11_dup.dcm"))

    with pytest.raises(ExamError, match="duplicate slice positions"):
        load_exam(_dce_then(tmp_path, dup))


def test_archive_folder_quirks_read_like_a_clean_exam(tmp_path):
    # One exam with what real archive exports carry: an exact copy of an image under another
    # name (same SOPInstanceUID), a series linked in from another folder, a file without the
    # 128-byte preamble, a zero-byte file and a dangling link.
    canon = _canonical_phases((5, 4, 4))
    clean = tmp_path / "clean"
    _write_dce(str(clean), canon, (1, 0, 0), (0, 1, 0))
    expected = load_exam(str(clean))
    exam = tmp_path / "exam"
    _write_dce(str(exam), canon, (1, 0, 0), (0, 1, 0))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for f in exam.glob("img_12_*.dcm"):
        f.rename(elsewhere / f.name)
    (exam / "t2").symlink_to(elsewhere, target_is_directory=True)
    (exam / "loop").symlink_to(exam, target_is_directory=True)  # Listed once, no endless walk.
    (exam / "IMG_10_000 (copy).DCM").write_bytes((exam / "img_10_000.dcm").read_bytes())
    bare = exam / "img_11_001.dcm"
    bare.write_bytes(bare.read_bytes()[132:])  # No preamble and no "DICM".
    (exam / "empty").write_bytes(b"")
    (exam / "gone.dcm").symlink_to(tmp_path / "missing.dcm")
    got = load_exam(str(exam))
    for phase in PHASES:
        np.testing.assert_array_equal(got.volumes[phase], expected.volumes[phase])


def test_monochrome1_rejected_not_silently_inverted(tmp_path):
    def invert(files):
        ds = pydicom.dcmread(files[0])
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(files[0])

    with pytest.raises(ExamError, match="MONOCHROME1") as e:
        load_exam(_dce_then(tmp_path, invert))
    assert e.value.file == "img_10_000.dcm"


def test_phases_on_different_grids_rejected(tmp_path):
    def regrid(files):
        for f in files:
            if f.name.startswith("img_13_"):
                ds = pydicom.dcmread(f)
                ds.PixelSpacing = ["0.9", "0.9"]
                ds.save_as(f)

    with pytest.raises(ExamError, match="different grids"):
        load_exam(_dce_then(tmp_path, regrid))


def test_phase_shifted_by_one_slice_rejected(tmp_path):
    def shift(files):
        for f in files:
            if f.name.startswith("img_13_"):
                ds = pydicom.dcmread(f)
                ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 3.0
                ds.save_as(f)

    with pytest.raises(ExamError, match="different grids"):
        load_exam(_dce_then(tmp_path, shift))


def test_no_dce_series(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ExamError, match="no DCE series found"):
        load_exam(str(tmp_path))
    canon = _canonical_phases((3, 4, 4))
    _write_dce(str(tmp_path), canon, (1, 0, 0), (0, 1, 0))
    for f in tmp_path.glob("img_13_*.dcm"):
        f.unlink()
    with pytest.raises(ExamError, match="no DCE series found.*largest such set has 3"):
        load_exam(str(tmp_path))


def test_missing_folder_and_patient_id(tmp_path):
    with pytest.raises(ExamError, match="does not exist"):
        load_exam(str(tmp_path / "nope"))
    (tmp_path / "one.dcm").write_bytes(b"")
    with pytest.raises(ExamError, match="is a file, not an exam folder"):
        load_exam(str(tmp_path / "one.dcm"))
    (tmp_path / "one.dcm").unlink()
    tpl = _template()
    tpl.PatientID = ""
    canon = _canonical_phases((3, 4, 4))
    _write_dce(str(tmp_path), canon, (1, 0, 0), (0, 1, 0), template=tpl)
    with pytest.raises(ExamError, match="no PatientID"):
        load_exam(str(tmp_path))
    # Prediction on an anonymised exam: the same folder reads when a PatientID is not required.
    from tfrecords_tools.dicom_reader import ReaderOptions

    exam = load_exam(str(tmp_path), options=ReaderOptions(require_patient_id=False))
    assert exam.patient_id == ""
    np.testing.assert_array_equal(exam.volumes["t2"], canon["t2"])


# ---- pydicom's bundled MR files: every transfer syntax through the reader -------------------

_VARIANTS = [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
]


def _exam_from_testfile(exam_dir, name, slices=3, bad_slice_from=None):
    """Four phases x ``slices`` copies of one pydicom test image (pixel data kept as encoded)."""
    for t in range(4):
        for k in range(slices):
            src = bad_slice_from if (bad_slice_from and t == 2 and k == 1) else name
            ds = _template(src)
            ds.SeriesInstanceUID = f"{_UID_ROOT}{t + 1}"
            ds.SOPInstanceUID = f"{_UID_ROOT}{t + 1}.{k + 1}"
            ds.SeriesNumber = t + 1
            ds.AcquisitionTime = f"10{t}000"
            ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 0.8 * k]
            _write(ds, os.path.join(exam_dir, f"s{t}", f"{k}.dcm"))


@pytest.mark.parametrize("name", _VARIANTS)
def test_pydicom_transfer_syntaxes_identical_pixels(tmp_path, name):
    reference = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm")).pixel_array
    _exam_from_testfile(str(tmp_path), name)
    exam = load_exam(str(tmp_path))
    assert exam.shape == (3, 64, 64)
    assert exam.spacing == pytest.approx((0.8, 0.3125, 0.3125))
    # MR_small is axial with rows toward Posterior and cols toward Left: no flips.
    for p in PHASES:
        for k in range(3):
            np.testing.assert_array_equal(exam.volumes[p][k], reference.astype(np.float32))


@pytest.mark.parametrize(
    "name,uid,label",
    [
        ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, "JPEG-LS Lossless"),
        ("MR_small_jp2klossless.dcm", JPEG2000Lossless, "JPEG 2000"),
    ],
)
def test_missing_codec_names_transfer_syntax_and_extra(tmp_path, monkeypatch, name, uid, label):
    decoder = get_decoder(uid)
    monkeypatch.setattr(decoder, "_available", {})  # As if no plugin were installed.
    _exam_from_testfile(str(tmp_path), name)
    with pytest.raises(ExamError) as e:
        load_exam(str(tmp_path))
    assert label in e.value.reason
    assert "pip install 'mri_keras[dicom-codecs]'" in e.value.reason
    assert str(tmp_path) in str(e.value)


def test_truncated_pixel_data_is_an_exam_error(tmp_path):
    _exam_from_testfile(str(tmp_path), "MR_small.dcm", bad_slice_from="MR_truncated.dcm")
    with pytest.raises(ExamError, match="unreadable pixel data") as e:
        load_exam(str(tmp_path))
    assert e.value.file == os.path.join("s2", "1.dcm")


def test_truncated_header_is_an_exam_error(tmp_path):
    _exam_from_testfile(str(tmp_path), "MR_small.dcm")
    path = tmp_path / "s1" / "0.dcm"
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ExamError):
        load_exam(str(tmp_path))


def test_exam_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(ExamError("E1", "bad", "f.dcm")))
    assert (e.exam, e.reason, e.file) == ("E1", "bad", "f.dcm")


@pytest.mark.parametrize(
    "bits,stored,signed,values",
    [
        (16, 12, 0, [0xF123, 0x0FFF, 0x1000]),  # High bits above BitsStored are masked off.
        (16, 12, 1, [0x0FFF, 0x0800, 0x07FF]),  # 12-bit two's complement is sign-extended.
        (16, 16, 1, [0x8000, 0x7FFF, 0xFFFF]),
        (8, 8, 0, [0, 200, 255]),
    ],
)
def test_native_pixel_path_equals_pydicom(tmp_path, bits, stored, signed, values):
    ds = _template()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = signed
    ds.Rows = ds.Columns = 4
    raw = np.resize(np.asarray(values, dtype=np.uint16 if bits == 16 else np.uint8), (4, 4))
    ds.PixelData = raw.tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    ds = pydicom.dcmread(path)
    im = dicom_files._parse_image(str(tmp_path), "x.dcm", ds)
    fast = dicom_pixels._native_pixels(str(tmp_path), im, ds.file_meta.TransferSyntaxUID)
    assert fast is not None
    np.testing.assert_array_equal(fast, ds.pixel_array)
    assert fast.dtype == ds.pixel_array.dtype
