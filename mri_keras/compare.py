"""Paired comparison of two models' predictions on the same exams.

Usage::

    python -m mri_keras.compare --predictions=eval/a/test/predictions.csv \
        --predictions=eval/b/test/predictions.csv [--task=malignant] [--level=breast] \
        [--n_bootstrap=2000] [--seed=0] [--output=compare.json]

Reports the AUC of each model (patient-bootstrap CI), the difference B - A, DeLong's test of
two correlated AUCs (z, two-sided p, 95% CI of the difference; samples treated as
independent) and a paired patient bootstrap of the difference (CI and two-sided p; clustering
by patient respected). Both come from `metrics.paired_auc_difference`, the one paired
comparison of the package (the ensembles and the Table 1 report use it too).

The two files must hold the same exams (any order) with the same labels and patient ids;
otherwise the comparison is refused, naming the file and the first exam that differs.
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import dataclasses
import json
import os
import sys

import numpy as np

from mri_keras import constants, predictions_io
from mri_keras import metrics as metrics_lib

LEVELS = ("breast", "exam")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What `compare` runs.

    Attributes:
      predictions: tuple of two str: predictions.csv files (or directories holding one), A, B.
      task: str. "malignant" or "benign". Defaults to "malignant".
      level: str. "breast" (the paper's pooling) or "exam". Defaults to "breast".
      n_bootstrap: int. Defaults to 2000.
      seed: int. Bootstrap seed. Defaults to 0.
      confidence: float. Defaults to 0.95.
      output: Optional[str]. JSON file to write. Defaults to None (print only).
      names: Optional tuple of two names. Defaults to names derived from the paths.
    """

    predictions: tuple
    task: str = "malignant"
    level: str = "breast"
    n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP
    seed: int = 0
    confidence: float = metrics_lib.DEFAULT_CONFIDENCE
    output: str | None = None
    names: tuple | None = None

    def __post_init__(self):
        if len(self.predictions) != 2:
            raise ValueError(
                "give exactly two --predictions (A then B). "
                f"Received {len(self.predictions)}: {list(self.predictions)}"
            )
        if self.task not in constants.TASKS:
            raise ValueError(f"task must be one of {constants.TASKS}. Received: {self.task!r}")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}. Received: {self.level!r}")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be >= 1. Received: {self.n_bootstrap}")
        if self.names is not None and len(self.names) != 2:
            raise ValueError(f"give two names (A, B). Received: {list(self.names)}")


def _csv_path(path: str) -> str:
    return os.path.join(path, predictions_io.FILENAME) if os.path.isdir(path) else path


def default_name(path: str) -> str:
    """``eval/t2sub/test/predictions.csv`` -> ``t2sub/test``."""
    parent = os.path.dirname(os.path.abspath(_csv_path(path)))
    return "/".join(parent.split(os.sep)[-2:])


def align(a: predictions_io.Predictions, b: predictions_io.Predictions, path_a: str, path_b: str):
    """Returns ``b`` in ``a``'s exam order after checking both describe the same breasts.

    Raises:
      ValueError: an exam in one file only, a differing patient id, or differing labels; the
        message names the files and the first such exam.
    """
    path_a, path_b = _csv_path(path_a), _csv_path(path_b)
    for one, path_one, other, path_other in ((a, path_a, b, path_b), (b, path_b, a, path_a)):
        in_other = set(other.exam_ids)
        missing = [e for e in one.exam_ids if e not in in_other]
        if missing:
            raise ValueError(
                f"{path_other} lacks exam {missing[0]} of {path_one} ({len(missing)} exam(s) "
                "missing); a paired comparison needs the same exams in both files"
            )
    b = b.reindex(a.exam_ids)
    for i, exam in enumerate(a.exam_ids):
        if a.patient_ids[i] != b.patient_ids[i]:
            raise ValueError(
                f"{path_b}: exam {exam} has another patient id than in {path_a}; "
                "were the two evaluated on the same records?"
            )
        if not np.array_equal(a.labels[i], b.labels[i]):
            differ = [
                label for label, x, y in zip(constants.LABELS, a.labels[i], b.labels[i]) if x != y
            ]
            raise ValueError(
                f"{path_b}: labels of exam {exam} ({', '.join(differ)}) differ from {path_a}; "
                "were the two evaluated on the same records?"
            )
    return b


def compare_predictions(
    a: predictions_io.Predictions,
    b: predictions_io.Predictions,
    task: str = "malignant",
    level: str = "breast",
    n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = metrics_lib.DEFAULT_CONFIDENCE,
) -> dict:
    """AUCs of A and B, B - A with DeLong and a paired patient bootstrap.

    Args:
      a, b: Predictions of the same exams in the same order (see `align`).
      task, level, n_bootstrap, seed, confidence: as in `metrics.auc_with_ci`.

    Returns:
      dict ``task``, ``level``, ``auc_a``/``auc_b`` (`metrics.auc_with_ci` results),
      ``difference`` (B - A), ``delong`` (``se``, ``z``, ``p_value``, ``ci_low``,
      ``ci_high``), ``bootstrap`` (``ci_low``, ``ci_high``, ``p_value``, ``n_bootstrap``,
      ``n_valid_resamples``, ``seed``, ``resample_unit``), ``counts``, ``confidence``.
    """
    if a.exam_ids != b.exam_ids:
        raise ValueError("a and b must list the same exams in the same order (use align()).")
    kwargs = dict(task=task, level=level, n_bootstrap=n_bootstrap, seed=seed)
    paired = metrics_lib.paired_auc_difference(
        a.labels, b.probs, a.probs, a.patient_ids, confidence=confidence, **kwargs
    )  # b - a
    y, _, _ = metrics_lib.level_arrays(a.labels, a.probs, task, level)
    return {
        "task": task,
        "level": level,
        "auc_a": metrics_lib.auc_with_ci(
            a.labels, a.probs, a.patient_ids, confidence=confidence, **kwargs
        ),
        "auc_b": metrics_lib.auc_with_ci(
            b.labels, b.probs, b.patient_ids, confidence=confidence, **kwargs
        ),
        "difference": paired["difference"],
        "delong": {**paired["delong"], "assumes": "independent samples (breasts or exams)"},
        "bootstrap": {
            "ci_low": paired["ci_low"],
            "ci_high": paired["ci_high"],
            "p_value": paired["p_value"],
            "n_bootstrap": int(n_bootstrap),
            "n_valid_resamples": paired["n_valid_resamples"],
            "seed": int(seed),
            "resample_unit": "patient",
        },
        "counts": {
            "exams": len(a),
            "patients": len(set(a.patient_ids)),
            "samples": int(y.size),
            "positives": int(y.sum()),
        },
        "confidence": confidence,
    }


def format_comparison(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Human-readable table of a `compare_predictions` result."""
    level = int(round(100 * result["confidence"]))
    c = result["counts"]
    unit = "breasts" if result["level"] == "breast" else "exams"
    d, dl, bs = result["difference"], result["delong"], result["bootstrap"]

    def signed(v):
        return "n/a" if v is None or np.isnan(v) else f"{v:+.3f}"

    def p(v):
        return "n/a" if v is None or np.isnan(v) else f"{v:.3g}"

    width = max(len(name_a), len(name_b), 5)
    z = "n/a" if np.isnan(dl["z"]) else f"{dl['z']:.2f}"
    lines = [
        f"Paired comparison: {result['level']}-level {result['task']} AUC on {c['exams']} exams "
        f"of {c['patients']} patients ({c['samples']} {unit}, {c['positives']} positive)",
        f"  A  {name_a:<{width}}  {metrics_lib.format_auc(result['auc_a'])}",
        f"  B  {name_b:<{width}}  {metrics_lib.format_auc(result['auc_b'])}",
        f"  B - A {'':<{width - 3}}  {signed(d)}",
        f"    DeLong:            {level}% CI {signed(dl['ci_low'])} to {signed(dl['ci_high'])}, "
        f"z = {z}, p = {p(dl['p_value'])} ({unit} as independent samples)",
        f"    patient bootstrap: {level}% CI {signed(bs['ci_low'])} to {signed(bs['ci_high'])}, "
        f"p = {p(bs['p_value'])} ({bs['n_valid_resamples']} of {bs['n_bootstrap']} resamples "
        "valid)",
    ]
    return "\n".join(lines) + "\n"


def compare(config: CompareConfig) -> dict:
    """Reads both files, checks they match, compares, writes ``config.output``."""
    from mri_keras import evaluate as evaluate_lib
    from tfrecords_tools import fileio

    path_a, path_b = config.predictions
    a = predictions_io.read_predictions(path_a)
    b = align(a, predictions_io.read_predictions(path_b), path_a, path_b)
    names = config.names or (default_name(path_a), default_name(path_b))
    if names[0] == names[1]:
        names = (f"A ({names[0]})", f"B ({names[1]})")
    result = compare_predictions(
        a, b, config.task, config.level, config.n_bootstrap, config.seed, config.confidence
    )
    result = {
        "a": {"name": names[0], "predictions": os.path.abspath(_csv_path(path_a))},
        "b": {"name": names[1], "predictions": os.path.abspath(_csv_path(path_b))},
        **result,
    }
    if config.output:
        if os.path.isdir(config.output):
            raise ValueError(f"--output {config.output!r} is a directory; name a .json file")
        fileio.atomic_write_text(
            config.output, json.dumps(evaluate_lib.json_safe(result), indent=2) + "\n"
        )
    return result


def define_flags():
    """Defines this entry point's flags."""
    from absl import flags

    flags.DEFINE_multi_string(
        "predictions", [], "Two predictions.csv files (or dirs holding one): A, then B."
    )
    flags.DEFINE_enum("task", "malignant", list(constants.TASKS), "Which task's AUC.")
    flags.DEFINE_enum("level", "breast", list(LEVELS), "breast (paper's pooling) or exam.")
    flags.DEFINE_integer("n_bootstrap", metrics_lib.DEFAULT_N_BOOTSTRAP, "Bootstrap resamples.")
    flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
    flags.DEFINE_float("confidence", metrics_lib.DEFAULT_CONFIDENCE, "Confidence level.")
    flags.DEFINE_string("output", None, "JSON file for the result (default: print only).")
    flags.DEFINE_list("names", None, "Names of A and B in the table (default: from the paths).")


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        config = CompareConfig(
            predictions=tuple(f.predictions),
            task=f.task,
            level=f.level,
            n_bootstrap=f.n_bootstrap,
            seed=f.seed,
            confidence=f.confidence,
            output=f.output,
            names=tuple(f.names) if f.names else None,
        )
        result = compare(config)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"mri_keras.compare: error: {e}")
    print(format_comparison(result, result["a"]["name"], result["b"]["name"]), end="")
    if config.output:
        print(f"wrote {config.output}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
