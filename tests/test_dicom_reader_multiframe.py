"""Reader tests for real scanner exports: Enhanced MR multi-frame objects, per-breast series,
and the reasons given when a folder holds no DCE series.

Exams are written with the synthetic cohort's writers (`synthetic_dicom`, `synthetic_geometry`)
from small canonical arrays, so the expected result is the canonical array itself.
"""

import copy

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, LegacyConvertedEnhancedMRImageStorage, RLELossless

from tfrecords_tools import dicom_files, dicom_pixels
from tfrecords_tools.dicom_reader import ExamError, load_exam
from tfrecords_tools.synthetic_dicom import (
    Frame,
    multiframe_dataset,
    write_multiframe,
    write_series,
)
from tfrecords_tools.synthetic_geometry import ORIENTATIONS, acquire

PHASES = ("t0", "t1", "t2", "t3")
SHAPE = (4, 32, 32)  # Canonical (slice, row, col).
SPACING = (3.0, 1.25, 1.5)
ORIGIN = (-20.0, -30.0, -40.0)
TIMES = (36000.0, 36070.0, 36140.0, 36210.0)  # Seconds since midnight.
PATIENT_ID = "SYNPID-MULTIFRAME-7"
SLOPE, INTERCEPT = 0.75, -16.0


def _canonical(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return {p: rng.integers(0, 4000, size=shape).astype(np.uint16) for p in PHASES}


def _values(stored):
    return (stored.astype(np.float64) * SLOPE + INTERCEPT).astype(np.float32)


def _header(uid, number, **extra):
    header = dict(
        PatientID=PATIENT_ID,
        PatientName="SYN^MULTIFRAME",
        StudyInstanceUID="1.2.826.0.1.9.1",
        SeriesInstanceUID=uid,
        SeriesNumber=number,
        StudyDate="20200101",
        AcquisitionDate="20200101",
        Modality="MR",
        FrameOfReferenceUID="1.2.826.0.1.9.2",
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
        ScanningSequence="GR",
        RepetitionTime="4.5",
        EchoTime="1.8",
        FlipAngle="10",
        RescaleSlope=f"{SLOPE:g}",
        RescaleIntercept=f"{INTERCEPT:g}",
    )
    header.update(extra)
    return header


def _stacks(canon, orientation="standard"):
    return {p: acquire(canon[p], SPACING, ORIGIN, ORIENTATIONS[orientation]) for p in PHASES}


def _phase_frames(stacks, phases=PHASES):
    return [
        Frame(stacks[p], n, TIMES[PHASES.index(p)], {"TemporalPositionIndex": PHASES.index(p) + 1})
        for p in phases
        for n in range(stacks[p].pixels.shape[0])
    ]


def _one_file(canon, seed=1, **kwargs):
    """Every phase and slice as frames of one object, in a shuffled frame order."""
    frames = _phase_frames(_stacks(canon))
    order = np.random.default_rng(seed).permutation(len(frames))
    return multiframe_dataset(
        _header("1.2.826.0.1.9.10", 10), frames, "1.2.826.0.1.9.11", order, **kwargs
    )


def _save(ds, path):
    write_multiframe(str(path), ds)


def _assert_canonical(exam, canon):
    assert exam.shape == SHAPE
    assert exam.spacing == pytest.approx(SPACING)
    for p in PHASES:
        np.testing.assert_array_equal(exam.voxel_values(p), _values(canon[p]), err_msg=p)


def _drop(ds, keyword):
    for groups in ds.PerFrameFunctionalGroupsSequence:
        content = groups.FrameContentSequence[0]
        if keyword in content:
            delattr(content, keyword)


@pytest.mark.parametrize("sop_class", ["enhanced", "legacy"])
@pytest.mark.parametrize("temporal", ["index", "datetime", "dimension"])
def test_one_file_all_phases_any_frame_order(tmp_path, temporal, sop_class):
    canon = _canonical()
    kwargs = {} if sop_class == "enhanced" else {"sop_class": LegacyConvertedEnhancedMRImageStorage}
    for seed in (1, 2):  # Two frame orders, one result.
        ds = _one_file(
            canon, seed=seed, temporal="datetime" if temporal == "datetime" else "index", **kwargs
        )
        if temporal == "dimension":  # Only DimensionIndexValues (declared temporal) is left.
            _drop(ds, "TemporalPositionIndex")
            _drop(ds, "FrameAcquisitionDateTime")
        exam_dir = tmp_path / f"{seed}"
        _save(ds, exam_dir / "dyn.dcm")
        exam = load_exam(str(exam_dir), keep_stored=True)
        _assert_canonical(exam, canon)
        assert exam.rescale == {p: (SLOPE, INTERCEPT) for p in PHASES}
        assert exam.patient_id == PATIENT_ID


def test_one_file_per_phase_mixed_with_classic_series(tmp_path):
    canon = _canonical(3)
    stacks = _stacks(canon, "sagittal")
    # t0 as classic single-frame files, t1..t3 as one Enhanced MR object (and series) each.
    header = _header("1.2.826.0.1.9.20", 20, AcquisitionNumber=1)
    n = stacks["t0"].pixels.shape[0]
    write_series(
        str(tmp_path / "pre"),
        header,
        [Frame(stacks["t0"], k, TIMES[0]) for k in range(n)],
        (f"{k}.dcm" for k in range(n)),
        [f"1.2.826.0.1.9.20.{k}" for k in range(n)],
    )
    for q, p in enumerate(PHASES[1:], start=1):
        frames = _phase_frames(stacks, [p])
        ds = multiframe_dataset(
            _header(f"1.2.826.0.1.9.2{q}", 20 + q),
            frames,
            f"1.2.826.0.1.9.3{q}",
            np.random.default_rng(q).permutation(n),
            temporal="datetime",
            rescale_per_frame=True,
        )
        _save(ds, tmp_path / "post" / f"{q}.dcm")
    _assert_canonical(load_exam(str(tmp_path)), canon)


def test_frame_rescale_wins_over_shared_and_per_frame_rescale_falls_back(tmp_path):
    canon = _canonical(4)
    ds = _one_file(canon, rescale_per_frame=True)
    # A shared rescale as well (not what the standard allows, but seen): the frame's wins.
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PixelValueTransformationSequence = [pydicom.Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = "7"
    shared.PixelValueTransformationSequence[0].RescaleIntercept = "100"
    _save(ds, tmp_path / "a" / "dyn.dcm")
    exam = load_exam(str(tmp_path / "a"), keep_stored=True)
    _assert_canonical(exam, canon)
    assert exam.rescale == {p: (SLOPE, INTERCEPT) for p in PHASES}
    # One frame with its own slope: that phase cannot keep one rescale; voxel values exact.
    groups = ds.PerFrameFunctionalGroupsSequence[5]
    tpi = groups.FrameContentSequence[0].TemporalPositionIndex
    groups.PixelValueTransformationSequence[0].RescaleSlope = "1.5"
    _save(ds, tmp_path / "b" / "dyn.dcm")
    exam = load_exam(str(tmp_path / "b"), keep_stored=True)
    assert exam.rescale is None and exam.volumes["t0"].dtype == np.float32
    position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
    k = int(round((position[2] - ORIGIN[2]) / SPACING[0]))  # Axial: slice index from z.
    phase = PHASES[tpi - 1]
    expected = _values(canon[phase])
    expected[k] = (canon[phase][k].astype(np.float64) * 1.5 + INTERCEPT).astype(np.float32)
    np.testing.assert_array_equal(exam.volumes[phase], expected)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_multiframe_decoded_once_per_file(tmp_path, monkeypatch, syntax):
    canon = _canonical(5)
    ds = _one_file(canon)
    ds.compress(syntax)
    _save(ds, tmp_path / "dyn.dcm")
    calls = []
    decode = dicom_pixels._pydicom_pixels
    monkeypatch.setattr(dicom_pixels, "_pydicom_pixels", lambda *a: calls.append(1) or decode(*a))
    _assert_canonical(load_exam(str(tmp_path)), canon)
    assert len(calls) == 1


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["native", "rle"])
def test_values_read_after_the_header_give_the_same_exam(tmp_path, monkeypatch, syntax):
    """Large values (pixel data, long functional-group sequences) are not read with the
    header: uncompressed pixels are mapped from the file, sequences read raw on demand,
    compressed pixels decoded by pydicom. With every value deferred the exam is the same, and
    a truncated file still fails with its reason."""
    canon = _canonical(8)
    ds = _one_file(canon)
    if syntax is not None:
        ds.compress(syntax)
    _save(ds, tmp_path / "dyn.dcm")
    monkeypatch.setattr(dicom_files, "_DEFER_BYTES", 16)  # Everything above 16 bytes.
    mapped = []
    pixel_bytes = dicom_pixels._pixel_bytes
    monkeypatch.setattr(
        dicom_pixels, "_pixel_bytes", lambda d: mapped.append(pixel_bytes(d)) or mapped[-1]
    )
    _assert_canonical(load_exam(str(tmp_path)), canon)
    if syntax is None:
        assert isinstance(mapped[0], memoryview)  # Mapped, not read into memory.
        path = tmp_path / "dyn.dcm"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 1000])
        with pytest.raises(ExamError, match="truncated file"):
            load_exam(str(tmp_path))


@pytest.mark.parametrize(
    "broken,reason",
    [
        ("missing_index", "TemporalPositionIndex missing in 1 of 16 frames"),
        ("repeated_index", "TemporalPositionIndex 2 repeated at one slice position"),
        ("no_temporal", "several frames at one slice position and nothing tells its phases apart"),
        (
            "partial_datetime",
            "nothing tells its phases apart (FrameAcquisitionDateTime missing in 1 of 16 frames, "
            "no TemporalPositionIndex or temporal dimension)",
        ),
        (
            "mixed_spacing",
            "frames of different geometry in one phase of a multi-frame series: "
            "they differ in pixel spacing",
        ),
        (
            "mixed_orientation",
            "frames of different geometry in one phase of a multi-frame "
            "series: they differ in orientation",
        ),
    ],
)
def test_broken_multiframe_objects_fail_with_reasons(tmp_path, broken, reason):
    ds = _one_file(_canonical(6))
    frames = ds.PerFrameFunctionalGroupsSequence
    content = [g.FrameContentSequence[0] for g in frames]
    if broken == "missing_index":
        del content[3].TemporalPositionIndex
    elif broken == "repeated_index":  # A t3 frame labelled t2 (t2 then has two at one slice).
        j = next(i for i, c in enumerate(content) if c.TemporalPositionIndex == 4)
        content[j].TemporalPositionIndex = 2
    elif broken in ("no_temporal", "partial_datetime"):
        _drop(ds, "TemporalPositionIndex")
        del ds.DimensionIndexSequence[1]
        if broken == "no_temporal":
            _drop(ds, "FrameAcquisitionDateTime")
        else:  # Times on all frames but one: not enough to tell the phases apart.
            del content[5].FrameAcquisitionDateTime
    else:
        j = next(i for i, c in enumerate(content) if c.TemporalPositionIndex == 3)
        shared = ds.SharedFunctionalGroupsSequence[0]
        name = "PixelMeasuresSequence" if broken == "mixed_spacing" else "PlaneOrientationSequence"
        item = copy.deepcopy(getattr(shared, name)[0])
        setattr(frames[j], name, [item])
        if broken == "mixed_spacing":
            item.PixelSpacing = ["1.3", "1.5"]
        else:
            item.ImageOrientationPatient = ["0.9962", "0.0872", "0", "-0.0872", "0.9962", "0"]
    _save(ds, tmp_path / "dyn.dcm")
    with pytest.raises(ExamError) as e:
        load_exam(str(tmp_path))
    assert reason in e.value.reason
    assert PATIENT_ID not in str(e.value)


# ---- one series per breast and phase -----------------------------------------------------


def _unilateral(exam_dir, canon, right_cols, left_cols, left_spacing=SPACING, left_shift=0.0):
    """Sagittal series per breast and phase from canonical column ranges."""
    for q, p in enumerate(PHASES):
        for s, cols, spacing in ((0, right_cols, SPACING), (1, left_cols, left_spacing)):
            origin = np.asarray(ORIGIN, np.float64)
            origin[0] += cols.start * SPACING[2] + (left_shift if s else 0.0)
            stack = acquire(canon[p][:, :, cols], spacing, origin, ORIENTATIONS["sagittal"])
            uid = f"1.2.826.0.1.9.4{q}{s}"
            n = stack.pixels.shape[0]
            header = _header(uid, 40 + 2 * q + s, AcquisitionNumber=1)
            write_series(
                str(exam_dir / f"{p}_{s}"),
                header,
                [Frame(stack, k, TIMES[q] + 3.0 * s) for k in range(n)],
                (f"{k}.dcm" for k in range(n)),
                [f"{uid}.{k}" for k in range(n)],
            )


def test_unilateral_series_assembled_with_zero_gap(tmp_path):
    canon = _canonical(7)
    _unilateral(tmp_path, canon, slice(0, 12), slice(20, 32))  # 8 columns between them.
    exam = load_exam(str(tmp_path), keep_stored=True)
    assert exam.shape == SHAPE
    for p in PHASES:
        expected = _values(canon[p])
        expected[:, :, 12:20] = 0.0
        np.testing.assert_array_equal(exam.voxel_values(p), expected, err_msg=p)
    assert exam.rescale is None  # Zero voxels in the gap are not stored x slope + intercept.


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(left_spacing=(3.0, 1.25, 1.4)), "have different voxel spacing"),
        (dict(left_shift=0.6), "are offset by a fraction of a voxel"),
        (dict(left_cols=slice(14, 32)), "overlap"),
    ],
    ids=["spacing", "fraction", "overlap"],
)
def test_unilateral_series_needing_resampling_rejected(tmp_path, kwargs, reason):
    args = dict(right_cols=slice(0, 16), left_cols=slice(16, 32))
    args.update(kwargs)
    _unilateral(tmp_path, _canonical(8), **args)
    with pytest.raises(ExamError) as e:
        load_exam(str(tmp_path))
    assert reason in e.value.reason
    assert "resampling" in e.value.reason


# ---- reasons that count what the folder held ----------------------------------------------


def test_all_derived_folder_names_what_was_skipped(tmp_path):
    canon = _canonical(9)
    stacks = _stacks(canon)
    for q, p in enumerate(PHASES):
        uid = f"1.2.826.0.1.9.5{q}"
        write_series(
            str(tmp_path / p),
            _header(uid, 50 + q, ImageType=["DERIVED", "SECONDARY"]),
            [Frame(stacks[p], k, TIMES[q]) for k in range(4)],
            (f"{k}.dcm" for k in range(4)),
            [f"{uid}.{k}" for k in range(4)],
        )
    (tmp_path / "notes.txt").write_text("not DICOM")
    localizer = multiframe_dataset(
        _header("1.2.826.0.1.9.60", 60, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        _phase_frames(stacks, ["t0"]),
        "1.2.826.0.1.9.61",
        range(4),
    )
    localizer.SharedFunctionalGroupsSequence[0].MRImageFrameTypeSequence[0].FrameType = [
        "ORIGINAL",
        "PRIMARY",
        "LOCALIZER",
        "NONE",
    ]
    _save(localizer, tmp_path / "loc.dcm")
    report = pydicom.Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    report.SOPInstanceUID = "1.2.826.0.1.9.70"
    report.SeriesInstanceUID = "1.2.826.0.1.9.71"
    report.PatientID = PATIENT_ID
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(ExamError) as e:
        load_exam(str(tmp_path))
    assert e.value.reason == (
        "no DCE series found: no original images; the folder holds 6 series: 0 original "
        "images; 16 images skipped as DERIVED (ImageType); 4 images skipped as localizer; "
        "1 object of other SOP classes (1 Enhanced SR Storage); 1 non-DICOM or unreadable file"
    )
    for text in (PATIENT_ID, "SYN^MULTIFRAME", "20200101"):
        assert text not in str(e.value)


def test_too_few_phases_reason_counts_the_folder(tmp_path):
    ds = _one_file(_canonical(10))
    keep = [
        g
        for g in ds.PerFrameFunctionalGroupsSequence
        if g.FrameContentSequence[0].TemporalPositionIndex != 4
    ]
    pixels = ds.pixel_array[
        [
            g.FrameContentSequence[0].TemporalPositionIndex != 4
            for g in ds.PerFrameFunctionalGroupsSequence
        ]
    ]
    ds.PerFrameFunctionalGroupsSequence = keep
    ds.NumberOfFrames = len(keep)
    ds.PixelData = pixels.tobytes()
    _save(ds, tmp_path / "dyn.dcm")
    with pytest.raises(ExamError) as e:
        load_exam(str(tmp_path))
    assert "the largest such set has 3" in e.value.reason
    assert "the folder holds 1 series: 12 original images; 0 images skipped as DERIVED" in (
        e.value.reason
    )


def _undefined_lengths(ds):
    """Every sequence and item written with undefined length (as many scanners write them)."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True


@pytest.mark.parametrize("encoding", ["undefined_lengths", "implicit_vr", "private_decoy"])
def test_functional_groups_read_in_any_encoding(tmp_path, encoding):
    canon = _canonical(11)
    ds = _one_file(canon, rescale_per_frame=True)
    if encoding == "undefined_lengths":
        _undefined_lengths(ds)
    elif encoding == "implicit_vr":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    else:  # A private per-frame group holding a wrong position (vendors copy attributes so).
        for n, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):
            block = groups.private_block(0x2005, "SYNTHETIC VENDOR", create=True)
            decoy = pydicom.Dataset()
            decoy.ImagePositionPatient = ["0", "0", str(1000 + n)]
            block.add_new(0x0F, "SQ", [decoy])
    _save(ds, tmp_path / "dyn.dcm")
    exam = load_exam(str(tmp_path), keep_stored=True)
    _assert_canonical(exam, canon)


def test_malformed_position_is_an_exam_error_without_header_text(tmp_path):
    ds = _one_file(_canonical(12))
    position = ds.PerFrameFunctionalGroupsSequence[7].PlanePositionSequence[0]
    text = "\\".join(str(v) for v in position.ImagePositionPatient).encode()
    _save(ds, tmp_path / "dyn.dcm")
    data = (tmp_path / "dyn.dcm").read_bytes()
    assert text in data
    garbage = b"SYN^" + b"X" * (len(text) - 4)  # pydicom would refuse to write it.
    (tmp_path / "dyn.dcm").write_bytes(data.replace(text, garbage, 1))
    with pytest.raises(ExamError, match="malformed functional groups") as e:
        load_exam(str(tmp_path))
    assert "SYN^" not in str(e.value) and e.value.file == "dyn.dcm"


def test_phase_map_names_two_series_per_phase_for_unilateral_exams(tmp_path):
    from tfrecords_tools import labels_csv

    canon = _canonical(13)
    _unilateral(tmp_path / "exam", canon, slice(0, 16), slice(16, 32))
    # Reversed on purpose: the map, not acquisition time, decides.
    overrides = {f"1.2.826.0.1.9.4{3 - q}{s}": PHASES[q] for q in range(4) for s in (0, 1)}
    exam = load_exam(str(tmp_path / "exam"), phase_overrides=overrides)
    for q, p in enumerate(PHASES):
        np.testing.assert_array_equal(exam.volumes[p], _values(canon[PHASES[3 - q]]))
    del overrides["1.2.826.0.1.9.400"]  # t3's right breast
    with pytest.raises(ExamError, match="phase t0 to two series or more"):
        load_exam(str(tmp_path / "exam"), phase_overrides=overrides)
    rows = "".join(f"exam,{uid},{phase}\n" for uid, phase in overrides.items())
    (tmp_path / "pm.csv").write_text("exam,series_instance_uid,phase\n" + rows)
    with pytest.raises(labels_csv.InputError, match=r"exactly once \(or exactly twice"):
        labels_csv.read_phase_map(str(tmp_path / "pm.csv"), ["exam"])
    (tmp_path / "pm.csv").write_text(
        "exam,series_instance_uid,phase\n" + rows + "exam,1.2.826.0.1.9.400,t3\n"
    )
    assert len(labels_csv.read_phase_map(str(tmp_path / "pm.csv"), ["exam"])["exam"]) == 8
