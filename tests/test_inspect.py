"""End to end on the synthetic cohort: convert every acquisition variant, then inspect/export.

The generator writes each exam through a different acquisition geometry (axial, reversed
columns, descending slices, sagittal, coronal, one multi-phase series, Enhanced MR in one
file and one file per phase, per-breast sagittal series) plus a T2 series on its
own grid, a 3-plane localizer, a derived subtraction series and a non-DICOM note, and keeps the
canonical arrays the converter must produce.
"""

import csv
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tfrecords_tools import convert_lib, inspect_lib, schema, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_cohort_varied):
    # tiny_cohort_varied (tests/conftest.py): every acquisition variant in turn, plus extra
    # series and a non-DICOM file per exam, each series in its own sub-folder.
    cohort = tiny_cohort_varied
    base = tmp_path_factory.mktemp("e2e")
    log = io.StringIO()
    config = convert_lib.ConvertConfig(
        dicom_root=cohort.root,
        labels=cohort.labels_csv,
        output_dir=str(base / "out"),
        pseudonym_key_file=str(base / "private" / "key"),
        num_workers=2,
    )
    result = convert_lib.convert(config, stream=log)
    with open(base / "private" / "id_map.csv") as f:
        folder = {r["exam_id"]: r["exam"] for r in csv.DictReader(f)}
    return base, cohort, result, log.getvalue(), folder


def test_every_variant_converts_to_the_generators_canonical_arrays(converted, tmp_path):
    base, cohort, result, _, folder = converted
    assert result.ok, result.failures
    assert {e.variant for e in cohort.exams} == set(synthetic.VARIANTS)
    n = inspect_lib.export_npz(str(base / "out"), str(tmp_path))
    assert n == len(cohort.exams) == result.num_converted
    for exam in cohort.exams:
        exam_id = [k for k, v in folder.items() if v == exam.exam][0]
        got = np.load(tmp_path / f"{exam_id}.npz")
        truth = np.load(os.path.join(cohort.canonical_dir, exam.npz_name))
        assert sorted(got.files) == sorted(list(schema.PHASES) + ["labels", "spacing"])
        for p in schema.PHASES:
            assert got[p].dtype == np.float32
            np.testing.assert_array_equal(got[p], truth[p], err_msg=f"{exam.variant} {p}")
        np.testing.assert_array_equal(got["labels"], truth["labels"])
        np.testing.assert_allclose(got["spacing"], truth["spacing"], rtol=1e-6)


def test_left_lesions_are_at_high_columns_after_conversion(converted, tmp_path):
    base, cohort, _, _, folder = converted
    inspect_lib.export_npz(str(base / "out"), str(tmp_path))
    exam_id = {v: k for k, v in folder.items()}
    with open(cohort.annotations_csv) as f:
        lesions = list(csv.DictReader(f))
    sides = {}
    for les in lesions:
        sides.setdefault(les["exam"], set()).add(les["side"])
    checked = 0
    for les in lesions:
        arr = np.load(tmp_path / f"{exam_id[les['exam']]}.npz")
        width = arr["t2"].shape[2]
        s, r, c = int(les["slice"]), int(les["row"]), int(les["col"])
        assert (c > width / 2) == (les["side"] == "left"), les
        if les["pathology"] == "malignant" and len(sides[les["exam"]]) == 1:
            # The enhancing lesion is where the annotation says, not in the mirrored breast.
            sub = arr["t2"][s] - arr["t0"][s]
            box = lambda col: sub[max(r - 1, 0) : r + 2, max(col - 1, 0) : col + 2].mean()  # noqa
            assert box(c) > box(width - 1 - c), les
            checked += 1
    assert checked >= 1


def test_nothing_identifying_in_outputs_or_log(converted, tmp_path):
    base, cohort, _, log, _ = converted
    inspect_lib.export_npz(str(base / "out"), str(tmp_path / "npz"))
    inspect_lib.export_png(str(base / "out"), str(tmp_path / "png"), max_exams=2)
    blobs = {"log": log.encode()}
    for top in (base / "out", tmp_path):
        for dirpath, _, files in os.walk(top):
            for name in files:
                blobs[os.path.join(dirpath, name)] = open(os.path.join(dirpath, name), "rb").read()
    identifiers = list(cohort.identifiers.distinctive) + list(cohort.identifiers.dates)
    assert len(cohort.identifiers.patient_ids) >= 6 and cohort.identifiers.uids
    for where, blob in blobs.items():
        for ident in identifiers:
            assert ident.encode() not in blob, f"{ident!r} found in {where}"
    for exam in cohort.exams:  # Exam folder names live only in the private id map.
        assert exam.exam.encode() not in blobs["log"]
        assert exam.exam.encode() not in open(base / "out" / "manifest.json", "rb").read()


def test_summary_verify_and_pngs(converted, tmp_path):
    base, cohort, result, _, _ = converted
    text = inspect_lib.summary(str(base / "out"), verify=True)
    m = result.manifest
    for split in schema.SPLITS:
        s = m["splits"][split]
        assert f"{split:<6} {s['num_exams']:>6} {s['num_patients']:>8}" in text
    assert "shape (S x H x W): 8 x 32 x 32" in text
    assert re.search(r"stored voxels: u?int16 \d+ exams", text), text
    assert f"verified: {len(cohort.exams)} records match the manifest" in text
    assert f"failures: 0 of {len(cohort.exams)} labelled exams" in text
    n = inspect_lib.export_png(str(base / "out"), str(tmp_path), max_exams=2)
    assert n == 2
    pngs = sorted(tmp_path.glob("E*.png"))
    assert len(pngs) == 2
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_verify_detects_a_manifest_mismatch(converted, tmp_path):
    import json
    import shutil

    base = converted[0]
    copy = tmp_path / "copy"
    shutil.copytree(base / "out", copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["splits"]["train"]["exams"][0]["labels"] = [1, 1, 1, 1]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="differs from its manifest entry"):
        inspect_lib.verify_records(str(copy))


def test_inspect_command_line(converted, tmp_path):
    base = converted[0]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfrecords_tools.inspect",
            str(base / "out"),
            f"--export_npz={tmp_path / 'npz'}",
            f"--png={tmp_path / 'png'}",
            "--max_png=1",
            "--splits=val",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    n_val = converted[2].manifest["splits"]["val"]["num_exams"]
    assert f"exported {n_val} exams" in proc.stdout and "wrote 1 previews" in proc.stdout
    assert len(list((tmp_path / "npz").glob("*.npz"))) == n_val
    bad = subprocess.run(
        [sys.executable, "-m", "tfrecords_tools.inspect", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "manifest.json not found" in bad.stderr
