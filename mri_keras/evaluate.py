"""Evaluates a trained model on one split of a converted archive.

Writes to ``--output_dir``:

- ``predictions.csv``: one row per breast (see `mri_keras.predictions_io`).
- ``metrics.json``: breast-level malignant and benign AUC (the paper's pooling: both breasts of
  every exam scored independently, in one AUC) with percentile bootstrap confidence intervals
  that resample patients, exam-level AUCs, and counts.
- ``roc.png``: breast-level ROC curves of both tasks, CIs in the legend.

Usage::

    python -m mri_keras.evaluate --model=MODEL_DIR --data_dir=RECORDS --split=test \
        --output_dir=OUT [--n_bootstrap=2000] [--seed=0] [--tta=flip]

``--split=val,test`` evaluates several splits with one loaded model, into ``OUT/val`` and
``OUT/test``.

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

from mri_keras import constants, predictions_io
from mri_keras import metrics as metrics_lib
from tfrecords_tools import fileio, schema

METRICS_FILENAME = "metrics.json"
ROC_FILENAME = "roc.png"


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


def summarize(
    predictions: predictions_io.Predictions,
    n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = metrics_lib.DEFAULT_CONFIDENCE,
) -> dict:
    """AUCs with patient-bootstrap CIs and counts for one set of predictions.

    Returns:
      dict with ``breast_level`` and ``exam_level`` (each ``{task: metrics.auc_with_ci(...)}``),
      ``counts`` and ``bootstrap`` (settings). Breast and exam level use the same resamples.
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
    return out


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
    output_dir: str, predictions: predictions_io.Predictions, summary: dict, title: str = ""
) -> dict:
    """Writes predictions.csv, metrics.json and roc.png; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "predictions": os.path.join(output_dir, predictions_io.FILENAME),
        "metrics": os.path.join(output_dir, METRICS_FILENAME),
        "roc": os.path.join(output_dir, ROC_FILENAME),
    }
    predictions_io.write_predictions(paths["predictions"], predictions)
    fileio.atomic_write_text(paths["metrics"], json.dumps(json_safe(summary), indent=2) + "\n")
    plot_roc(predictions, summary, paths["roc"], title=title)
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


def evaluate(config: EvalConfig, *, predictor=None) -> dict:
    """Predicts one split and writes the report; returns the metrics dict.

    Args:
      config: EvalConfig.
      predictor: optional ``inference.Predictor`` of ``config.model`` already loaded (several
        splits of one model share it). Defaults to loading it.
    """
    from mri_keras import inference, validation

    start = time.time()
    check_output_dir(config.output_dir)
    if predictor is None:
        predictor = inference.load_predictor(config.model, config.model_format)
    predictions = validation.predict_split(
        predictor, config.data_dir, config.split, tta_mode=config.tta
    )
    if not predictions.exam_ids:
        raise ValueError(f"{config.data_dir}: split {config.split!r} holds no exams")
    summary = summarize(predictions, config.n_bootstrap, config.seed, config.confidence)
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
    write_report(config.output_dir, predictions, summary, title=f"{name} ({config.split})")
    return summary


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
    flags.mark_flags_as_required(["model", "data_dir", "output_dir"])


def main(argv):
    from absl import app, flags

    from tfrecords_tools import memory

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    memory.tune_malloc()  # Reuse freed exam-sized blocks (tfrecords_tools.memory).
    from mri_keras import inference

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
                tta=f.tta,
            )
            for s in splits
        ]
        predictor = inference.load_predictor(f.model, f.model_format)
        for config in configs:
            summary = evaluate(config, predictor=predictor)
            tta_note = "" if config.tta == "none" else f" (tta={config.tta})"
            for task in ("malignant", "benign"):
                print(
                    f"{summary['name']} {config.split}{tta_note} breast-level {task} AUC: "
                    f"{metrics_lib.format_auc(summary['breast_level'][task])}"
                )
            exam_auc = metrics_lib.format_auc(summary["exam_level"]["malignant"])
            print(
                f"{summary['name']} {config.split}{tta_note} exam-level malignant AUC: {exam_auc}"
            )
            print(f"wrote {config.output_dir}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"mri_keras.evaluate: error: {e}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
