"""Tests of tfrecords_tools.convert: records, manifest, privacy, splits, resume, bad input."""

import copy
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import generate_uid

from tfrecords_tools import body_crop, dicom_reader, labels_csv, record_cache, schema, splits
from tfrecords_tools.convert_lib import ConvertConfig, convert
from tfrecords_tools.records import Records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "exam,left_benign,left_malignant,right_benign,right_malignant"


# ---- a tiny hand-made cohort (independent of the synthetic generator) -----------------------


def _write_exam(exam_dir, patient, seed, slices=4, size=8, extra=None):
    """Four axial DCE series of ``slices`` x size x size; returns the identifiers used."""
    tpl = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    tpl.ImageType = ["ORIGINAL", "PRIMARY"]
    tpl.PatientID = f"SYNPID{patient:05d}"
    tpl.PatientName = f"SYN^PATIENT{patient:05d}"
    tpl.PatientBirthDate = f"1950{patient % 12 + 1:02d}17"
    tpl.AccessionNumber = f"SYNACC{seed:06d}"
    tpl.StudyInstanceUID = generate_uid()
    tpl.Rows = tpl.Columns = size
    rng = np.random.default_rng(seed)
    ids = {
        tpl.PatientID,
        str(tpl.PatientName),
        tpl.PatientBirthDate,
        tpl.AccessionNumber,
        tpl.StudyInstanceUID,
    }
    for t in range(4):
        series_uid = generate_uid()
        ids.add(series_uid)
        for k in range(slices):
            ds = copy.deepcopy(tpl)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ids.add(ds.SOPInstanceUID)
            ds.SeriesNumber = t + 1
            ds.AcquisitionTime = f"10{t:02d}00"
            ds.ImagePositionPatient = [-10.0, -10.0, 2.5 * k]
            ds.PixelData = rng.integers(0, 1000, (size, size), dtype=np.int16).tobytes()
            if extra:
                extra(ds, t, k)
            path = os.path.join(exam_dir, f"series{t}", f"{ds.SOPInstanceUID}.dcm")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            ds.save_as(path)
    return ids


def _cohort(root, exams, **kwargs):
    """``exams``: list of (exam path, patient number, labels). Writes labels.csv too."""
    ids = set()
    lines = [HEADER]
    for i, (exam, patient, labels) in enumerate(exams):
        ids |= _write_exam(os.path.join(root, exam), patient, seed=i, **kwargs)
        lines.append(f"{exam}," + ",".join(str(v) for v in labels))
    with open(os.path.join(root, "labels.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return ids


def _standard_exams(n_patients=5, exams_per_patient=2):
    out = []
    for p in range(n_patients):
        for e in range(exams_per_patient):
            out.append((f"P{p:02d}/E{e}", p, (0, int(p % 2 == 0), int(e == 1), 0)))
    return out


def _config(tmp_path, root, out="records", **kwargs):
    kwargs.setdefault("num_workers", 1)
    return ConvertConfig(
        dicom_root=str(root),
        labels=str(root / "labels.csv"),
        output_dir=str(tmp_path / out),
        pseudonym_key_file=str(tmp_path / "private" / "key"),
        id_map=str(tmp_path / "private" / f"{out}_ids.csv"),
        **kwargs,
    )


def _records(out_dir):
    return {rec["exam_id"]: (split, rec) for split, rec in Records.open(out_dir).iter_numpy()}


def _shard_bytes(out_dir):
    return {
        n: open(os.path.join(out_dir, n), "rb").read()
        for n in sorted(os.listdir(out_dir))
        if n.endswith(".tfrecord")
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    ids = _cohort(str(root), _standard_exams())
    return root, ids


def test_convert_writes_records_manifest_and_id_map(tmp_path, cohort):
    root, _ = cohort
    log = io.StringIO()
    result = convert(_config(tmp_path, root), stream=log)
    out = str(tmp_path / "records")
    assert result.ok and result.num_converted == 10
    manifest = schema.read_manifest(out)
    assert manifest["phases"] == list(schema.PHASES)
    assert manifest["labels"] == list(schema.LABELS)
    assert manifest["num_failures"] == 0 and manifest["num_exams"] == 10
    assert not os.path.exists(os.path.join(out, record_cache.WORK_DIR))  # Cache dropped.
    records = _records(out)
    assert len(records) == 10
    # id map: pseudonym -> folder, outside the output dir; records equal load_exam's volumes.
    with open(tmp_path / "private" / "records_ids.csv") as f:
        id_map = {r["exam_id"]: r for r in csv.DictReader(f)}
    assert sorted(r["exam"] for r in id_map.values()) == sorted(e for e, _, _ in _standard_exams())
    patients_by_split = {}
    for exam_id, (split, rec) in records.items():
        folder = id_map[exam_id]["exam"]
        assert rec["patient_id"] == id_map[exam_id]["patient_id"]
        expected = dicom_reader.load_exam(str(root / folder))
        for p in schema.PHASES:
            np.testing.assert_array_equal(rec[p], expected.volumes[p])
        np.testing.assert_allclose(rec["spacing"], (2.5, 0.3125, 0.3125))
        labels = [e for e in _standard_exams() if e[0] == folder][0][2]
        assert rec["labels"].tolist() == list(labels)
        patients_by_split.setdefault(rec["patient_id"], set()).add(split)
    # Patient-level: 5 patients, each in exactly one split; default 60/20/20 -> 3/1/1.
    assert all(len(s) == 1 for s in patients_by_split.values())
    counts = {s: manifest["splits"][s]["num_patients"] for s in schema.SPLITS}
    assert counts == {"train": 3, "val": 1, "test": 1}
    for split in schema.SPLITS:
        entry = manifest["splits"][split]
        assert entry["num_exams"] == 2 * entry["num_patients"]
        assert entry["shards"] == [f"{split}-00000-of-00001.tfrecord"]
    assert "converted 10/10 exams" in log.getvalue()
    assert "exams/s" in log.getvalue()


def test_same_key_same_ids_other_key_other_ids_and_splits_by_seed(tmp_path, cohort):
    root, _ = cohort
    a = convert(_config(tmp_path, root, "a", progress=False), stream=io.StringIO())
    b = convert(_config(tmp_path, root, "b", progress=False), stream=io.StringIO())
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    assert a.manifest["splits"] == b.manifest["splits"]
    other = _config(tmp_path, root, "c", progress=False)
    other = ConvertConfig(
        **{**other.__dict__, "pseudonym_key_file": str(tmp_path / "other" / "key")}
    )
    c = convert(other, stream=io.StringIO())
    ids = lambda m: {e["exam_id"] for s in m["splits"].values() for e in s["exams"]}  # noqa
    assert not ids(a.manifest) & ids(c.manifest)


def test_key_or_id_map_inside_output_dir_refused(tmp_path, cohort):
    root, _ = cohort
    cfg = _config(tmp_path, root)
    with pytest.raises(ValueError, match="inside --output_dir"):
        convert(
            ConvertConfig(
                **{**cfg.__dict__, "pseudonym_key_file": str(tmp_path / "records" / "key")}
            )
        )
    with pytest.raises(ValueError, match="inside --output_dir"):
        convert(ConvertConfig(**{**cfg.__dict__, "id_map": str(tmp_path / "records" / "m.csv")}))


def test_default_key_file_is_created_outside_and_reused(tmp_path, cohort):
    root, _ = cohort
    cfg = ConvertConfig(
        dicom_root=str(root),
        labels=str(root / "labels.csv"),
        output_dir=str(tmp_path / "out"),
        num_workers=1,
        progress=False,
    )
    convert(cfg, stream=io.StringIO())
    key_file = tmp_path / "out_private" / "pseudonym.key"
    assert key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600
    for name in ("id_map.csv", "failures_detail.csv"):  # Pseudonym -> folder: owner only.
        assert (tmp_path / "out_private" / name).stat().st_mode & 0o777 == 0o600
    first = _shard_bytes(tmp_path / "out")
    convert(cfg, stream=io.StringIO())
    assert _shard_bytes(tmp_path / "out") == first


def test_split_column_is_used_and_conflicts_rejected(tmp_path):
    root = tmp_path / "dicom"
    exams = [("A/1", 1, (0, 1, 0, 0)), ("A/2", 1, (0, 0, 0, 0)), ("B/1", 2, (0, 0, 0, 1))]
    _cohort(str(root), exams)
    splits_col = {"A/1": "test", "A/2": "test", "B/1": "train"}
    lines = open(root / "labels.csv").read().splitlines()
    lines = [lines[0] + ",split"] + [l + "," + splits_col[l.split(",")[0]] for l in lines[1:]]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    result = convert(_config(tmp_path, root, progress=False), stream=io.StringIO())
    assert [result.manifest["splits"][s]["num_exams"] for s in schema.SPLITS] == [1, 0, 2]
    assert result.manifest["splits"]["val"]["shards"] == []
    # One patient (PatientID) in two splits is refused.
    lines[2] = lines[2].rsplit(",", 1)[0] + ",val"
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(labels_csv.InputError, match="one patient.*two splits") as e:
        convert(_config(tmp_path, root, "r2", progress=False), stream=io.StringIO())
    assert "line 2" in str(e.value) and "line 3" in str(e.value)


def test_assign_splits_stratified_seeded_and_disjoint():
    strata = {f"P{i:03d}": int(i < 30) for i in range(100)}
    a = splits.assign_splits(strata, (0.6, 0.2, 0.2), seed=3)
    assert a == splits.assign_splits(strata, (0.6, 0.2, 0.2), seed=3)
    assert a != splits.assign_splits(strata, (0.6, 0.2, 0.2), seed=4)
    for split, n, malignant in (("train", 60, 18), ("val", 20, 6), ("test", 20, 6)):
        members = [p for p, s in a.items() if s == split]
        assert len(members) == n and sum(strata[p] for p in members) == malignant
    small = splits.assign_splits({"a": 0, "b": 0, "c": 1}, (0.6, 0.2, 0.2), seed=0)
    assert sorted(small.values()) == ["test", "train", "val"]
    assert splits.parse_ratios("60/20/20") == pytest.approx((0.6, 0.2, 0.2))
    with pytest.raises(ValueError, match="split_ratios"):
        splits.parse_ratios("0.5,0.5")


def test_shard_size_splits_into_several_shards(tmp_path, cohort):
    root, _ = cohort
    record_mb = 4 * 4 * 8 * 8 * 2 / 2**20  # 16-bit stored values (DICOM's own integers).
    result = convert(
        _config(tmp_path, root, shard_size_mb=2.5 * record_mb, progress=False), stream=io.StringIO()
    )
    assert set(result.manifest["voxel_dtypes"]) <= {"int16", "uint16"}
    train = result.manifest["splits"]["train"]
    assert train["num_exams"] == 6
    assert train["shards"] == [f"train-{i:05d}-of-00003.tfrecord" for i in range(3)]
    assert len(_records(str(tmp_path / "records"))) == 10
    # One exam per shard: shards are hard links of the cached records, same bytes.
    single = convert(
        _config(tmp_path, root, "single", shard_size_mb=record_mb / 2, progress=False),
        stream=io.StringIO(),
    )
    assert len(single.manifest["splits"]["train"]["shards"]) == 6
    assert b"".join(_shard_bytes(tmp_path / "single").values()) == b"".join(
        _shard_bytes(tmp_path / "records").values()
    )


# ---- broken exams and privacy ----------------------------------------------------------------


def _broken_cohort(root):
    exams = _standard_exams(n_patients=3, exams_per_patient=1) + [
        ("bad/truncated", 10, (0, 0, 0, 0)),
        ("bad/missing_slice", 11, (0, 0, 0, 0)),
        ("bad/grids", 12, (0, 0, 0, 0)),
        ("bad/no_dce", 13, (0, 0, 0, 0)),
    ]
    ids = _cohort(str(root), exams)
    trunc = pydicom.data.get_testdata_file("MR_truncated.dcm")
    victim = sorted((root / "bad/truncated/series2").iterdir())[1]
    ds = pydicom.dcmread(victim)
    raw = open(trunc, "rb").read()
    ds.PixelData = pydicom.dcmread(trunc).PixelData[:100]
    ds.save_as(victim)
    del raw
    for f in (root / "bad/missing_slice/series1").iterdir():  # An inner slice (z = 5 mm).
        if float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) == 5.0:
            f.unlink()
    for f in (root / "bad/grids/series3").iterdir():
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [-10.0, -10.0, float(ds.ImagePositionPatient[2]) + 2.5]
        ds.save_as(f)
    for f in (root / "bad/no_dce").rglob("*.dcm"):
        if "series0" not in str(f):
            f.unlink()
    (root / "bad/no_dce/readme.txt").write_text("not dicom")
    return ids


def test_broken_exams_go_to_failures_others_written_and_nothing_identifying(tmp_path):
    root = tmp_path / "dicom"
    ids = _broken_cohort(root)
    log = io.StringIO()
    result = convert(_config(tmp_path, root), stream=log)
    out = tmp_path / "records"
    assert not result.ok and result.num_converted == 3 and len(result.failures) == 4
    with open(out / "failures.csv") as f:
        failures = {r["exam"]: r["reason"] for r in csv.DictReader(f)}
    with open(tmp_path / "private" / "records_ids.csv") as f:
        folder = {r["exam_id"]: r["exam"] for r in csv.DictReader(f)}
    reasons = {folder[e]: r for e, r in failures.items()}
    assert "unreadable pixel data" in reasons["bad/truncated"]
    assert "missing slice" in reasons["bad/missing_slice"]
    assert "different grids" in reasons["bad/grids"]
    assert "no DCE series found" in reasons["bad/no_dce"]
    assert len(_records(str(out))) == 3
    assert json.load(open(out / "manifest.json"))["num_failures"] == 4
    detail = open(tmp_path / "private" / "failures_detail.csv").read()
    assert "bad/truncated" in detail and "series2" in detail  # Full detail stays outside.
    # Privacy: no identifier in any byte under the output dir (records, manifest, cache) or log.
    blobs = [log.getvalue().encode()]
    for dirpath, _, files in os.walk(out):
        blobs += [open(os.path.join(dirpath, n), "rb").read() for n in files]
    # Cache kept for the good exams, every entry published (record + meta, no temporary file):
    # the workers' last records are published by the parent.
    cached = sorted(os.listdir(out / ".work"))
    assert not [n for n in cached if ".tmp-" in n], cached
    assert sorted(n for n in cached if n.endswith(".tfrecord")) == sorted(
        n[: -len(".json")] + ".tfrecord" for n in cached if n.endswith(".json")
    )
    assert len([n for n in cached if n.endswith(".tfrecord")]) == 3
    # Two worker processes: same records, and each worker's last record published too.
    two = convert(_config(tmp_path, root, "two", num_workers=2), stream=io.StringIO())
    assert two.num_converted == 3
    assert b"".join(_shard_bytes(tmp_path / "two").values()) == b"".join(_shard_bytes(out).values())
    cached_two = sorted(os.listdir(tmp_path / "two" / ".work"))
    assert len([n for n in cached_two if n.endswith(".tfrecord")]) == 3
    assert not [n for n in cached_two if ".tmp-" in n], cached_two
    for ident in ids:
        for blob in blobs:
            assert ident.encode() not in blob, f"{ident!r} leaked"
    assert "bad/" not in log.getvalue()  # Folder names only in the private id map.


def test_rerun_after_fixing_reads_only_failed_exams(tmp_path):
    root = tmp_path / "dicom"
    _cohort(
        str(root), _standard_exams(n_patients=2, exams_per_patient=1) + [("bad/x", 9, (0, 0, 0, 0))]
    )
    victim = sorted((root / "bad/x/series1").iterdir())[1]
    moved = tmp_path / "moved.dcm"
    os.replace(victim, moved)
    first = convert(_config(tmp_path, root, progress=False), stream=io.StringIO())
    assert len(first.failures) == 1
    os.replace(moved, victim)
    second = convert(_config(tmp_path, root, progress=False), stream=io.StringIO())
    assert second.ok and second.num_cached == 2 and second.num_converted == 3


# ---- bad input: one message listing the rows, before any work --------------------------------


@pytest.mark.parametrize(
    "csv_text,expected",
    [
        (
            "exam,left_benign,left_malignant,right_benign\nP00/E0,0,0,0\n",
            ["missing column(s) right_malignant"],
        ),
        (
            HEADER + "\nP00/E0,0,2,0,0\nP00/E1,0,0,x,0\n",
            [
                "label values other than 0/1",
                "line 2",
                "left_malignant='2'",
                "line 3",
                "right_benign='x'",
            ],
        ),
        (
            HEADER + "\nP00/E0,0,0,0,0\nP00/E1,0,0,0,0\n./P00/E0/,0,1,0,0\n",
            ["duplicate exams", "line 4", "repeats line 2"],
        ),
        (
            HEADER + "\nP00/E0,0,0,0,0\nP00/E1,0,0,0,0\nP09/E7,0,0,0,0\n",
            ["exams with no folder", "line 4", "P09/E7"],
        ),
        (HEADER + "\nP00/E0,0,0,0,0\n", ["folders with DICOM files and no labels", "P00/E1"]),
        (
            HEADER + ",split\nP00/E0,0,0,0,0,train\nP00/E1,0,0,0,0,training\n",
            ["split values", "line 3", "'training'"],
        ),
    ],
    ids=["missing_column", "not_01", "duplicate", "no_folder", "no_labels", "bad_split"],
)
def test_bad_labels_rejected_before_any_work(tmp_path, csv_text, expected):
    root = tmp_path / "dicom"
    _cohort(str(root), [("P00/E0", 0, (0, 0, 0, 0)), ("P00/E1", 0, (0, 0, 0, 0))], slices=2, size=4)
    (root / "labels.csv").write_text(csv_text)
    with pytest.raises(labels_csv.InputError) as e:
        convert(_config(tmp_path, root))
    for text in expected:
        assert text in str(e.value)
    assert not (tmp_path / "records").exists() and not (tmp_path / "private").exists()


def test_all_label_problems_reported_together(tmp_path):
    root = tmp_path / "dicom"
    _cohort(
        str(root),
        [("A/1", 0, (0, 0, 0, 0)), ("A/2", 0, (0, 0, 0, 0)), ("B/1", 1, (0, 0, 0, 0))],
        slices=2,
        size=4,
    )
    (root / "labels.csv").write_text(HEADER + "\nA/1,0,0,0,3\nA/1,0,0,0,0\nC/1,0,0,0,0\n")
    with pytest.raises(labels_csv.InputError) as e:
        labels_csv.read_labels(str(root / "labels.csv"), str(root))
    msg = str(e.value)
    for text in (
        "label values other than 0/1",
        "duplicate exams",
        "exams with no folder",
        "C/1",
        "folders with DICOM files and no labels",
        "A/2",
        "B",
    ):
        assert text in msg


def test_labels_csv_as_spreadsheets_save_it(tmp_path):
    root = tmp_path / "dicom"
    (root / "P00" / "E0").mkdir(parents=True)
    (root / "P00" / "E1").mkdir(parents=True)
    path = root / "labels.csv"
    # BOM, CRLF, spaces, "./" and trailing "/", a trailing comma, blank and ",,,," rows.
    path.write_bytes(
        (
            "\ufeff exam , " + HEADER[5:].replace(",", " , ") + "\r\n"
            " ./P00/E0/ , 0, 1 ,0,0,\r\nP00/E1,1,0,0,0\r\n,,,,\r\n\r\n"
        ).encode("utf-8")
    )
    rows = labels_csv.read_labels(str(path), str(root))
    assert [(r.exam, r.labels) for r in rows] == [
        ("P00/E0", (0, 1, 0, 0)),
        ("P00/E1", (1, 0, 0, 0)),
    ]
    path.write_bytes((HEADER + "\nP00/E0,0,0,0,0\nM\u00fcller/E1,0,0,0,0\n").encode("cp1252"))
    with pytest.raises(labels_csv.InputError, match=r"labels.csv: line 3 is not UTF-8"):
        labels_csv.read_labels(str(path), str(root))
    path.write_text(HEADER.replace(",", ";") + "\nP00/E0;0;0;0;0\n")
    with pytest.raises(labels_csv.InputError, match="semicolon-separated"):
        labels_csv.read_labels(str(path), str(root))
    path.write_text(HEADER + "\nP00/E0,0.0,1.0,0,0\nP00/E1,0,0,0,0\n")
    with pytest.raises(labels_csv.InputError, match=r"line 2 .*left_benign='0.0'"):
        labels_csv.read_labels(str(path), str(root))


def test_convert_archive_layout_quirks(tmp_path):
    # An exam folder that is a link to storage elsewhere, a dangling link inside an exam and a
    # labels line with a trailing comma: both exams are converted.
    root = tmp_path / "dicom"
    storage = tmp_path / "storage"
    _write_exam(str(root / "P00" / "E0"), 0, seed=0, slices=2, size=4)
    _write_exam(str(storage / "E1"), 1, seed=1, slices=2, size=4)
    (root / "P01").mkdir()
    (root / "P01" / "E1").symlink_to(storage / "E1", target_is_directory=True)
    (root / "P00" / "E0" / "old.dcm").symlink_to(tmp_path / "deleted.dcm")
    (root / "labels.csv").write_text(HEADER + "\nP00/E0,0,1,0,0,\nP01/E1/,0,0,0,1\n")
    result = convert(_config(tmp_path, root))
    assert result.failures == [] and result.num_converted == 2
    records = _records(str(tmp_path / "records")).values()
    labels = sorted(list(map(int, rec["labels"])) for _, rec in records)
    assert labels == [[0, 0, 0, 1], [0, 1, 0, 0]]


def test_phase_map_checked_and_applied(tmp_path):
    root = tmp_path / "dicom"
    _cohort(
        str(root), [("A/1", 0, (0, 1, 0, 0)), ("A/2", 0, (0, 0, 0, 0)), ("B/1", 1, (0, 0, 0, 0))]
    )
    uids = {}
    for f in sorted((root / "A/1").rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uids[int(ds.SeriesNumber)] = ds.SeriesInstanceUID
    pm = tmp_path / "phases.csv"
    pm.write_text(
        "exam,series_instance_uid,phase\n" + "".join(f"A/1,{uids[4 - t]},t{t}\n" for t in range(4))
    )
    result = convert(
        _config(tmp_path, root, phase_map=str(pm), progress=False), stream=io.StringIO()
    )
    assert result.ok
    with open(tmp_path / "private" / "records_ids.csv") as f:
        exam_id = {r["exam"]: r["exam_id"] for r in csv.DictReader(f)}["A/1"]
    rec = _records(str(tmp_path / "records"))[exam_id][1]
    reversed_exam = dicom_reader.load_exam(str(root / "A/1"))
    np.testing.assert_array_equal(rec["t0"], reversed_exam.volumes["t3"])
    pm.write_text(
        "exam,series_instance_uid,phase,temporal_position\n"
        + "".join(f"A/1,{uids[4 - t]},t{t},\n" for t in range(4))
        + "B/1,1.2.3,t0,x\n"
    )
    with pytest.raises(labels_csv.InputError, match="line 6: temporal_position 'x'"):
        convert(_config(tmp_path, root, phase_map=str(pm)))
    pm.write_text("exam,series_instance_uid,phase\nA/1,1.2.3,t5\nZ/9,1.2.3,t0\n")
    with pytest.raises(labels_csv.InputError, match="phase 't5'.*\n.*'Z/9' is not in the lab"):
        convert(_config(tmp_path, root, phase_map=str(pm)))


# ---- command line: exit codes, and resume after a real kill ----------------------------------


def _cli(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "tfrecords_tools.convert", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_cli_exit_status_for_bad_input(tmp_path):
    root = tmp_path / "dicom"
    _cohort(str(root), [("A/1", 0, (0, 0, 0, 0))], slices=2, size=4)
    (root / "labels.csv").write_text(HEADER + "\nA/1,0,0,0,7\n")
    proc = _cli(
        [
            f"--dicom_root={root}",
            f"--labels={root / 'labels.csv'}",
            f"--output_dir={tmp_path / 'out'}",
        ]
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "label values other than 0/1" in err and "line 2" in err
    proc = _cli(
        [
            f"--dicom_root={root}",
            f"--labels={root / 'labels.csv'}",
            f"--output_dir={tmp_path / 'out'}",
            "stray",
        ]
    )
    proc.communicate(timeout=120)
    assert proc.returncode != 0


@pytest.mark.slow
def test_resume_after_sigkill_equals_clean_run(tmp_path):
    root = tmp_path / "dicom"
    exams = _standard_exams(n_patients=5, exams_per_patient=2) + [("bad/x", 20, (0, 0, 0, 0))]
    _cohort(str(root), exams, slices=24, size=64)
    os.remove(sorted((root / "bad/x/series1").iterdir())[3])  # One failure: exit status 1.
    key = tmp_path / "private" / "key"
    clean = convert(_config(tmp_path, root, "clean", progress=False), stream=io.StringIO())
    assert len(clean.failures) == 1

    out = tmp_path / "killed"
    args = [
        f"--dicom_root={root}",
        f"--labels={root / 'labels.csv'}",
        f"--output_dir={out}",
        f"--pseudonym_key_file={key}",
        f"--id_map={tmp_path / 'private' / 'k.csv'}",
        "--num_workers=2",
    ]
    proc = _cli(args)
    work = out / record_cache.WORK_DIR
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        done = len(list(work.glob("*.json"))) if work.exists() else 0
        if done >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = len(list(work.glob("*.json")))
    assert 3 <= done < 10 and not list(out.glob("*.tfrecord"))

    proc = _cli(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert f"({done} resumed from an earlier run)" in err
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "clean")
    m_clean = json.load(open(tmp_path / "clean" / "manifest.json"))
    m_resumed = json.load(open(out / "manifest.json"))
    assert {k: v for k, v in m_clean.items() if k != "flags"} == {
        k: v for k, v in m_resumed.items() if k != "flags"
    }
    assert open(out / "failures.csv").read() == open(tmp_path / "clean" / "failures.csv").read()


# ---- the zero-copy record encoder is byte-identical to schema.encode_example -----------------


@pytest.mark.parametrize("phases", [schema.PHASES, ("t0", "t2"), ("t3",)])
def test_record_encoder_matches_schema_bytes(phases):
    from tfrecords_tools import record_encoder

    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 5, 7)) * 3e4
    volumes = {p: base.transpose(0, 2, 1)[:, ::-1] + i for i, p in enumerate(phases)}
    args = ("E" + "ab" * 8, "P" + "cd" * 8, volumes, (2.5, 0.65, 0.7), (1, 0, 0, 1))
    assert record_encoder.encode_record(*args) == schema.encode_example(*args)
    assert record_encoder.matches_schema()
    for dtype in (np.int16, np.uint16):  # Stored integers with a per-phase rescale.
        ints = {p: np.abs(v).astype(dtype) for p, v in volumes.items()}
        rescale = {phases[0]: (1.6875, -16.0)}
        int_args = args[:2] + (ints,) + args[3:] + (rescale,)
        assert record_encoder.encode_record(*int_args) == schema.encode_example(*int_args)
    with pytest.raises(ValueError, match="labels"):
        record_encoder.encode_record(*args[:4], (0, 2, 0, 0))


# ---- --crop_to_body ----------------------------------------------------------------------------


def _body_in_air(ds, t, k):
    """Noise only in a patch off the centre; zero (air) elsewhere."""
    rng = np.random.default_rng(100 * t + k)
    pixels = np.zeros((ds.Rows, ds.Columns), np.int16)
    pixels[12:20, 6:15] = rng.integers(200, 1000, (8, 9))
    ds.PixelData = pixels.tobytes()


def test_crop_to_body_cuts_air_keeps_the_centre_and_the_labels(tmp_path):
    root = tmp_path / "cohort"
    exams = _standard_exams(n_patients=2, exams_per_patient=1)
    _cohort(str(root), exams, size=32, extra=_body_in_air)
    assert convert(_config(tmp_path, root, out="whole")).ok
    assert convert(_config(tmp_path, root, out="cut", crop_to_body=True)).ok
    manifest = schema.read_manifest(str(tmp_path / "cut"))
    assert manifest["flags"]["crop_to_body"] is True
    whole, cut = _records(str(tmp_path / "whole")), _records(str(tmp_path / "cut"))
    assert sorted(whole) == sorted(cut)
    for exam_id, (split, rec) in cut.items():
        full = whole[exam_id][1]
        box = body_crop.body_box({p: full[p] for p in schema.PHASES})
        width = full["shape"][2]
        assert box[2].start == width - box[2].stop  # Cols symmetric: the midline stays put.
        assert rec["shape"][1] < full["shape"][1] and rec["shape"][2] < width
        for p in schema.PHASES:
            np.testing.assert_array_equal(rec[p], full[p][box])
        assert rec["labels"].tolist() == full["labels"].tolist() and split == whole[exam_id][0]


def test_body_box_margin_symmetry_and_empty_exams():
    volume = np.zeros((5, 20, 30), np.float32)
    volume[1:3, 5:9, 2:10] = 100.0  # Body on the right of the image only.
    box = body_crop.body_box({"t0": volume, "t2": volume}, margin=1)
    assert box == (slice(0, 4), slice(4, 10), slice(1, 29))
    empty = body_crop.body_box({"t0": np.zeros((2, 4, 6))})
    assert empty == (slice(0, 2), slice(0, 4), slice(0, 6))


def test_phases_option_stores_only_those_phases(tmp_path, cohort):
    root, _ = cohort
    assert convert(_config(tmp_path, root, out="two", phases=("t2", "t0"))).ok
    assert convert(_config(tmp_path, root, out="all")).ok
    two, full = str(tmp_path / "two"), str(tmp_path / "all")
    manifest = schema.read_manifest(two)
    assert manifest["phases"] == ["t0", "t2"] and manifest["flags"]["phases"] == ["t0", "t2"]
    whole = _records(full)
    for exam_id, (_, rec) in _records(two).items():
        assert rec["phases"] == ("t0", "t2")
        for p in ("t0", "t2"):
            np.testing.assert_array_equal(rec[p], whole[exam_id][1][p])
    assert sum(map(len, _shard_bytes(two).values())) < 0.6 * sum(
        map(len, _shard_bytes(full).values())
    )
    with pytest.raises(ValueError, match="phases must be a non-empty subset"):
        _config(tmp_path, root, phases=("t4",))
