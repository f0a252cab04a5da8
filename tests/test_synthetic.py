"""Tests of the synthetic DICOM cohort (tfrecords_tools.synthetic and its helpers).

The reorientation used here is a small reference written for the tests from the DICOM
definitions (IOP/IPP only); it shares no code with the generator or the converter.
"""

import collections
import csv
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage

from tfrecords_tools import schema, synthetic, synthetic_dicom, synthetic_geometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = {synthetic.LABELS_CSV, synthetic.ANNOTATIONS_CSV, synthetic.COHORT_JSON}
REQUIRED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyDate",
    "SeriesNumber",
    "SeriesDescription",
    "AcquisitionTime",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "MagneticFieldStrength",
    "Manufacturer",
    "InstanceNumber",
    "FrameOfReferenceUID",
    "ImageType",
)


ENHANCED_REQUIRED = (
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SeriesNumber",
    "AcquisitionDateTime",
    "ImageType",
    "NumberOfFrames",
    "FrameOfReferenceUID",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "MagneticFieldStrength",
)


# ---- helpers ---------------------------------------------------------------------------------


def _walk(root):
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            yield os.path.join(dirpath, name)


def _read_exam(cohort, exam):
    """All DICOM images of one exam folder, and the paths of its non-DICOM files.

    Enhanced MR objects are split into one single-frame-like data set per frame.
    """
    datasets, others = [], []
    for path in _walk(os.path.join(cohort.root, exam.exam)):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            others.append(path)
            continue
        datasets.extend(_split_frames(ds) if ds.SOPClassUID == EnhancedMRImageStorage else [ds])
    return datasets, others


_COPIED = (
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "StudyDate",
    "ImageType",
    "Rows",
    "Columns",
    "ContrastBolusAgent",
    "FrameOfReferenceUID",
)


def _split_frames(ds):
    """Enhanced MR -> one data set per frame holding what a single-frame image would.

    Read with pydicom's keyword access, from the DICOM definitions: a frame's own functional
    group, else the shared one; the phase from the frame's TemporalPositionIndex; the pixels
    in ``frame_pixels``.
    """
    shared = ds.SharedFunctionalGroupsSequence[0]
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    frames = []
    for k, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):

        def group(name, groups=groups):
            return (groups.get(name) or shared.get(name))[0]

        content = groups.FrameContentSequence[0]
        frame = Dataset()
        for keyword in _COPIED:
            if keyword in ds:
                setattr(frame, keyword, ds[keyword].value)
        frame.ImagePositionPatient = group("PlanePositionSequence").ImagePositionPatient
        frame.ImageOrientationPatient = group("PlaneOrientationSequence").ImageOrientationPatient
        measures = group("PixelMeasuresSequence")
        frame.PixelSpacing = measures.PixelSpacing
        frame.SliceThickness = measures.SliceThickness
        frame.SpacingBetweenSlices = measures.SpacingBetweenSlices
        rescale = group("PixelValueTransformationSequence")
        frame.RescaleSlope, frame.RescaleIntercept = rescale.RescaleSlope, rescale.RescaleIntercept
        frame.AcquisitionTime = content.FrameAcquisitionDateTime[8:]
        if "TemporalPositionIndex" in content:
            frame.TemporalPositionIdentifier = content.TemporalPositionIndex
        frame.InstanceNumber = content.InStackPositionNumber
        frame.frame_pixels = pixels[k]
        frames.append(frame)
    return frames


def _pixels(ds):
    return ds.frame_pixels if "frame_pixels" in ds.__dict__ else ds.pixel_array


def _dce_phases(datasets):
    """Groups the DCE images into t0..t3 like a minimal converter would.

    Original, non-localizer images are grouped by (series, temporal position); the four groups
    sharing one geometry are the DCE phases, in acquisition-time order.
    """
    groups = collections.defaultdict(list)
    for ds in datasets:
        image_type = list(ds.ImageType)
        if image_type[0] != "ORIGINAL" or "LOCALIZER" in image_type:
            continue
        groups[(ds.SeriesInstanceUID, int(ds.get("TemporalPositionIdentifier", 0)))].append(ds)
    by_geometry = collections.defaultdict(list)
    for members in groups.values():
        key = (
            tuple(np.round(np.array(members[0].ImageOrientationPatient, float), 4)),
            len(members),
            members[0].Rows,
            members[0].Columns,
        )
        by_geometry[key].append(members)
    (phases,) = [g for g in by_geometry.values() if len(g) in (4, 8)]
    phases = sorted(phases, key=lambda members: float(members[0].AcquisitionTime))
    if len(phases) == 8:  # One series per breast and phase: the two sides of each phase.
        side = lambda members: min(float(d.ImagePositionPatient[0]) for d in members)  # noqa
        right_x = min(side(m) for m in phases)
        right = [m for m in phases if side(m) == right_x]
        left = [m for m in phases if side(m) != right_x]
        assert len(right) == len(left) == 4
        phases = [r + l for r, l in zip(right, left)]
    return phases


def _reference_canonical(slices):
    """Reference reorientation: DICOM slices of one phase -> canonical (S, H, W), spacing, origin.

    Slices are ordered by their position along the IOP normal; then every array axis is matched
    to the LPS axis its direction runs along and flipped where it runs backwards.
    """
    iop = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]  # column index runs along row_dir, row index along col_dir
    normal = np.cross(row_dir, col_dir)

    def position(ds):
        return np.array(ds.ImagePositionPatient, dtype=np.float64)

    slices = sorted(slices, key=lambda ds: float(position(ds) @ normal))
    positions = np.array([position(ds) for ds in slices])
    volume = np.stack(
        [
            _pixels(ds).astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in slices
        ]
    ).astype(np.float32)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    steps = np.diff(positions, axis=0)
    slice_spacing = float(np.linalg.norm(steps[0]))
    directions = [normal, col_dir, row_dir]
    spacings = [slice_spacing, row_spacing, col_spacing]
    # canonical axis -> LPS component: slice -> z (2), row -> y (1), col -> x (0)
    order, flips, canonical_spacing = [], [], []
    for component in (2, 1, 0):
        axis = int(np.argmax([abs(d[component]) for d in directions]))
        assert abs(directions[axis][component]) > 0.999
        order.append(axis)
        flips.append(directions[axis][component] < 0)
        canonical_spacing.append(spacings[axis])
    volume = volume.transpose(order)
    corner = positions[0].copy()
    for canon_axis, (axis, flip) in enumerate(zip(order, flips)):
        if flip:
            volume = np.flip(volume, axis=canon_axis)
            corner += directions[axis] * spacings[axis] * (volume.shape[canon_axis] - 1)
    return np.ascontiguousarray(volume), np.array(canonical_spacing), corner


def _read_table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- geometry helper -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(synthetic_geometry.ORIENTATIONS))
def test_every_stored_voxel_sits_where_its_canonical_voxel_is(name):
    """Position of stored pixel (n, r, c) from the header == position of the canonical voxel
    with the same value (values are unique, so this pins down the whole mapping)."""
    shape, spacing, origin = (3, 4, 5), (2.5, 1.25, 0.75), (-10.0, 20.0, 30.5)
    volume = np.arange(np.prod(shape)).reshape(shape)
    orientation = synthetic_geometry.ORIENTATIONS[name]
    stack = synthetic_geometry.acquire(volume, spacing, origin, orientation)
    iop = stack.orientation
    assert np.allclose(np.linalg.norm(iop[:3]), 1) and np.allclose(np.dot(iop[:3], iop[3:]), 0)
    for n, r, c in itertools.product(*[range(s) for s in stack.pixels.shape]):
        pos = (
            stack.positions[n]
            + c * stack.pixel_spacing[1] * iop[:3]
            + r * stack.pixel_spacing[0] * iop[3:]
        )
        k, i, j = np.unravel_index(stack.pixels[n, r, c], shape)
        expected = np.array(origin) + np.array([j * spacing[2], i * spacing[1], k * spacing[0]])
        np.testing.assert_allclose(pos, expected, atol=1e-9, err_msg=f"{name} {(n, r, c)}")
    # Consecutive slices are one slice spacing apart, along the IOP normal (either sign).
    steps = np.diff(stack.positions, axis=0)
    np.testing.assert_allclose(np.abs(steps @ stack.normal), stack.slice_spacing)
    np.testing.assert_allclose(np.linalg.norm(steps, axis=1), stack.slice_spacing)


def test_orientations_cover_the_requested_geometries():
    o = synthetic_geometry.ORIENTATIONS
    np.testing.assert_array_equal(o["standard"].image_orientation(), [1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(o["reversed_cols"].image_orientation(), [-1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(o["sagittal"].image_orientation(), [0, 1, 0, 0, 0, -1])
    stack = synthetic_geometry.acquire(
        np.zeros((4, 2, 2)), (3, 1, 1), (0, 0, 0), o["descending_slices"]
    )
    np.testing.assert_array_equal(stack.positions[:, 2], [9, 6, 3, 0])
    with pytest.raises(ValueError, match="permutation"):
        synthetic_geometry.Orientation("bad", (0, 0, 1), (False,) * 3)


# ---- the DICOM files -------------------------------------------------------------------------


def test_fast_writer_matches_pydicom_dcmwrite_byte_for_byte():
    volume = np.random.default_rng(0).integers(0, 4000, (3, 20, 24)).astype(np.uint16)
    stack = synthetic_geometry.acquire(
        volume, (3, 1.5, 1.25), (-10, -20.5, 30), synthetic_geometry.ORIENTATIONS["sagittal"]
    )
    header = dict(
        PatientID="SYNPID1",
        PatientName="SYN^X",
        Modality="MR",
        RescaleSlope="1.5",
        ImageType=["ORIGINAL", "PRIMARY"],
        SeriesNumber=3,
        StudyDate="20200101",
    )
    frame = synthetic_dicom.Frame(stack, 1, 36000.5, {"TemporalPositionIdentifier": 2})
    dynamic = synthetic_dicom.frame_elements(frame, "1.2.3.4", 7)
    fast = synthetic_dicom.encode_file(
        synthetic_dicom.static_elements(header, stack), dynamic, stack.pixels[1]
    )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    geometry = synthetic_dicom._geometry_elements(stack)
    for keyword, value in {**header, **geometry, **dynamic}.items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(stack.pixels[1]).tobytes()
    reference = io.BytesIO()
    ds.save_as(reference, enforce_file_format=True)
    assert fast == reference.getvalue()


def _check_enhanced(ds, path):
    """An Enhanced MR object: functional groups, a temporal dimension, frames interleaved."""
    for keyword in ENHANCED_REQUIRED:
        assert keyword in ds, f"{keyword} missing in {path}"
    frames = int(ds.NumberOfFrames)
    assert len(ds.PerFrameFunctionalGroupsSequence) == frames > 1
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert "PlaneOrientationSequence" in shared and "PixelMeasuresSequence" in shared
    pointers = [int(d.DimensionIndexPointer) for d in ds.DimensionIndexSequence]
    temporal = {
        pydicom.datadict.tag_for_keyword(k)
        for k in ("TemporalPositionIndex", "FrameAcquisitionDateTime")
    }
    assert temporal & set(pointers), path
    keys = []
    for groups in ds.PerFrameFunctionalGroupsSequence:
        content = groups.FrameContentSequence[0]
        assert len(groups.PlanePositionSequence[0].ImagePositionPatient) == 3
        assert len(content.DimensionIndexValues) == len(pointers)
        keys.append((content.get("TemporalPositionIndex", 0), content.InStackPositionNumber))
        assert ("PixelValueTransformationSequence" in groups) != (
            "PixelValueTransformationSequence" in shared
        )
    assert len(set(keys)) == frames
    assert keys != sorted(keys) and keys != sorted(keys, key=lambda k: (k[1], k[0]))
    assert ds.pixel_array.shape == (frames, ds.Rows, ds.Columns)


def test_every_file_is_valid_mr_image_storage(tiny_cohort_varied):
    cohort = tiny_cohort_varied
    sop_uids, non_dicom = set(), []
    for path in _walk(cohort.root):
        if os.path.basename(path) in TABLES:
            continue
        with open(path, "rb") as f:
            head = f.read(132)
        if head[128:132] != b"DICM":
            non_dicom.append(os.path.basename(path))
            continue
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID == EnhancedMRImageStorage:
            assert ds.file_meta.MediaStorageSOPClassUID == EnhancedMRImageStorage
            _check_enhanced(ds, path)
            sop_uids.add(ds.SOPInstanceUID)
            continue
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage == ds.SOPClassUID, path
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
        for keyword in REQUIRED:
            assert keyword in ds, f"{keyword} missing in {path}"
        if "GR" in ds.ScanningSequence and "LOCALIZER" not in ds.ImageType:  # DCE and subtraction
            assert "RescaleSlope" in ds and "RescaleIntercept" in ds, path
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and pixels.shape == (ds.Rows, ds.Columns)
        assert ds.SOPInstanceUID not in sop_uids
        sop_uids.add(ds.SOPInstanceUID)
        assert ds.MagneticFieldStrength in (1.5, 3.0)
    assert non_dicom == ["notes.txt"] * len(cohort.exams)
    assert len(sop_uids) == cohort.num_files


def test_geometry_tags_agree(tiny_cohort_varied):
    cohort = tiny_cohort_varied
    for exam in cohort.exams:
        datasets, _ = _read_exam(cohort, exam)
        series = collections.defaultdict(list)
        for ds in datasets:
            if "LOCALIZER" in ds.ImageType:  # three planes in one series: checked below
                assert (
                    len(
                        {
                            tuple(d.ImageOrientationPatient)
                            for d in datasets
                            if d.SeriesInstanceUID == ds.SeriesInstanceUID
                        }
                    )
                    == 3
                )
                continue
            series[(ds.SeriesInstanceUID, ds.get("TemporalPositionIdentifier", 0))].append(ds)
        for members in series.values():
            iop = np.array(members[0].ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            assert np.isclose(np.dot(iop[:3], iop[3:]), 0) and np.isclose(np.linalg.norm(normal), 1)
            spacing = float(members[0].SpacingBetweenSlices)
            assert float(members[0].SliceThickness) == spacing
            members = sorted(members, key=lambda d: d.InstanceNumber)
            positions = np.array([np.array(d.ImagePositionPatient, float) for d in members])
            steps = np.diff(positions, axis=0)
            # Steps are one slice spacing long and run along the normal (either direction).
            np.testing.assert_allclose(np.abs(steps @ normal), spacing, atol=2e-4)
            np.testing.assert_allclose(np.linalg.norm(steps, axis=1), spacing, atol=2e-4)
            for d, p in zip(members, positions):
                assert list(d.ImageOrientationPatient) == list(members[0].ImageOrientationPatient)
                if "SliceLocation" in d:  # Not in Enhanced MR frames.
                    assert np.isclose(float(d.SliceLocation), p @ normal, atol=1e-3)


def test_variants_series_layout_and_extra_series(tiny_cohort_varied):
    cohort = tiny_cohort_varied
    assert {e.variant for e in cohort.exams} == set(synthetic.VARIANTS)
    for exam in cohort.exams:
        datasets, _ = _read_exam(cohort, exam)
        phases = _dce_phases(datasets)
        S, H, W = exam.shape
        series_uids = {d.SeriesInstanceUID for group in phases for d in group}
        if exam.variant in ("multiphase_series", "enhanced_one_file"):
            assert len(series_uids) == 1
            assert [int(g[0].TemporalPositionIdentifier) for g in phases] == [1, 2, 3, 4]
        else:
            assert len(series_uids) == (8 if exam.variant == "unilateral_sagittal" else 4)
        if exam.variant == "multiphase_series":
            assert all(int(d.NumberOfTemporalPositions) == 4 for g in phases for d in g)
        expected_slices = {"sagittal": W, "coronal": H, "unilateral_sagittal": W}.get(
            exam.variant, S
        )
        assert all(len(g) == expected_slices for g in phases)
        # t0 first, then 60-90 s between phases, and the header says so.
        times = [_tm_seconds(str(g[0].AcquisitionTime)) for g in phases]
        gaps = np.diff(times)
        assert np.all((gaps >= 60) & (gaps <= 90)), gaps
        np.testing.assert_allclose(times, exam.phase_times, atol=1e-3)
        assert "ContrastBolusAgent" not in phases[0][0] or exam.variant in (
            "multiphase_series",
            "enhanced_one_file",
        )
        # Extra series: T2 with another grid, a derived subtraction on the DCE grid.
        t2 = [d for d in datasets if d.SeriesDescription.startswith("ax T2")]
        assert t2 and (t2[0].Rows, len(t2)) != (phases[0][0].Rows, len(phases[0]))
        sub = [d for d in datasets if d.ImageType[0] == "DERIVED"]
        assert len(sub) == len(phases[0]) and "SUBTRACTION" in sub[0].ImageType
        assert sub[0].ImageOrientationPatient == phases[0][0].ImageOrientationPatient
        assert len([d for d in datasets if "LOCALIZER" in d.ImageType]) == 3
        assert len({d.StudyInstanceUID for d in datasets}) == 1


def _tm_seconds(text):
    """DICOM TM ``HHMMSS.ffffff`` -> seconds since midnight."""
    return int(text[:2]) * 3600 + int(text[2:4]) * 60 + float(text[4:])


def test_each_variant_undone_with_its_header_gives_the_canonical_arrays(
    tiny_cohort, tiny_cohort_varied
):
    """DICOM of every variant -> reference reorientation == canonical_dir == standard cohort."""
    standard = {e.exam: e for e in tiny_cohort.exams}
    for exam in tiny_cohort_varied.exams:
        truth = np.load(os.path.join(tiny_cohort_varied.canonical_dir, exam.npz_name))
        standard_truth = np.load(os.path.join(tiny_cohort.canonical_dir, exam.npz_name))
        datasets, _ = _read_exam(tiny_cohort_varied, exam)
        std_datasets, _ = _read_exam(tiny_cohort, standard[exam.exam])
        groups = zip(schema.PHASES, _dce_phases(datasets), _dce_phases(std_datasets))
        for phase, group, std_group in groups:
            volume, spacing, corner = _reference_canonical(group)
            std_volume, std_spacing, std_corner = _reference_canonical(std_group)
            message = f"{exam.exam} ({exam.variant}) {phase}"
            assert volume.shape == exam.shape, message
            np.testing.assert_array_equal(volume, truth[phase], err_msg=message)
            np.testing.assert_array_equal(volume, std_volume, err_msg=message)
            np.testing.assert_array_equal(truth[phase], standard_truth[phase], err_msg=message)
            np.testing.assert_allclose(spacing, truth["spacing"], rtol=1e-5, err_msg=message)
            np.testing.assert_allclose(spacing, std_spacing, rtol=1e-5, err_msg=message)
            np.testing.assert_allclose(corner, exam.origin, atol=1e-3, err_msg=message)
            np.testing.assert_allclose(std_corner, exam.origin, atol=1e-3, err_msg=message)
        np.testing.assert_array_equal(truth["labels"], exam.labels)
        assert truth["t0"].dtype == np.float32 and truth["labels"].dtype == np.int64


def test_canonical_orientation_puts_breasts_anterior_and_left_lesions_left(tiny_cohort):
    for exam in tiny_cohort.exams:
        truth = np.load(os.path.join(tiny_cohort.canonical_dir, exam.npz_name))
        S, H, W = exam.shape
        # The blood pool (heart, aorta: the strongest early enhancement) is posterior and lies
        # left of the midline.
        early = truth["t1"] - truth["t0"]
        _, rows, cols = np.nonzero(early > np.percentile(early, 99.5))
        assert rows.mean() > H / 2 and cols.mean() > W / 2, exam.exam
        # Prone: air in front of the breasts, the body fills the posterior half.
        assert truth["t0"][:, 0, :].mean() < 0.3 * truth["t0"][:, H // 2 :, :].mean(), exam.exam
        for lesion in exam.lesions:
            assert (lesion.center[2] >= W // 2) == (lesion.side == "left"), exam.exam
            assert lesion.center[1] < H * 0.55, exam.exam  # breasts hang anteriorly


def test_rescale_varies_and_canonical_is_stored_times_slope_plus_intercept(tiny_cohort):
    exams = synthetic.plan_cohort(60, seed=5)
    assert len({(e.rescale_slope, e.rescale_intercept) for e in exams}) > 3
    for exam in tiny_cohort.exams[:3]:
        datasets, _ = _read_exam(tiny_cohort, exam)
        ds = datasets[0]
        assert float(ds.RescaleSlope) == exam.rescale_slope
        assert float(ds.RescaleIntercept) == exam.rescale_intercept
        values = ds.pixel_array.astype(np.float64) * exam.rescale_slope + exam.rescale_intercept
        assert np.array_equal(values.astype(np.float32), values)  # exact in float32


# ---- labels and content ----------------------------------------------------------------------


def test_labels_csv_agrees_with_annotations_csv(tiny_cohort):
    labels = _read_table(tiny_cohort.labels_csv)
    annotations = _read_table(tiny_cohort.annotations_csv)
    with open(tiny_cohort.labels_csv) as f:
        assert f.readline().strip() == "exam," + ",".join(schema.LABELS)
    with open(tiny_cohort.annotations_csv) as f:
        assert f.readline().strip() == ",".join(synthetic.ANNOTATION_COLUMNS)
    assert [r["exam"] for r in labels] == [e.exam for e in tiny_cohort.exams]
    for row in labels:
        assert os.path.isdir(os.path.join(tiny_cohort.root, row["exam"]))
        expected = {label: 0 for label in schema.LABELS}
        for a in annotations:
            if a["exam"] == row["exam"]:
                assert a["side"] in ("left", "right") and a["pathology"] in ("benign", "malignant")
                expected[f"{a['side']}_{a['pathology']}"] = 1
                centre = [int(a["slice"]), int(a["row"]), int(a["col"])]
                assert all(0 <= c < n for c, n in zip(centre, (8, 32, 32))), a
                assert 2.0 <= float(a["radius"]) <= 8.0
        assert {k: int(row[k]) for k in schema.LABELS} == expected, row["exam"]
    assert {a["exam"] for a in annotations} <= {r["exam"] for r in labels}


def test_label_mix_patients_with_several_exams_and_identifiers():
    exams = synthetic.plan_cohort(300, seed=0)
    mix = synthetic.label_mix([e.labels for e in exams])
    for name, target in synthetic.LABEL_MIX:
        assert abs(mix[name] - target) < 0.006, mix
    by_patient = collections.defaultdict(list)
    for e in exams:
        by_patient[e.patient_index].append(e)
    several = [v for v in by_patient.values() if len(v) > 1]
    assert len(several) > 30
    for group in several:
        assert len({e.patient_id for e in group}) == 1
        assert len({e.exam.split("/")[0] for e in group}) == 1
    sides = collections.Counter(l.side for e in exams for l in e.lesions)
    assert sides["left"] > 50 and sides["right"] > 50
    assert all(e.patient_id.startswith("SYNPID") for e in exams)


def test_identifiers_live_only_in_the_dicom_headers(tiny_cohort):
    ids = tiny_cohort.identifiers
    assert all(n.startswith("SYN^") for n in ids.patient_names)
    assert len(ids.patient_ids) == 8 and len(set(ids.patient_ids)) == 8
    assert set(ids.all) == set(ids.distinctive) | set(ids.dates)
    headers = collections.defaultdict(set)
    for exam in tiny_cohort.exams:
        datasets, _ = _read_exam(tiny_cohort, exam)
        for keyword in (
            "PatientID",
            "PatientName",
            "PatientBirthDate",
            "StudyDate",
            "AccessionNumber",
            "StudyInstanceUID",
            "SeriesInstanceUID",
        ):
            headers[keyword].update(str(ds.data_element(keyword).value) for ds in datasets)
    assert headers["PatientID"] == set(ids.patient_ids)
    assert headers["PatientName"] == set(ids.patient_names)
    assert headers["PatientBirthDate"] == set(ids.birth_dates)
    assert headers["StudyDate"] == set(ids.study_dates)
    assert headers["AccessionNumber"] == set(ids.accession_numbers)
    assert headers["StudyInstanceUID"] | headers["SeriesInstanceUID"] <= set(ids.uids)
    for name in TABLES:
        text = open(os.path.join(tiny_cohort.root, name)).read()
        for ident in ids.distinctive:
            assert ident not in text, (ident, name)
    # A patient's exams share PatientID but have their own study date and study UID.
    for index in {e.patient_index for e in tiny_cohort.exams}:
        group = [e for e in tiny_cohort.exams if e.patient_index == index]
        assert len({e.patient_id for e in group}) == 1


def _lesion_contrast(volume, lesion):
    """Percentile of the lesion core's mean among the surrounding tissue ring, same slice."""
    k, i, j = lesion.center
    rows, cols = np.mgrid[: volume.shape[1], : volume.shape[2]]
    dist = np.hypot(rows - i, cols - j)
    core = dist <= max(1.0, 0.5 * lesion.radius)
    ring = (dist > 1.5 * lesion.radius) & (dist <= 3.0 * lesion.radius)
    return np.mean(volume[k][ring] < volume[k][core].mean())


def test_lesions_bright_in_t2_minus_t0_but_not_in_t0(tmp_path):
    cohort = synthetic.generate_cohort(
        str(tmp_path / "c"),
        16,
        seed=2,
        slices=10,
        rows=48,
        cols=48,
        canonical_dir=str(tmp_path / "truth"),
        workers=1,
    )
    sub_ranks, t0_ranks = [], []
    for exam in cohort.exams:
        truth = np.load(os.path.join(cohort.canonical_dir, exam.npz_name))
        for lesion in exam.lesions:
            sub_ranks.append(_lesion_contrast(truth["t2"] - truth["t0"], lesion))
            t0_ranks.append(_lesion_contrast(truth["t0"], lesion))
    assert len(sub_ranks) >= 8
    # In the subtraction the lesion is brighter than (nearly) all of its surroundings ...
    assert min(sub_ranks) > 0.6 and np.mean(sub_ranks) > 0.85, sub_ranks
    # ... before contrast it is not clearly so (it keeps the value of the tissue it sits in).
    assert np.mean(t0_ranks) < 0.75, t0_ranks
    assert np.mean(sub_ranks) - np.mean(t0_ranks) > 0.2


# ---- determinism, CLI, errors ----------------------------------------------------------------


def _tree_bytes(root):
    return {os.path.relpath(p, root): open(p, "rb").read() for p in _walk(root)}


def test_same_seed_same_bytes_other_seed_other_cohort(tmp_path):
    kwargs = dict(slices=4, rows=16, cols=16, variants=("standard", "sagittal"), workers=1)
    a = synthetic.generate_cohort(str(tmp_path / "a"), 3, seed=4, **kwargs)
    b = synthetic.generate_cohort(str(tmp_path / "b"), 3, seed=4, **kwargs)
    c = synthetic.generate_cohort(str(tmp_path / "c"), 3, seed=5, **kwargs)
    tree_a, tree_b = _tree_bytes(a.root), _tree_bytes(b.root)
    assert tree_a.keys() == tree_b.keys()
    for name in tree_a:
        assert tree_a[name] == tree_b[name], name
    assert a.identifiers == b.identifiers
    assert set(c.identifiers.patient_ids).isdisjoint(a.identifiers.patient_ids)

    def pixels(tree):
        return sorted(
            pydicom.dcmread(io.BytesIO(v)).PixelData
            for k, v in tree.items()
            if os.path.basename(k) not in TABLES
        )

    assert pixels(tree_a) != pixels(_tree_bytes(c.root))


def test_parallel_workers_write_the_same_cohort(tmp_path):
    kwargs = dict(slices=2, rows=16, cols=16, seed=9)
    serial = synthetic.generate_cohort(str(tmp_path / "s"), 9, workers=1, **kwargs)
    parallel = synthetic.generate_cohort(str(tmp_path / "p"), 9, workers=2, **kwargs)
    assert len(serial.exams) >= 8  # enough exams for the process pool to be used
    assert _tree_bytes(serial.root) == _tree_bytes(parallel.root)


def test_cli_writes_a_cohort_and_rejects_stray_arguments(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "tfrecords_tools.synthetic",
        f"--output_dir={out}",
        "--num_patients=2",
        "--seed=1",
        "--slices=3",
        "--rows=16",
        "--cols=16",
        "--spacing=4,2,2",
        "--variants=coronal",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"to {out}" in proc.stdout and "Label mix:" in proc.stdout
    info = json.load(open(out / synthetic.COHORT_JSON))
    assert info["spacing"] == [4.0, 2.0, 2.0] and info["variants"] == ["coronal"]
    assert len(_read_table(out / "labels.csv")) == info["num_exams"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode != 0 and "not empty" in again.stderr
    stray = subprocess.run(
        cmd[:4] + ["extra"], capture_output=True, text=True, env=env, timeout=120
    )
    assert stray.returncode != 0 and "Unexpected arguments: extra" in stray.stderr


def test_invalid_arguments_and_overwrite(tmp_path):
    with pytest.raises(ValueError, match="variants"):
        synthetic.generate_cohort(str(tmp_path / "a"), 1, variants=("oblique",))
    with pytest.raises(ValueError, match="spacing"):
        synthetic.generate_cohort(str(tmp_path / "a"), 1, spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="num_patients"):
        synthetic.generate_cohort(str(tmp_path / "a"), 0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="does not\\s+look like a synthetic cohort"):
        synthetic.generate_cohort(str(foreign), 1, slices=2, rows=16, cols=16, overwrite=True)
    assert (foreign / "keep.txt").exists()
    first = synthetic.generate_cohort(str(tmp_path / "c"), 1, slices=2, rows=16, cols=16)
    old_files = set(_tree_bytes(first.root))
    second = synthetic.generate_cohort(
        str(tmp_path / "c"), 1, slices=2, rows=16, cols=16, seed=1, overwrite=True
    )
    assert first.identifiers != second.identifiers
    new_files = set(_tree_bytes(second.root))
    assert len(new_files) == second.num_files + len(TABLES)
    assert (old_files & new_files) == TABLES  # nothing of the old cohort is left
