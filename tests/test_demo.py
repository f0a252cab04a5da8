"""The main job (scripts/demo.sh), reduced: same script and entry points, tiny cohort/model."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end_and_reruns_idempotently(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        "bash",
        os.path.join(REPO, "scripts", "demo.sh"),
        f"--output_dir={out}",
        "--num_patients=12",
        "--size=8,32,32",
        "--train_flags=--epochs=2 --width=4 --blocks=1,1,1,1 --channels_3d=8 --noprogress",
        "--n_bootstrap=50",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # Every artefact the README promises.
    for rel in (
        "cohort/labels.csv",
        "cohort/annotations.csv",
        "records/manifest.json",
        "records/failures.csv",
        "private/pseudonym.key",
        "private/id_map.csv",
        "model/best.keras",
        "model/export/saved_model.pb",
        "model/metrics.csv",
        "evaluation/test/predictions.csv",
        "evaluation/test/metrics.json",
        "evaluation/test/roc.png",
        "evaluation/test/report.html",
        "evaluation/val/metrics.json",
        "prediction/prediction.json",
        "prediction/heatmaps/heatmap.npy",
    ):
        assert (out / rel).exists(), rel
    metrics = json.loads((out / "evaluation" / "test" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["counts"]["exams"] >= 1
    assert metrics["tta"] == "flip" and "validation_threshold" in metrics  # The recipe's.
    prediction = json.loads((out / "prediction" / "prediction.json").read_text())
    for side in ("left", "right"):
        for task in ("benign", "malignant"):
            assert 0.0 <= prediction[side][task] <= 1.0
    assert prediction["input"] == "t2-t0" and prediction["slices"] == 8
    assert prediction["tta"] == "flip"
    assert "breast-level malignant AUC" in first.stdout
    assert "Artefacts (all under" in first.stdout
    # The key and id map are never inside the records directory.
    assert not any("key" in name or "id_map" in name for name in os.listdir(out / "records"))

    # A rerun reuses the cohort and the records instead of rebuilding them.
    mtime = (out / "records" / "manifest.json").stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Reusing" in second.stdout
    for what in ("cohort", "records", "evaluation", "prediction"):  # Nothing redone.
        assert f"Reusing {out / what}" in second.stdout, what
    assert json.loads((out / "evaluation" / "test" / "metrics.json").read_text()) == metrics
    assert (out / "records" / "manifest.json").stat().st_mtime_ns == mtime


def test_demo_rejects_unknown_arguments():
    res = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "demo.sh"), "--bogus=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "unknown argument '--bogus=1'" in res.stderr
