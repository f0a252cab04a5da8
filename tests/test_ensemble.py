"""Mean ensembles and Caruana ensemble selection over evaluate outputs."""

import json
import os
import types

import numpy as np
import pytest

from mri_keras import ensemble, metrics, predictions_io


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _split(seed, n=160):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < 0.35).astype(np.int64)
    pids = [f"pat{i // 2:03d}" for i in range(n)]  # two exams per patient
    exams = [f"{seed}-exam{i:03d}" for i in range(n)]
    truth = 2.0 * labels - 1.0
    members = {
        "good_a": _sigmoid(truth + rng.normal(scale=1.2, size=(n, 4))),
        "good_b": _sigmoid(truth + rng.normal(scale=1.2, size=(n, 4))),
        "noise": rng.random((n, 4)),
        "inverted": _sigmoid(-truth + rng.normal(scale=1.2, size=(n, 4))),
    }
    return exams, pids, labels, members


def _write_eval_dirs(root, order=None):
    """Writes ROOT/<member>/{val,test}/predictions.csv; test rows shuffled per member."""
    dirs = {}
    for split, seed in (("val", 1), ("test", 2)):
        exams, pids, labels, members = _split(seed)
        for k, (name, probs) in enumerate(members.items()):
            perm = np.random.default_rng(k).permutation(len(exams))  # members differ in order
            pred = predictions_io.Predictions(
                tuple(exams[i] for i in perm),
                tuple(pids[i] for i in perm),
                labels[perm],
                probs[perm],
            )
            d = os.path.join(root, name)
            predictions_io.write_predictions(os.path.join(d, split, "predictions.csv"), pred)
            dirs[name] = d
    return dirs


def test_caruana_picks_the_complementary_good_models():
    _, _, labels, members = _split(1)
    names = list(members)
    probs = np.stack([members[n] for n in names])
    counts, trace = ensemble.caruana_select(probs, labels, iterations=12)
    chosen = dict(zip(names, counts))
    assert chosen["noise"] == 0 and chosen["inverted"] == 0
    assert chosen["good_a"] > 0 and chosen["good_b"] > 0
    best_single = max(metrics.breast_level_auc(labels, members[n]) for n in names)
    kept = metrics.breast_level_auc(labels, ensemble.combine(probs, counts))
    assert kept > best_single
    assert kept == pytest.approx(max(trace))
    assert len(trace) == 12


def test_caruana_keeps_a_perfect_model_alone():
    _, _, labels, members = _split(1)
    perfect = np.where(labels == 1, 0.9, 0.1)
    probs = np.stack([members["noise"], perfect, members["good_a"]])
    counts, trace = ensemble.caruana_select(probs, labels, iterations=5)
    # Step 1 reaches AUC 1 with the perfect model; later steps cannot beat it, so step 1 is kept.
    assert counts.tolist() == [0, 1, 0]
    assert trace[0] == 1.0


def test_mean_ensemble_averages_members(tmp_path):
    dirs = _write_eval_dirs(str(tmp_path / "runs"))
    names = ["good_a", "good_b"]
    out = str(tmp_path / "mean")
    desc = ensemble.run_ensemble(
        ensemble.EnsembleConfig(
            test_predictions=tuple(os.path.join(dirs[n], "test") for n in names),
            val_predictions=tuple(os.path.join(dirs[n], "val") for n in names),
            method="mean",
            output_dir=out,
            n_bootstrap=50,
        )
    )
    assert desc["chosen"] == {"good_a": 1, "good_b": 1}
    a = predictions_io.read_predictions(os.path.join(dirs["good_a"], "test"))
    b = predictions_io.read_predictions(os.path.join(dirs["good_b"], "test")).reindex(a.exam_ids)
    got = predictions_io.read_predictions(os.path.join(out, "test")).reindex(a.exam_ids)
    np.testing.assert_allclose(got.probs, (a.probs + b.probs) / 2, atol=1e-8)
    np.testing.assert_array_equal(got.labels, a.labels)
    m = json.load(open(os.path.join(out, "test", "metrics.json")))
    assert m["ensemble"]["method"] == "mean"
    assert m["breast_level"]["malignant"]["auc"] == pytest.approx(
        metrics.breast_level_auc(got.labels, got.probs), abs=1e-9
    )
    for split in ("val", "test"):
        assert os.path.isfile(os.path.join(out, split, "roc.png"))


def test_caruana_cli_config_and_outputs(tmp_path):
    dirs = _write_eval_dirs(str(tmp_path / "runs"))
    flags = types.SimpleNamespace(
        eval_dirs=list(dirs.values()),
        val_predictions=[],
        test_predictions=[],
        names=[],
        method="caruana",
        output_dir=str(tmp_path / "car"),
        caruana_iterations=15,
        selection_metric="malignant",
        n_bootstrap=50,
        seed=0,
    )
    config = ensemble.config_from_flags(flags)
    assert config.names == tuple(dirs)
    desc = ensemble.run_ensemble(config)
    assert desc["chosen"]["noise"] == 0 and desc["chosen"]["inverted"] == 0
    assert desc["chosen"]["good_a"] > 0 and desc["chosen"]["good_b"] > 0
    saved = json.load(open(tmp_path / "car" / "ensemble.json"))
    assert saved["chosen"] == desc["chosen"]
    assert sum(saved["weights"].values()) == pytest.approx(1.0)
    test_metrics = json.load(open(tmp_path / "car" / "test" / "metrics.json"))
    val_metrics = json.load(open(tmp_path / "car" / "val" / "metrics.json"))
    assert "In-sample" in val_metrics["note"]
    assert test_metrics["ensemble"]["selection_split"] == "val"


def test_members_must_cover_the_same_exams(tmp_path):
    dirs = _write_eval_dirs(str(tmp_path / "runs"))
    short = predictions_io.read_predictions(os.path.join(dirs["good_b"], "test"))
    keep = short.exam_ids[:-1]
    predictions_io.write_predictions(str(tmp_path / "short.csv"), short.reindex(keep))
    with pytest.raises(ValueError, match="covers other exams"):
        ensemble.run_ensemble(
            ensemble.EnsembleConfig(
                test_predictions=(
                    os.path.join(dirs["good_a"], "test"),
                    str(tmp_path / "short.csv"),
                ),
                method="mean",
                output_dir=str(tmp_path / "x"),
                n_bootstrap=10,
            )
        )
    with pytest.raises(ValueError, match="validation"):
        ensemble.EnsembleConfig(test_predictions=("a",), method="caruana", output_dir="x")
    (tmp_path / "a_file").write_text("keep")  # --output_dir naming a file: refused up front.
    with pytest.raises(ValueError, match="a_file' exists and is not a directory"):
        ensemble.run_ensemble(
            ensemble.EnsembleConfig(
                test_predictions=(os.path.join(dirs["good_a"], "test"),),
                method="mean",
                output_dir=str(tmp_path / "a_file"),
                n_bootstrap=10,
            )
        )
    assert (tmp_path / "a_file").read_text() == "keep"


def test_table1_and_data_fraction_reports(tmp_path):
    from mri_keras import evaluate, experiments

    exams, pids, labels, members = _split(2)
    eval_root = tmp_path / "eval"
    for k, key in enumerate(["t0", "t2sub", "frac_100", "frac_10", "frac_1"]):
        pred = predictions_io.Predictions(
            tuple(exams), tuple(pids), labels, members["good_a"] if k % 2 else members["good_b"]
        )
        summary = {"name": key, **evaluate.summarize(pred, n_bootstrap=50)}
        evaluate.write_report(str(eval_root / key / "test"), pred, summary)
    text = experiments.run(
        experiments.ExperimentsConfig(
            report="table1", eval_root=str(eval_root), output_dir=str(tmp_path)
        )
    )
    lines = text.splitlines()
    assert "| Image | Benign AUC | Malignant AUC |" in lines
    t0 = next(l for l in lines if l.startswith("| t0 (pre-contrast)"))
    m = json.load(open(eval_root / "t0" / "test" / "metrics.json"))["breast_level"]
    assert metrics.format_auc(m["malignant"]) in t0 and metrics.format_auc(m["benign"]) in t0
    assert next(l for l in lines if l.startswith("| t1 - t0")).count("not run") == 2
    assert (tmp_path / "table1.csv").is_file()
    # An ensemble row with its comparison to the best member: bootstrap and DeLong p.
    pred = predictions_io.Predictions(tuple(exams), tuple(pids), labels, members["good_a"])
    evaluate.write_report(str(eval_root / "mean_sub" / "test"), pred, evaluate.summarize(pred, 20))
    best = {"member": "t2sub", "difference": 0.021, "ci_low": -0.004, "ci_high": 0.05}
    best.update(p_value=0.11, delong={"p_value": 0.0734, "z": 1.79})
    (eval_root / "mean_sub" / "ensemble.json").write_text(json.dumps({"test_vs_best_member": best}))
    text = experiments.run(
        experiments.ExperimentsConfig(
            report="table1", eval_root=str(eval_root), output_dir=str(tmp_path)
        )
    )
    line = next(l for l in text.splitlines() if l.startswith("- Mean of"))
    assert "vs t2sub: +0.021 (95% CI -0.004 to +0.050, bootstrap p=0.11, DeLong p=0.0734)" in line
    page = (tmp_path / "report.html").read_text()
    assert "<th>Malignant AUC</th>" in page and "DeLong p=0.0734" in page
    text = experiments.run(
        experiments.ExperimentsConfig(
            report="data_fraction", eval_root=str(eval_root), output_dir=str(tmp_path)
        )
    )
    assert [l.split("|")[1].strip() for l in text.splitlines()[2:]] == ["1%", "10%", "100%"]
    assert os.path.getsize(tmp_path / "data_fraction.png") > 1000
    page = (tmp_path / "report.html").read_text()  # beside the files, figure embedded
    assert "AUC vs training-set size" in page and "<td>10%</td>" in page
    assert page.count('<img src="data:image/png;base64,') == 1
    with pytest.raises(FileNotFoundError, match="table1.sh"):
        experiments.run(
            experiments.ExperimentsConfig(
                report="table1", eval_root=str(tmp_path / "none"), output_dir=str(tmp_path)
            )
        )


def test_ensemble_cli(tmp_path):
    import subprocess
    import sys

    dirs = _write_eval_dirs(str(tmp_path / "runs"))
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mri_keras.ensemble",
            f"--eval_dirs={','.join(dirs.values())}",
            "--method=caruana",
            "--caruana_iterations=10",
            f"--output_dir={out}",
            "--n_bootstrap=20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "caruana ensemble: good_a x" in proc.stdout
    assert json.load(open(out / "ensemble.json"))["chosen"]["noise"] == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mri_keras.ensemble",
            "--method=caruana",
            f"--output_dir={out}",
            f"--test_predictions={dirs['good_a']}/test",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "validation" in proc.stderr
    assert "mri_keras.ensemble: error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(  # A member without evaluation outputs: named, no traceback.
        [
            sys.executable,
            "-m",
            "mri_keras.ensemble",
            f"--output_dir={out}",
            f"--eval_dirs={dirs['good_a']},{tmp_path / 'missing'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"mri_keras.ensemble: error: {tmp_path / 'missing'}" in proc.stderr


def test_ensemble_reports_paired_differences_with_members(tmp_path):
    dirs = _write_eval_dirs(str(tmp_path / "runs"))
    desc = ensemble.run_ensemble(
        ensemble.EnsembleConfig(
            test_predictions=tuple(os.path.join(dirs[n], "test") for n in ("good_a", "noise")),
            method="mean",
            output_dir=str(tmp_path / "m"),
            n_bootstrap=100,
        )
    )
    vs_noise = desc["test_vs_members"]["noise"]["malignant"]
    assert vs_noise["difference"] > 0 and vs_noise["ci_low"] > 0
    assert vs_noise["auc_a"] == pytest.approx(desc["test_breast_level"]["malignant"]["auc"])


def test_ensemble_compares_with_its_best_member_chosen_on_val(tmp_path):
    dirs = _write_eval_dirs(str(tmp_path / "runs"))
    names = ("good_a", "noise", "inverted")
    desc = ensemble.run_ensemble(
        ensemble.EnsembleConfig(
            test_predictions=tuple(os.path.join(dirs[n], "test") for n in names),
            val_predictions=tuple(os.path.join(dirs[n], "val") for n in names),
            names=names,
            method="mean",
            output_dir=str(tmp_path / "m"),
            n_bootstrap=50,
        )
    )
    assert desc["best_member_on_val"] == "good_a"  # Highest val malignant AUC.
    best = desc["test_vs_best_member"]
    assert best["member"] == "good_a"
    assert best["difference"] == pytest.approx(
        desc["test_vs_members"]["good_a"]["malignant"]["difference"]
    )
    saved = json.load(open(tmp_path / "m" / "ensemble.json"))
    assert saved["test_vs_best_member"]["member"] == "good_a"
    # DeLong's test of the same difference rides along with the bootstrap.
    assert best["delong"]["difference"] == pytest.approx(best["difference"])
    assert 0 <= best["delong"]["p_value"] <= 1 and best["delong"]["se"] > 0
    assert saved["test_vs_best_member"]["delong"]["p_value"] == pytest.approx(
        best["delong"]["p_value"]
    )


def _write_seeded_eval(root, key, seed, probs_scale, split="test", exams_seed=2):
    from mri_keras import evaluate

    exams, pids, labels, members = _split(exams_seed)
    rng = np.random.default_rng(seed)
    probs = _sigmoid((2.0 * labels - 1.0) * probs_scale + rng.normal(size=labels.shape))
    pred = predictions_io.Predictions(tuple(exams), tuple(pids), labels, probs)
    summary = {"name": key, **evaluate.summarize(pred, n_bootstrap=30)}
    path = os.path.join(root, key, f"seed_{seed}", split)
    evaluate.write_report(path, pred, summary)
    return json.load(open(os.path.join(path, "metrics.json")))


def test_table1_over_seeds_reports_mean_sd_lowest_seed_and_the_paper(tmp_path):
    from mri_keras import experiments

    root = str(tmp_path / "eval")
    aucs = {}
    for key, scale in (("t0", 0.2), ("t2sub", 2.0)):
        for seed in (0, 1, 2):
            m = _write_seeded_eval(root, key, seed, scale)
            aucs[key, seed] = m["breast_level"]["malignant"]["auc"]
    text = experiments.run(
        experiments.ExperimentsConfig(report="table1", eval_root=root, output_dir=str(tmp_path))
    )
    row = next(l for l in text.splitlines() if l.startswith("| t2 - t0"))
    values = [aucs["t2sub", s] for s in (0, 1, 2)]
    assert f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (n=3)" in row
    lowest = int(np.argmin(values))
    assert f"lowest seed {lowest}" in row and "0.7267 / 0.8486" in row  # Gong et al.'s figures.
    assert next(l for l in text.splitlines() if l.startswith("| t1 - t0")).count("not run") == 2
    rows = list(__import__("csv").DictReader(open(tmp_path / "table1.csv")))
    assert len(rows) == 2 * 3 * 2 and {r["seed"] for r in rows} == {"0", "1", "2"}

    # Ensemble rows: each seed's paired difference with its best member, named by its seed
    # (not by the bootstrap seed the comparison also records).
    for seed in (0, 1, 2):
        _write_seeded_eval(root, "mean_sub", seed, 2.5)
        with open(os.path.join(root, "mean_sub", f"seed_{seed}", "ensemble.json"), "w") as f:
            json.dump(
                {
                    "test_vs_best_member": {
                        "member": "t2sub",
                        "difference": 0.01 * (seed + 1),
                        "ci_low": -0.01,
                        "ci_high": 0.03,
                        "p_value": 0.5,
                        "seed": 0,
                        **({"delong": {"p_value": 0.25}} if seed == 1 else {}),
                    }
                },
                f,
            )
    text = experiments.run(
        experiments.ExperimentsConfig(report="table1", eval_root=root, output_dir=str(tmp_path))
    )
    line = next(l for l in text.splitlines() if l.startswith("- Mean of"))
    assert "mean +0.020" in line
    for seed in (0, 1, 2):
        assert f"seed {seed} vs t2sub: +0.0{seed + 1}0" in line
    assert "bootstrap p=0.5, DeLong p=0.25)" in line  # seed 1; older files carry no DeLong

    # Figure 2 over seeds: mean +- sd per point, error-bar plot.
    for pct, scale in (("10", 0.3), ("100", 2.0)):
        for seed in (0, 1, 2):
            _write_seeded_eval(root, f"frac_{pct}", seed, scale)
    text = experiments.run(
        experiments.ExperimentsConfig(
            report="data_fraction", eval_root=root, output_dir=str(tmp_path)
        )
    )
    lines = text.splitlines()
    assert [l.split("|")[1].strip() for l in lines[2:]] == ["10%", "100%"]
    assert all("(n=3)" in l for l in lines[2:])
    assert os.path.getsize(tmp_path / "data_fraction.png") > 1000


def test_seeds_report(tmp_path):
    from mri_keras import experiments

    root = str(tmp_path / "eval")
    test = [_write_seeded_eval(root, "", s, 1.0 + s) for s in (0, 1, 2)]
    for s in (0, 1, 2):
        _write_seeded_eval(root, "", s, 1.0, split="val", exams_seed=1)
    text = experiments.run(
        experiments.ExperimentsConfig(report="seeds", eval_root=root, output_dir=str(tmp_path))
    )
    values = [m["breast_level"]["malignant"]["auc"] for m in test]
    assert f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (n=3)" in text
    assert f"lowest seed {int(np.argmin(values))}" in text
    assert len([l for l in text.splitlines() if l.startswith("| ") and l[2].isdigit()]) == 3
    assert (tmp_path / "seeds.csv").is_file()
    stats = experiments.spread([0.9, float("nan"), 0.8], [4, 5, 6])
    assert stats["n"] == 2 and stats["lowest_seed"] == 6 and stats["mean"] == pytest.approx(0.85)
    with pytest.raises(FileNotFoundError, match="seeds.sh"):
        experiments.run(
            experiments.ExperimentsConfig(
                report="seeds", eval_root=str(tmp_path / "none"), output_dir=str(tmp_path)
            )
        )
