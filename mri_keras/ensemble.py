"""Ensembles of evaluated models: plain averaging and Caruana et al.'s ensemble selection.

Inputs are the outputs of `mri_keras.evaluate` (``predictions.csv`` per model and split).
Either give ``--eval_dirs=A,B,...`` where each directory holds ``val/`` and ``test/``
evaluation outputs (the layout ``scripts/table1.sh`` writes), or give the two lists
explicitly with ``--val_predictions`` and ``--test_predictions`` (files or directories, one
per model, same order).

- ``--method=mean``: the unweighted mean of all members' probabilities (validation is optional
  and only reported).
- ``--method=caruana``: greedy forward selection *with replacement* on the validation split
  (Caruana, Niculescu-Mizil, Crew & Ksikes, ICML 2004): starting from an empty ensemble, each
  step adds the member (possibly again) whose addition gives the best validation metric of the
  averaged probabilities; after ``--caruana_iterations`` steps the ensemble of the best-scoring
  step (the earliest on ties) is kept. Members then carry weight count/total, and those weights
  are applied to the test predictions, which selection never sees.

Writes ``OUTPUT/test/`` (and ``OUTPUT/val/`` when validation predictions were given) in the
evaluate layout (``predictions.csv``, ``metrics.json``, ``roc.png``; ``metrics.json`` gains an
``ensemble`` section), plus ``OUTPUT/ensemble.json``: method, members, how often each was
chosen, weights, the selection trace, and ``test_vs_members``: the ensemble's AUC minus each
member's on test with a paired patient-bootstrap CI and p-value. An ensemble output
directory is itself a valid ``--eval_dirs`` entry.
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from mri_keras import evaluate as evaluate_lib
from mri_keras import metrics as metrics_lib
from mri_keras import predictions_io
from tfrecords_tools import fileio

METHODS = ("mean", "caruana")
SELECTION_METRICS = ("malignant", "benign", "mean")
ENSEMBLE_FILENAME = "ensemble.json"


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    """What `run_ensemble` builds.

    Attributes:
      test_predictions: tuple of str. Per member: predictions.csv (or its directory) on test.
      val_predictions: tuple of str. Per member, same order, on validation; required for
        "caruana". May be empty for "mean".
      names: tuple of str. Member names (same order). Defaults to names derived from paths.
      method: str. "mean" or "caruana". Defaults to "mean".
      output_dir: str. Where the outputs go.
      caruana_iterations: int. Selection steps. Defaults to 50.
      selection_metric: str. Validation metric maximised by selection: breast-level
        "malignant" AUC, "benign" AUC, or the "mean" of both. Defaults to "malignant" (the
        paper's model-selection metric).
      n_bootstrap: int. Bootstrap resamples for the CIs. Defaults to 2000.
      seed: int. Bootstrap seed. Defaults to 0.
    """

    test_predictions: tuple[str, ...]
    output_dir: str
    val_predictions: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    method: str = "mean"
    caruana_iterations: int = 50
    selection_metric: str = "malignant"
    n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}. Received: method={self.method!r}")
        if self.selection_metric not in SELECTION_METRICS:
            raise ValueError(
                f"selection_metric must be one of {SELECTION_METRICS}. "
                f"Received: {self.selection_metric!r}"
            )
        if not self.test_predictions:
            raise ValueError("At least one member's test predictions are needed.")
        if self.val_predictions and len(self.val_predictions) != len(self.test_predictions):
            raise ValueError(
                f"val_predictions ({len(self.val_predictions)}) and test_predictions "
                f"({len(self.test_predictions)}) must list the same members in the same order."
            )
        if self.method == "caruana" and not self.val_predictions:
            raise ValueError("method='caruana' selects on validation predictions; give them.")
        if self.names and len(self.names) != len(self.test_predictions):
            raise ValueError(
                f"names ({len(self.names)}) must match the members ({len(self.test_predictions)})."
            )
        if self.names and len(set(self.names)) != len(self.names):
            raise ValueError(f"Member names must be unique. Received: {self.names}")
        if self.caruana_iterations < 1:
            raise ValueError(
                f"caruana_iterations must be >= 1. Received: {self.caruana_iterations}"
            )


def member_name(path: str) -> str:
    """A readable member name from a predictions path (``runs/t2sub/test`` -> ``t2sub``)."""
    path = os.path.abspath(path)
    if os.path.basename(path) == predictions_io.FILENAME:
        path = os.path.dirname(path)
    if os.path.basename(path) in ("val", "test", "train"):
        path = os.path.dirname(path)
    return os.path.basename(path)


def align(members: Sequence[predictions_io.Predictions], names: Sequence[str]):
    """Reorders every member to the first member's exams; checks they agree.

    Returns:
      (exam_ids, patient_ids, labels (N,4), probs (M, N, 4)).

    Raises:
      ValueError: members cover different exams or disagree on labels or patients.
    """
    ref = members[0]
    stacked = []
    for name, member in zip(names, members):
        if set(member.exam_ids) != set(ref.exam_ids):
            extra = sorted(set(member.exam_ids) - set(ref.exam_ids))[:3]
            lacking = sorted(set(ref.exam_ids) - set(member.exam_ids))[:3]
            raise ValueError(
                f"Member {name!r} covers other exams than {names[0]!r} "
                f"({len(member)} vs {len(ref)} exams; e.g. only in {name!r}: {extra}, "
                f"missing from {name!r}: {lacking}). Evaluate all members on the same records."
            )
        member = member.reindex(ref.exam_ids)
        if not np.array_equal(member.labels, ref.labels):
            bad = int(np.argmax(np.any(member.labels != ref.labels, axis=1)))
            raise ValueError(
                f"Member {name!r} disagrees with {names[0]!r} on the labels of exam "
                f"{ref.exam_ids[bad]}."
            )
        if member.patient_ids != ref.patient_ids:
            raise ValueError(f"Member {name!r} disagrees with {names[0]!r} on patient ids.")
        stacked.append(member.probs)
    return ref.exam_ids, ref.patient_ids, ref.labels, np.stack(stacked)


def selection_score(labels, probs, selection_metric: str = "malignant") -> float:
    """The validation metric Caruana selection maximises (NaN counts as -inf)."""
    if selection_metric == "mean":
        values = [metrics_lib.breast_level_auc(labels, probs, t) for t in ("malignant", "benign")]
        return float(np.mean(values))
    return metrics_lib.breast_level_auc(labels, probs, selection_metric)


def caruana_select(member_probs, labels, iterations: int = 50, selection_metric: str = "malignant"):
    """Greedy forward ensemble selection with replacement (Caruana et al., 2004).

    Args:
      member_probs: array (M, N, 4). Validation probabilities of M members.
      labels: array (N, 4). Validation labels.
      iterations: int. Selection steps (members added, counting repeats).
      selection_metric: str. See `selection_score`.

    Returns:
      (counts, trace): int array (M,) of how often each member is in the kept ensemble (the
      best-scoring step, earliest on ties), and the list of validation scores after each step.
      Ties between members at a step go to the lowest index.
    """
    member_probs = np.asarray(member_probs, np.float64)
    num_members = member_probs.shape[0]
    total = np.zeros(member_probs.shape[1:], np.float64)
    counts = np.zeros(num_members, np.int64)
    best_counts, best_score = None, -np.inf
    trace = []
    for step in range(1, iterations + 1):
        scores = np.array(
            [
                selection_score(labels, (total + member_probs[m]) / step, selection_metric)
                for m in range(num_members)
            ]
        )
        scores = np.where(np.isnan(scores), -np.inf, scores)
        chosen = int(np.argmax(scores))
        counts[chosen] += 1
        total += member_probs[chosen]
        trace.append(float(scores[chosen]))
        if scores[chosen] > best_score + 1e-12 or best_counts is None:
            best_score, best_counts = scores[chosen], counts.copy()
    return best_counts, trace


def combine(member_probs, weights) -> np.ndarray:
    """Weighted mean of member probabilities: (M, N, 4), (M,) -> (N, 4)."""
    weights = np.asarray(weights, np.float64)
    if weights.sum() <= 0:
        raise ValueError("Ensemble weights sum to zero.")
    return np.tensordot(weights / weights.sum(), np.asarray(member_probs, np.float64), axes=1)


def _load(paths, names):
    members = [predictions_io.read_predictions(p) for p in paths]
    return align(members, names)


def run_ensemble(config: EnsembleConfig) -> dict:
    """Builds the ensemble and writes its reports; returns the ensemble description."""
    evaluate_lib.check_output_dir(config.output_dir)
    names = tuple(config.names) or tuple(member_name(p) for p in config.test_predictions)
    if len(set(names)) != len(names):
        names = tuple(f"{i}:{n}" for i, n in enumerate(names))
    test = _load(config.test_predictions, names)
    val = _load(config.val_predictions, names) if config.val_predictions else None
    trace = []
    if config.method == "mean":
        counts = np.ones(len(names), np.int64)
    else:
        counts, trace = caruana_select(
            val[3], val[2], config.caruana_iterations, config.selection_metric
        )
    weights = counts / counts.sum()
    description = {
        "method": config.method,
        "members": list(names),
        "member_predictions": {
            "test": [os.path.abspath(p) for p in config.test_predictions],
            "val": [os.path.abspath(p) for p in config.val_predictions],
        },
        "chosen": {n: int(c) for n, c in zip(names, counts)},
        "weights": {n: float(w) for n, w in zip(names, weights)},
    }
    if config.method == "caruana":
        description.update(
            {
                "selection_split": "val",
                "selection_metric": f"breast-level {config.selection_metric} AUC",
                "iterations": config.caruana_iterations,
                "kept_step": int(counts.sum()),
                "selection_trace": trace,
            }
        )
    os.makedirs(config.output_dir, exist_ok=True)
    splits = [("test", test)] + ([("val", val)] if val is not None else [])
    for split, (exam_ids, patient_ids, labels, probs) in splits:
        predictions = predictions_io.Predictions(
            exam_ids, patient_ids, labels, combine(probs, weights)
        )
        summary = evaluate_lib.summarize(predictions, config.n_bootstrap, config.seed)
        name = f"{config.method} ensemble"
        summary = {"name": name, "split": split, **summary, "ensemble": description}
        if split == "val" and config.method == "caruana":
            summary["note"] = "In-sample: the ensemble was selected on these predictions."
        evaluate_lib.write_report(
            os.path.join(config.output_dir, split),
            predictions,
            summary,
            title=f"{name} of {len(names)} ({split})",
        )
        description[f"{split}_breast_level"] = {
            t: summary["breast_level"][t] for t in ("malignant", "benign")
        }
    # Paired patient-bootstrap comparison of the ensemble with each member on test: does it
    # really beat them, given that all share the same exams?
    exam_ids, patient_ids, labels, probs = test
    ensemble_probs = combine(probs, weights)
    description["test_vs_members"] = {
        name: {
            task: metrics_lib.paired_auc_difference(
                labels,
                ensemble_probs,
                probs[m],
                patient_ids,
                task=task,
                n_bootstrap=config.n_bootstrap,
                seed=config.seed,
            )
            for task in ("malignant", "benign")
        }
        for m, name in enumerate(names)
    }
    if val is not None:
        # "Better than its best member" needs the best member chosen without looking at test:
        # the member with the highest validation breast-level malignant AUC.
        val_aucs = [
            metrics_lib.breast_level_auc(val[2], val[3][m], "malignant") for m in range(len(names))
        ]
        finite = [(a, i) for i, a in enumerate(val_aucs) if not np.isnan(a)]
        if finite:
            best = names[max(finite)[1]]
            description["best_member_on_val"] = best
            description["test_vs_best_member"] = {
                "member": best,
                **description["test_vs_members"][best]["malignant"],
            }
    fileio.atomic_write_text(
        os.path.join(config.output_dir, ENSEMBLE_FILENAME),
        json.dumps(evaluate_lib.json_safe(description), indent=2) + "\n",
    )
    return description


def define_flags():
    """Defines this entry point's flags."""
    from absl import flags

    flags.DEFINE_list("eval_dirs", [], "Evaluation dirs, each with val/ and test/ subdirs.")
    flags.DEFINE_list("val_predictions", [], "Per member: validation predictions.csv or dir.")
    flags.DEFINE_list("test_predictions", [], "Per member: test predictions.csv or dir.")
    flags.DEFINE_list("names", [], "Member names (default: from the paths).")
    flags.DEFINE_enum("method", "mean", list(METHODS), "mean or caruana.")
    flags.DEFINE_string("output_dir", None, "Output directory.")
    flags.DEFINE_integer("caruana_iterations", 50, "Caruana selection steps.")
    flags.DEFINE_enum(
        "selection_metric",
        "malignant",
        list(SELECTION_METRICS),
        "Validation metric Caruana selection maximises.",
    )
    flags.DEFINE_integer("n_bootstrap", metrics_lib.DEFAULT_N_BOOTSTRAP, "Bootstrap resamples.")
    flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
    flags.mark_flag_as_required("output_dir")


def config_from_flags(f) -> EnsembleConfig:
    """Builds the config from parsed flags (``--eval_dirs`` or the explicit lists)."""
    from absl import app

    if f.eval_dirs and (f.val_predictions or f.test_predictions):
        raise app.UsageError("Give either --eval_dirs or --val_predictions/--test_predictions.")
    if f.eval_dirs:
        test = tuple(os.path.join(d, "test") for d in f.eval_dirs)
        val = tuple(os.path.join(d, "val") for d in f.eval_dirs)
        if f.method == "mean" and not all(os.path.isdir(v) for v in val):
            val = ()
        names = tuple(f.names) or tuple(os.path.basename(d.rstrip("/")) for d in f.eval_dirs)
    else:
        test, val, names = tuple(f.test_predictions), tuple(f.val_predictions), tuple(f.names)
    if not test:
        raise app.UsageError("No members: give --eval_dirs or --test_predictions.")
    return EnsembleConfig(
        test_predictions=test,
        val_predictions=val,
        names=names,
        method=f.method,
        output_dir=f.output_dir,
        caruana_iterations=f.caruana_iterations,
        selection_metric=f.selection_metric,
        n_bootstrap=f.n_bootstrap,
        seed=f.seed,
    )


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:  # Missing predictions, members over different exams...: a message, not a traceback.
        config = config_from_flags(flags.FLAGS)
        description = run_ensemble(config)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"mri_keras.ensemble: error: {e}")
    chosen = ", ".join(f"{n} x{c}" for n, c in description["chosen"].items() if c)
    print(f"{config.method} ensemble: {chosen}")
    for task in ("malignant", "benign"):
        print(
            f"test breast-level {task} AUC: "
            f"{metrics_lib.format_auc(description['test_breast_level'][task])}"
        )
    print(f"wrote {config.output_dir}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
