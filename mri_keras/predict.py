"""Runs a trained model on new DICOM exam folders (no TFRecords needed).

Usage::

    python -m mri_keras.predict --model=MODEL_DIR/export --exam_dir=DICOM_EXAM \
        [--heatmap_dir=DIR] [--heatmap_target=malignant] [--heatmap_method=gradient] \
        [--tta=flip]
    python -m mri_keras.predict --model=MODEL_DIR/export --worklist=FOLDER_OR_CSV \
        [--worklist_depth=1] [--dicom_root=DIR] [--output=scores.csv|scores.jsonl]

``--worklist`` scores many exams in one process (`mri_keras.worklist`): one JSON line or CSV
row per exam, failures listed with their reasons and the rest still scored; exit status 3 when
some exams failed.

The folder is read by `tfrecords_tools.dicom_reader.load_exam`, the converter's own reader
(series grouping, phase order, canonical orientation, rescale), and scored by the SavedModel's
``serving_default`` (which carries the model's preprocessing). Prints one JSON object::

    {"left": {"benign": 0.02, "malignant": 0.91}, "right": {"benign": 0.01, "malignant": 0.03},
     "input": "t2-t0", "slices": 60, "shape": [60, 256, 256], "model_format": "export",
     "tta": "none", "calibrated": false}

With temperature scaling saved with the model (``evaluate --calibrate``), "left"/"right" are
the calibrated probabilities, ``"calibrated": true``, and ``"uncalibrated"`` and
``"temperature"`` are added.

No DICOM header value (names, ids, dates, UIDs) is printed; the patient id the reader
returns is not used. A folder that is not a usable exam exits with status 2 and the reader's
reason on stderr.

``--heatmap_dir`` also writes a saliency volume, ``heatmap.npy`` (float32 ``(S, H, W)`` in
[0, 1], canonical orientation: slice toward Superior, row toward Posterior, col toward the
patient's Left), and PNG overlays of the most salient slices. By default it is the input
gradient of the malignant heads' log-odds; HiResCAM / Grad-CAM on the 3D block are options
(see `mri_keras.heatmap`). Saliency needs the Keras model (``MODEL_DIR/best.keras``, next to
``export/``): a SavedModel has no intermediate layers.
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import dataclasses
import json
import os
import sys

from mri_keras import constants, inference
from mri_keras import heatmap as heatmap_lib

EXIT_BAD_EXAM = 2


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What `predict_exam` runs.

    Attributes:
      model: str. MODEL_DIR, its export/ directory, or a .keras file.
      exam_dir: str. One exam's DICOM folder.
      heatmap_dir: Optional[str]. Where saliency outputs go; None skips them.
      heatmap_target: str. "malignant", "benign" or one label. Defaults to "malignant".
      heatmap_method: str. One of `heatmap.METHODS`. Defaults to "gradient".
      top_slices: int. PNG overlays written. Defaults to 4.
      model_format: str. "auto", "export" or "keras". Defaults to "auto".
      tta: str. Test-time augmentation, "none" or "flip" (`mri_keras.tta`). Defaults to
        "none". Heatmaps explain the plain (unmirrored) pass.
    """

    model: str
    exam_dir: str
    heatmap_dir: str | None = None
    heatmap_target: str = "malignant"
    heatmap_method: str = "gradient"
    top_slices: int = 4
    model_format: str = "auto"
    tta: str = "none"

    def __post_init__(self):
        if self.tta not in constants.TTA_MODES:
            raise ValueError(f"tta must be one of {constants.TTA_MODES}. Received: {self.tta!r}")
        heatmap_lib.target_labels(self.heatmap_target)
        if self.heatmap_method not in heatmap_lib.METHODS:
            raise ValueError(
                f"heatmap_method must be one of {heatmap_lib.METHODS}. "
                f"Received: {self.heatmap_method!r}"
            )
        if self.top_slices < 0:
            raise ValueError(f"top_slices must be >= 0. Received: {self.top_slices}")


def probabilities_json(probs) -> dict:
    """(4,) p(positive) in LABELS order -> {"left": {"benign", "malignant"}, "right": ...}."""
    return {
        side: {
            task: float(probs[constants.LABELS.index(f"{side}_{task}")]) for task in constants.TASKS
        }
        for side in constants.SIDES
    }


def predict_exam(config: PredictConfig, predictor: inference.Predictor | None = None) -> dict:
    """Scores one exam folder; optionally writes its heatmaps.

    Args:
      config: PredictConfig.
      predictor: optional already-loaded `inference.Predictor` (to score many exams).

    Returns:
      The JSON-ready result (see module docstring).

    Raises:
      tfrecords_tools.dicom_reader.ExamError: the folder is not a usable exam.
      FileNotFoundError: no model, or heatmaps asked for without best.keras.
      ValueError: heatmap_dir is a file.
    """
    if (
        config.heatmap_dir
        and os.path.exists(config.heatmap_dir)
        and not os.path.isdir(config.heatmap_dir)
    ):
        raise ValueError(f"heatmap_dir {config.heatmap_dir!r} exists and is not a directory.")
    predictor = predictor or inference.load_predictor(config.model, config.model_format, config.tta)
    if config.heatmap_dir and predictor.location.keras_path is None:
        raise FileNotFoundError(
            f"Heatmaps need the Keras model ({constants.BEST_MODEL_NAME}) next to the export "
            f"({predictor.location.model_dir or config.model}): a SavedModel has no "
            "intermediate layers to compute Grad-CAM on."
        )
    return score_exam(config, predictor, read_exam(config.exam_dir))


def read_exam(exam_dir: str):
    """Reads one exam folder with the converter's reader (no PatientID needed: new exams are
    often anonymised; only splits use it).

    Raises:
      tfrecords_tools.dicom_reader.ExamError: the folder is not a usable exam.
    """
    from tfrecords_tools import dicom_reader

    return dicom_reader.load_exam(
        exam_dir, options=dicom_reader.ReaderOptions(require_patient_id=False)
    )


def score_exam(config: PredictConfig, predictor: inference.Predictor, exam) -> dict:
    """Scores an exam ``read_exam`` returned (and writes its heatmaps); see `predict_exam`."""
    phases = {p: exam.volumes[p] for p in predictor.phases}
    probs = predictor(phases)
    shape = [int(v) for v in exam.volumes[predictor.phases[0]].shape]
    calibrated = None
    if predictor.calibration is not None:
        from mri_keras import calibration as calibration_lib

        calibrated = calibration_lib.apply_temperature(probs, predictor.calibration)
    result = {
        **probabilities_json(probs if calibrated is None else calibrated),
        "input": predictor.input_config.input_variant,
        "slices": shape[0],
        "shape": shape,
        "spacing_mm": [round(float(v), 4) for v in exam.spacing],
        "model_format": predictor.source,
        "tta": predictor.tta_mode,
        "calibrated": calibrated is not None,
    }
    if calibrated is not None:
        result["uncalibrated"] = probabilities_json(probs)
        result["temperature"] = dict(predictor.calibration.temperature)
    if config.heatmap_dir:
        keras_model = predictor.saliency_model()
        heat, image = heatmap_lib.exam_saliency(
            keras_model,
            phases,
            predictor.input_config,
            config.heatmap_target,
            config.heatmap_method,
        )
        written = heatmap_lib.write_heatmaps(
            config.heatmap_dir,
            heat,
            image,
            config.top_slices,
            title=f"{config.heatmap_method} ({config.heatmap_target})",
            spacing=exam.spacing,
        )
        result["heatmap"] = {
            "method": config.heatmap_method,
            "target": config.heatmap_target,
            "npy": written["npy"],
            "png": written["png"],
            "top_slices": written["slices"],
            "orientation": "canonical (slice->Superior, row->Posterior, col->patient Left)",
        }
    return result


def define_flags():
    """Defines this entry point's flags."""
    from absl import flags

    flags.DEFINE_string("model", None, "MODEL_DIR/export (SavedModel), a MODEL_DIR or .keras.")
    flags.DEFINE_string("exam_dir", None, "One exam's DICOM folder.")
    flags.DEFINE_string(
        "worklist",
        None,
        "Many exams: a folder of exam folders (see --worklist_depth) or a CSV with an 'exam' "
        "column (e.g. the converter's labels.csv). Instead of --exam_dir.",
    )
    flags.DEFINE_integer(
        "worklist_depth", 1, "Levels below a --worklist folder where the exam folders are."
    )
    flags.DEFINE_string(
        "dicom_root", None, "Folder a worklist CSV's relative paths start from (default: its own)."
    )
    flags.DEFINE_string(
        "output",
        None,
        "Worklist results: a .csv file, or JSON lines (any other name); default JSON lines on "
        "stdout. Never overwritten.",
    )
    flags.DEFINE_string("heatmap_dir", None, "Write heatmap.npy + PNG overlays here.")
    flags.DEFINE_enum(
        "heatmap_target",
        "malignant",
        list(heatmap_lib.TARGETS),
        "Heads whose log-odds the saliency explains.",
    )
    flags.DEFINE_enum(
        "heatmap_method",
        "gradient",
        list(heatmap_lib.METHODS),
        "Saliency method (see mri_keras.heatmap): gradient (full resolution), "
        "hirescam / gradcam (3D block, coarse), or a CAM x gradient.",
    )
    flags.DEFINE_integer("top_slices", 4, "Number of PNG overlays (most salient slices).")
    flags.DEFINE_enum(
        "model_format",
        "auto",
        list(inference.MODEL_FORMATS),
        "auto: the export if present, else best.keras.",
    )
    flags.DEFINE_enum(
        "tta",
        "none",
        list(constants.TTA_MODES),
        "Test-time augmentation: flip also scores the exam mirrored left-right (sides swapped "
        "back) and averages the two.",
    )
    flags.mark_flags_as_required(["model"])
    flags.register_multi_flags_validator(
        ["exam_dir", "worklist"],
        lambda v: (v["exam_dir"] is None) != (v["worklist"] is None),
        message="give exactly one of --exam_dir (one exam) and --worklist (many).",
    )


def main(argv):
    from absl import app, flags

    from tfrecords_tools import dicom_reader, memory

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    memory.tune_malloc()  # Reuse freed exam-sized blocks (tfrecords_tools.memory).
    f = flags.FLAGS
    config = PredictConfig(
        model=f.model,
        exam_dir=f.exam_dir or "",
        heatmap_dir=f.heatmap_dir,
        heatmap_target=f.heatmap_target,
        heatmap_method=f.heatmap_method,
        top_slices=f.top_slices,
        model_format=f.model_format,
        tta=f.tta,
    )
    if f.worklist:
        _main_worklist(config, f)
        return
    try:
        result = predict_exam(config)
    except dicom_reader.ExamError as e:
        print(f"error: not a usable exam: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_EXAM)
    except (FileNotFoundError, ValueError) as e:  # No model at --model, a bad setting.
        sys.exit(f"mri_keras.predict: error: {e}")
    print(json.dumps(result, indent=None if f.heatmap_dir is None else 2))


def _main_worklist(config: PredictConfig, f) -> None:
    from mri_keras import worklist

    try:
        items = worklist.read_worklist(f.worklist, f.worklist_depth, f.dicom_root)
        summary = worklist.predict_worklist(config, items, f.output)
    except (FileNotFoundError, ValueError) as e:  # WorklistError is a ValueError.
        sys.exit(f"mri_keras.predict: error: {e}")
    if summary["failed"]:
        sys.exit(worklist.EXIT_SOME_FAILED)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
