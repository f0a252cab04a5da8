"""Evaluates a trained model on one split of a converted archive.

Writes to ``--output_dir``:

- ``predictions.csv``: one row per breast (see `mri_keras.predictions_io`).
- ``metrics.json``: breast-level malignant and benign AUC (the paper's pooling: both breasts of
  every exam scored independently, in one AUC) with percentile bootstrap confidence intervals
  that resample patients, exam-level AUCs, and counts.
- ``roc.png``: breast-level ROC curves of both tasks, CIs in the legend.
- In ``metrics.json`` besides: breast-level partial AUC at specificity >= 0.8, sensitivity at
  specificity 0.80/0.90/0.95 and specificity at sensitivity 0.95 (`mri_keras.operating_points`),
  ECE and Brier score (`mri_keras.calibration`), where the decision curve beats treat-all and
  treat-none (`mri_keras.decision_curve`); all with patient-bootstrap CIs where they have one.
- ``reliability.png``, ``decision_curve.png`` / ``decision_curve.csv`` and ``report.html``
  (everything on one self-contained page, `mri_keras.report`).

Usage::

    python -m mri_keras.evaluate --model=MODEL_DIR --data_dir=RECORDS --split=test \
        --output_dir=OUT [--n_bootstrap=2000] [--seed=0] [--tta=flip]

``--split=val,test`` evaluates several splits with one loaded model, into ``OUT/val`` and
``OUT/test``; then a threshold is chosen on val at ``--operating_point`` (default
``sensitivity:0.95``) and applied unchanged to test (``validation_threshold`` in metrics.json).
``--calibrate`` (needs val among the splits) fits one temperature per task on val, writes
``calibration.json`` beside ``best.keras`` and reports the calibrated figures next to the
uncalibrated ones (``calibrated`` in metrics.json, ``reliability_calibrated.png``).

``--tta=flip`` scores every exam also mirrored left-right and averages (`mri_keras.tta`; the
demo recipe's choice); ``metrics.json`` records the mode under ``"tta"``.

``--model`` is a training MODEL_DIR (its ``export/`` SavedModel is used, else ``best.keras``),
an export directory, or a ``.keras`` file. The preprocessing is the model's own (see
`mri_keras.inference`).
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import dataclasses
import json
import os
import sys
import time

import numpy as np

from mri_keras import calibration as calibration_lib
from mri_keras import constants, decision_curve, operating_points, predictions_io
from mri_keras import metrics as metrics_lib
from tfrecords_tools import fileio, schema

METRICS_FILENAME = "metrics.json"
ROC_FILENAME = "roc.png"
RELIABILITY_CALIBRATED_FILENAME = "reliability_calibrated.png"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` runs.

    Attributes:
      model: str. MODEL_DIR, export directory or ``.keras`` file.
      data_dir: str. Converted records directory (with manifest.json).
      split: str. "train", "val" or "test". Defaults to "test".
      output_dir: str. Where the outputs go (created).
      n_bootstrap: int. Bootstrap resamples for the CIs. Defaults to 2000.
      seed: int. Bootstrap seed. Defaults to 0.
      confidence: float. CI level. Defaults to 0.95.
      model_format: str. "auto" (export if present, else best.keras), "export" or "keras".
      name: Optional[str]. Label of the model in metrics.json and the plot. Defaults to the
        model directory's name.
      operating_point: str. ``sensitivity:X`` or ``specificity:X``: the target at which a
        threshold is chosen on val and applied to the other splits. Defaults to
        ``sensitivity:0.95``.
      calibrate: bool. Fit temperature scaling on val (see `evaluate_splits`). Defaults to
        False.
      calibration_bins: int. Equal-width bins of the ECE and reliability diagram. Defaults
        to 10.
      tta: str. Test-time augmentation, "none" or "flip" (`mri_keras.tta`). Defaults to
        "none".
    """

    model: str
    data_dir: str
    output_dir: str
    split: str = "test"
    n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP
    seed: int = 0
    confidence: float = metrics_lib.DEFAULT_CONFIDENCE
    model_format: str = "auto"
    name: str | None = None
    operating_point: str = operating_points.DEFAULT_OPERATING_POINT
    calibrate: bool = False
    calibration_bins: int = calibration_lib.DEFAULT_BINS
    tta: str = "none"

    def __post_init__(self):
        if self.tta not in constants.TTA_MODES:
            raise ValueError(
                f"tta must be one of {constants.TTA_MODES}. Received: tta={self.tta!r}"
            )
        if self.split not in schema.SPLITS:
            raise ValueError(f"split must be train, val or test. Received: split={self.split!r}")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be >= 1. Received: {self.n_bootstrap}")
        operating_points.parse_operating_point(self.operating_point)
        if self.calibration_bins < 1:
            raise ValueError(f"calibration_bins must be >= 1. Received: {self.calibration_bins}")


def summarize(
    predictions: predictions_io.Predictions,
    n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = metrics_lib.DEFAULT_CONFIDENCE,
    calibration_bins: int = calibration_lib.DEFAULT_BINS,
) -> dict:
    """AUCs with patient-bootstrap CIs, counts and the clinical figures of one prediction set.

    Returns:
      dict with ``breast_level`` and ``exam_level`` (each ``{task: metrics.auc_with_ci(...)}``),
      ``counts``, ``bootstrap`` (settings), and, per task, breast level: ``partial_auc``
      (`metrics.partial_auc_with_ci`), ``operating_points``
      (`operating_points.threshold_free_points`); ``calibration``
      (`calibration.calibration_summary`) and ``decision_curve`` (malignant: prevalence and the
      threshold ranges where the model beats treat-all and treat-none). Every CI uses the same
      resamples (one seed).
    """
    labels, probs, pids = predictions.labels, predictions.probs, predictions.patient_ids
    out = {"breast_level": {}, "exam_level": {}}
    for level in ("breast", "exam"):
        for task in ("malignant", "benign"):
            out[f"{level}_level"][task] = metrics_lib.auc_with_ci(
                labels,
                probs,
                pids,
                task=task,
                level=level,
                n_bootstrap=n_bootstrap,
                seed=seed,
                confidence=confidence,
            )
    counts = {
        "exams": len(predictions),
        "patients": len(set(pids)),
        "breasts": len(predictions) * len(constants.SIDES),
    }
    for task in constants.TASKS:
        y, _ = metrics_lib.breast_level_arrays(labels, probs, task)
        counts[f"{task}_breasts"] = int(y.sum())
        cols = [constants.LABELS.index(f"{s}_{task}") for s in constants.SIDES]
        counts[f"{task}_exams"] = int(labels[:, cols].max(axis=1).sum())
    out["counts"] = counts
    out["bootstrap"] = {
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "confidence": float(confidence),
        "resample_unit": "patient",
        "method": "percentile",
    }
    kwargs = dict(n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    out["partial_auc"] = {
        task: metrics_lib.partial_auc_with_ci(labels, probs, pids, task, **kwargs)
        for task in ("malignant", "benign")
    }
    out["operating_points"] = {
        task: operating_points.threshold_free_points(labels, probs, pids, task, **kwargs)
        for task in ("malignant", "benign")
    }
    out.update(_probability_figures(labels, probs, calibration_bins))
    return out


def _probability_figures(labels, probs, calibration_bins: int) -> dict:
    """The figures that depend on the probabilities' values, not only their ranking."""
    curve = decision_curve.decision_curve(labels, probs, "malignant")
    return {
        "calibration": calibration_lib.calibration_summary(labels, probs, calibration_bins),
        "decision_curve": {
            "task": "malignant",
            "level": "breast",
            "prevalence": curve["prevalence"],
            "useful_range": decision_curve.useful_range(curve),
            "file": decision_curve.CSV_FILENAME,
        },
    }


def plot_roc(predictions: predictions_io.Predictions, summary: dict, path: str, title: str = ""):
    """Draws breast-level ROC curves of both tasks with their CIs in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn import metrics as sk_metrics

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    level = int(round(100 * summary["bootstrap"]["confidence"]))
    for task, color in (("malignant", "tab:red"), ("benign", "tab:blue")):
        y, s = metrics_lib.breast_level_arrays(predictions.labels, predictions.probs, task)
        result = summary["breast_level"][task]
        if len(np.unique(y)) < 2:
            ax.plot([], [], color=color, label=f"{task}: AUC n/a (one class only)")
            continue
        fpr, tpr, _ = sk_metrics.roc_curve(y, s)
        ci = ""
        if not np.isnan(result["ci_low"]):
            ci = f" ({level}% CI {result['ci_low']:.3f}-{result['ci_high']:.3f})"
        ax.plot(fpr, tpr, color=color, linewidth=1.5, label=f"{task}: AUC {result['auc']:.3f}{ci}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    counts = summary.get("counts", {})
    subtitle = ""
    if counts:
        subtitle = (
            f"\n{counts['exams']} exams, {counts['patients']} patients, "
            f"{counts['breasts']} breasts ({counts['malignant_breasts']} malignant, "
            f"{counts['benign_breasts']} benign)"
        )
    ax.set_title((title or "Breast-level ROC") + subtitle, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def json_safe(obj):
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no NaN; null means "undefined" (e.g. one class only)
    return obj


def check_output_dir(output_dir: str) -> None:
    """Raises ValueError when ``output_dir`` exists as something other than a directory (found
    before the work, not when writing the report)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} exists and is not a directory.")


def write_report(
    output_dir: str,
    predictions: predictions_io.Predictions,
    summary: dict,
    title: str = "",
    *,
    calibrated_probs=None,
) -> dict:
    """Writes predictions.csv, metrics.json, roc.png, reliability.png, decision_curve.csv/.png
    and report.html; returns the paths.

    Args:
      output_dir: str. Created if missing.
      predictions: the (uncalibrated) predictions.
      summary: dict for metrics.json (from `summarize`, plus run details).
      title: str. Figure title prefix.
      calibrated_probs: optional (N, 4) calibrated probabilities: adds
        ``reliability_calibrated.png``.
    """
    from mri_keras import report

    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "predictions": os.path.join(output_dir, predictions_io.FILENAME),
        "metrics": os.path.join(output_dir, METRICS_FILENAME),
        "roc": os.path.join(output_dir, ROC_FILENAME),
        "reliability": os.path.join(output_dir, calibration_lib.RELIABILITY_FILENAME),
        "decision_curve": os.path.join(output_dir, decision_curve.PNG_FILENAME),
        "decision_curve_csv": os.path.join(output_dir, decision_curve.CSV_FILENAME),
    }
    predictions_io.write_predictions(paths["predictions"], predictions)
    fileio.atomic_write_text(paths["metrics"], json.dumps(json_safe(summary), indent=2) + "\n")
    plot_roc(predictions, summary, paths["roc"], title=title)
    bins = (
        summary.get("calibration", {}).get("bins", {}).get("n_bins", calibration_lib.DEFAULT_BINS)
    )
    calibration_lib.plot_reliability(
        predictions.labels, predictions.probs, paths["reliability"], bins, title=title
    )
    if calibrated_probs is not None:
        paths["reliability_calibrated"] = os.path.join(output_dir, RELIABILITY_CALIBRATED_FILENAME)
        calibration_lib.plot_reliability(
            predictions.labels,
            calibrated_probs,
            paths["reliability_calibrated"],
            bins,
            title=f"{title} calibrated" if title else "Breast-level reliability, calibrated",
        )
    curve = decision_curve.decision_curve(predictions.labels, predictions.probs, "malignant")
    fileio.atomic_write_text(paths["decision_curve_csv"], decision_curve.to_csv(curve))
    decision_curve.plot_decision_curve(
        curve, paths["decision_curve"], title=f"{title} decision curve" if title else ""
    )
    paths["report"] = report.write_evaluation_report(output_dir, json_safe(summary), title or None)
    return paths


def read_metrics(path: str) -> dict:
    """Reads a metrics.json (file or directory holding one); nulls become NaN."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    with open(path) as f:
        data = json.load(f)

    def _nan(obj):
        if isinstance(obj, dict):
            return {k: _nan(v) for k, v in obj.items()}
        return float("nan") if obj is None else obj

    for level in ("breast_level", "exam_level"):
        if level in data:
            data[level] = _nan(data[level])
    return data


def _predict(config: EvalConfig, predictor) -> predictions_io.Predictions:
    from mri_keras import validation

    predictions = validation.predict_split(
        predictor, config.data_dir, config.split, tta_mode=config.tta
    )
    if not predictions.exam_ids:
        raise ValueError(f"{config.data_dir}: split {config.split!r} holds no exams")
    return predictions


def _validation_thresholds(config: EvalConfig, predictions, val_predictions) -> dict:
    """``{task: operating_points.validation_threshold(...)}`` for this split (or a note)."""
    if config.split == "val":
        val_predictions, test_predictions = predictions, None
    elif val_predictions is not None:
        test_predictions = predictions
    else:
        return {
            "validation_threshold_note": (
                "No threshold chosen: that needs the validation split (--split=val,test); "
                "the operating points above are threshold-free."
            )
        }
    out = {}
    for task in ("malignant", "benign"):
        try:
            out[task] = operating_points.validation_threshold(
                val_predictions,
                test_predictions,
                config.operating_point,
                task,
                n_bootstrap=config.n_bootstrap,
                seed=config.seed,
                confidence=config.confidence,
            )
        except ValueError as e:  # e.g. no benign breast in val: the other task still reports
            out[task] = {"operating_point": config.operating_point, "task": task, "note": str(e)}
    note = None
    if config.split == "val":
        note = "Chosen on this split: its figures here are in-sample; test gets them unchanged."
    return {"validation_threshold": out, "validation_threshold_note": note}


def calibration_path(predictor, model: str) -> str:
    """Where ``--calibrate`` writes calibration.json: beside best.keras in the model directory
    (the training run's directory, else the ``.keras`` file's, else the export's parent)."""
    location = predictor.location
    directory = location.model_dir or os.path.dirname(
        location.keras_path or (location.export_dir or os.path.abspath(model)).rstrip("/")
    )
    return os.path.join(directory, calibration_lib.FILENAME)


def _recalibrate_export(predictor, calibration) -> None:
    """Writes the model's export again with the new temperatures built in (its signatures'
    ``probabilities``), so a SavedModel served elsewhere is calibrated too."""
    from mri_keras import export

    location = predictor.location
    if location.export_dir and location.keras_path and export.read_metadata(location.export_dir):
        export.recalibrate(location.export_dir, location.keras_path, calibration)


def _calibrated(config, predictions, calibration, calibration_file, thresholds) -> tuple:
    calibrated = calibration_lib.apply_temperature(predictions.probs, calibration)
    out = {
        "method": "temperature_scaling",
        "temperature": dict(calibration.temperature),
        "fitted_on": dict(calibration.fitted_on),
        "nll_on_fitting_split": dict(calibration.nll),
        "file": calibration_file,
        "in_sample": config.split == calibration.fitted_on.get("split"),
        "warnings": list(calibration.warnings),
        **_probability_figures(predictions.labels, calibrated, config.calibration_bins),
    }
    chosen = (thresholds or {}).get("validation_threshold") or {}
    out["validation_threshold"] = {
        # The same rule on the calibrated scale (calibration is monotone: same calls).
        task: float(
            calibration_lib.apply_temperature(
                np.full(len(constants.LABELS), r["threshold"]), calibration
            )[constants.LABELS.index(f"left_{task}")]
        )
        for task, r in chosen.items()
        if "threshold" in r
    }
    return out, calibrated


def _evaluate_split(
    config: EvalConfig,
    predictor,
    predictions,
    start: float,
    *,
    val_predictions=None,
    calibration=None,
    calibration_file=None,
) -> dict:
    summary = summarize(
        predictions, config.n_bootstrap, config.seed, config.confidence, config.calibration_bins
    )
    thresholds = _validation_thresholds(config, predictions, val_predictions)
    summary.update(thresholds)
    calibrated_probs = None
    if calibration is not None:
        summary["calibrated"], calibrated_probs = _calibrated(
            config, predictions, calibration, calibration_file, thresholds
        )
    name = config.name or os.path.basename(
        (predictor.location.model_dir or predictor.location.export_dir or config.model).rstrip("/")
    )
    summary = {
        "name": name,
        "split": config.split,
        "model": os.path.abspath(config.model),
        "model_format": predictor.source,
        "input_variant": predictor.input_config.input_variant,
        "normalization": predictor.input_config.normalization,
        "tta": config.tta,
        "data_dir": os.path.abspath(config.data_dir),
        **summary,
        "seconds": round(time.time() - start, 2),
    }
    write_report(
        config.output_dir,
        predictions,
        summary,
        title=f"{name} ({config.split})",
        calibrated_probs=calibrated_probs,
    )
    return summary


def evaluate(config: EvalConfig, *, predictor=None, val_predictions=None) -> dict:
    """Predicts one split and writes the report; returns the metrics dict.

    Args:
      config: EvalConfig. ``config.calibrate`` needs the validation split: use
        `evaluate_splits`.
      predictor: optional ``inference.Predictor`` of ``config.model`` already loaded (several
        splits of one model share it). Defaults to loading it.
      val_predictions: optional Predictions of the validation split: a threshold is chosen on
        them at ``config.operating_point`` and applied to this split.
    """
    from mri_keras import inference

    if config.calibrate:
        raise ValueError("calibrate needs the validation split: use evaluate_splits")
    start = time.time()
    check_output_dir(config.output_dir)
    if predictor is None:
        predictor = inference.load_predictor(config.model, config.model_format)
    predictions = _predict(config, predictor)
    calibration, calibration_file = _saved_calibration(predictor, config.model)
    return _evaluate_split(
        config,
        predictor,
        predictions,
        start,
        val_predictions=val_predictions,
        calibration=calibration,
        calibration_file=calibration_file,
    )


def _saved_calibration(predictor, model: str) -> tuple:
    """(calibration, where it is) saved with the model (``inference.model_calibration``), or
    (None, None)."""
    if predictor.calibration is None:
        return None, None
    if predictor.source == "export":
        return predictor.calibration, os.path.join(
            predictor.location.export_dir, constants.EXPORT_METADATA_PATH
        )
    return predictor.calibration, calibration_path(predictor, model)


def evaluate_splits(configs, *, predictor=None) -> list:
    """Evaluates several splits of one model, the validation split first.

    With ``val`` among the splits, every other split gets the threshold chosen on val at its
    config's ``operating_point``. With ``calibrate`` (any config), one temperature per task is
    fitted on the val predictions, written to ``calibration.json`` beside ``best.keras`` (see
    `calibration_path`) and every split reports its calibrated figures too (``calibrated`` in
    metrics.json; in-sample on val).

    Args:
      configs: sequence of EvalConfig of one model, one per split.
      predictor: optional loaded ``inference.Predictor``. Defaults to loading it once.

    Returns:
      list of the metrics dicts, in the order of ``configs``.

    Raises:
      ValueError: ``calibrate`` without a val split, or a val split of one class.
    """
    from mri_keras import inference

    configs = list(configs)
    if not configs:
        raise ValueError("evaluate_splits needs at least one split")
    for config in configs:
        check_output_dir(config.output_dir)
    val_configs = [c for c in configs if c.split == "val"]
    calibrate = any(c.calibrate for c in configs)
    if calibrate and not val_configs:
        raise ValueError(
            "--calibrate fits the temperatures on the validation split: add it, "
            "e.g. --split=val,test"
        )
    if predictor is None:
        predictor = inference.load_predictor(configs[0].model, configs[0].model_format)
    order = sorted(range(len(configs)), key=lambda i: configs[i].split != "val")
    summaries = [None] * len(configs)
    val_predictions = None
    # Without --calibrate, a calibration saved with the model is reported beside the raw figures.
    calibration, calibration_file = (
        (None, None) if calibrate else _saved_calibration(predictor, configs[0].model)
    )
    for i in order:
        config, start = configs[i], time.time()
        predictions = _predict(config, predictor)
        if config.split == "val":
            val_predictions = predictions
            if calibrate:
                calibration = calibration_lib.fit_temperature(
                    predictions.labels, predictions.probs, split="val"
                )
                calibration_file = calibration_lib.save_calibration(
                    calibration_path(predictor, config.model), calibration
                )
                _recalibrate_export(predictor, calibration)
        summaries[i] = _evaluate_split(
            config,
            predictor,
            predictions,
            start,
            val_predictions=val_predictions if config.split != "val" else None,
            calibration=calibration,
            calibration_file=calibration_file,
        )
    return summaries


def format_summary(summary: dict) -> list:
    """The lines ``main`` prints for one split: AUCs, partial AUC, operating points, the
    validation threshold, calibration (and calibrated), decision curve."""
    tta = summary.get("tta", "none")
    tta_note = "" if tta == "none" else f" (tta={tta})"
    who = f"{summary.get('name', '')} {summary.get('split', '')}".strip() + tta_note
    lines = []
    for task in ("malignant", "benign"):
        lines.append(
            f"{who} breast-level {task} AUC: "
            f"{metrics_lib.format_auc(summary['breast_level'][task])}"
        )
    exam_auc = metrics_lib.format_auc(summary["exam_level"]["malignant"])
    lines.append(f"{who} exam-level malignant AUC: {exam_auc}")
    for task, r in (summary.get("partial_auc") or {}).items():
        std, raw = r["standardized"], r["raw"]
        lines.append(
            f"{who} breast-level {task} partial AUC (specificity >= {r['min_specificity']:.2f}): "
            f"{operating_points.format_rate(std['value'], std)} McClish-standardised, "
            f"raw area {operating_points.format_rate(raw['value'], raw, digits=4)}"
        )
    for task, r in (summary.get("operating_points") or {}).items():
        lines += [f"{who} {line}" for line in operating_points.format_threshold_free(r, task)]
    for r in (summary.get("validation_threshold") or {}).values():
        if "threshold" in r:
            lines += [f"{who} {line}" for line in operating_points.format_validation_threshold(r)]
        else:
            lines.append(f"{who} {r['task']} threshold at {r['operating_point']}: {r['note']}")
    if summary.get("validation_threshold_note"):
        lines.append(f"{who} note: {summary['validation_threshold_note']}")
    calib = summary.get("calibration") or {}
    after = (summary.get("calibrated") or {}).get("calibration") or {}
    for task in ("malignant", "benign"):
        if task in calib:
            text = (
                f"{who} {task} calibration: ECE {calib[task]['ece']:.3f} "
                f"({calib['bins']['n_bins']} equal-width bins), Brier {calib[task]['brier']:.4f}"
            )
            if task in after:
                t = summary["calibrated"]["temperature"][task]
                text += (
                    f"; calibrated (T = {t:.3f}): ECE {after[task]['ece']:.3f}, "
                    f"Brier {after[task]['brier']:.4f}"
                )
            lines.append(text)
    for warning in (summary.get("calibrated") or {}).get("warnings") or []:
        lines.append(f"{who} calibration warning: {warning}")
    dc = summary.get("decision_curve")
    if dc:
        runs = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in dc["useful_range"]) or "none"
        lines.append(
            f"{who} decision curve (malignant): net benefit above treat-all and treat-none at "
            f"threshold probabilities {runs}"
        )
    return lines


def define_flags():
    """Defines this entry point's flags."""
    from absl import flags

    from mri_keras import inference

    flags.DEFINE_string("model", None, "MODEL_DIR, its export/ SavedModel, or a .keras file.")
    flags.DEFINE_string("data_dir", None, "Converted records directory (with manifest.json).")
    flags.DEFINE_list(
        "split",
        ["test"],
        "Split(s) to evaluate, e.g. test or val,test (the model is loaded once).",
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "Where predictions.csv, metrics.json, roc.png go; with several splits, one "
        "sub-directory per split (OUT/val, OUT/test).",
    )
    flags.DEFINE_integer(
        "n_bootstrap",
        metrics_lib.DEFAULT_N_BOOTSTRAP,
        "Bootstrap resamples (patients drawn with replacement).",
    )
    flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
    flags.DEFINE_float("confidence", metrics_lib.DEFAULT_CONFIDENCE, "Confidence level of CIs.")
    flags.DEFINE_enum(
        "model_format",
        "auto",
        list(inference.MODEL_FORMATS),
        "auto: export/ SavedModel if present, else best.keras.",
    )
    flags.DEFINE_string("name", None, "Name of the model in the report (default: its dir name).")
    flags.DEFINE_enum(
        "tta",
        "none",
        list(constants.TTA_MODES),
        "Test-time augmentation: flip scores each exam also mirrored left-right (sides "
        "swapped back) and averages the two.",
    )
    flags.DEFINE_string(
        "operating_point",
        operating_points.DEFAULT_OPERATING_POINT,
        "sensitivity:X or specificity:X: the target at which a breast-level threshold is "
        "chosen on val and applied unchanged to the other splits (needs --split=val,...).",
    )
    flags.DEFINE_boolean(
        "calibrate",
        False,
        "Fit temperature scaling on the val predictions (needs val in --split), write "
        "calibration.json beside best.keras, report calibrated figures too.",
    )
    flags.DEFINE_integer(
        "calibration_bins", calibration_lib.DEFAULT_BINS, "Equal-width bins of the ECE."
    )
    flags.mark_flags_as_required(["model", "data_dir", "output_dir"])


def main(argv):
    from absl import app, flags

    from tfrecords_tools import memory

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    memory.tune_malloc()  # Reuse freed exam-sized blocks (tfrecords_tools.memory).
    f = flags.FLAGS
    splits = list(dict.fromkeys(f.split))  # In the given order, each once.
    if not splits:
        raise app.UsageError("--split names no split.")
    try:  # Bad input (no model, no manifest, a bad split...): a message, not a traceback.
        configs = [
            EvalConfig(
                model=f.model,
                data_dir=f.data_dir,
                output_dir=f.output_dir if len(splits) == 1 else os.path.join(f.output_dir, s),
                split=s,
                n_bootstrap=f.n_bootstrap,
                seed=f.seed,
                confidence=f.confidence,
                model_format=f.model_format,
                name=f.name,
                operating_point=f.operating_point,
                calibrate=f.calibrate,
                calibration_bins=f.calibration_bins,
                tta=f.tta,
            )
            for s in splits
        ]
        summaries = evaluate_splits(configs)  # checks, then loads the model once
        for config, summary in zip(configs, summaries):
            print("\n".join(format_summary(summary)))
            calibrated = summary.get("calibrated")
            if calibrated and config.split == "val":
                print(f"wrote {calibrated['file']}")
            page = os.path.join(config.output_dir, "report.html")
            print(f"wrote {config.output_dir} (one-page report: {page})")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"mri_keras.evaluate: error: {e}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
