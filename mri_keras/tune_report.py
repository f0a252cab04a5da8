"""What a hyper-parameter sweep found: trial results, ``summary.csv``, ``best_trial.flags``.

Reads the finished trials of a keras-tuner sweep (``mri_keras.tune_lib``) and writes, in the
sweep directory::

    summary.csv                   the top trials: hyper-parameters, val AUC, epochs
    best_trial.flags              the best trial as a flagfile for ``mri_keras.train``

The flagfile is written from the training flags' own table (``mri_keras.flags.TRAIN_FLAGS``)
and checked to rebuild the trial's config before it is written.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mri_keras import flags as flags_lib
from mri_keras import tune_space
from tfrecords_tools import fileio

# The sweep's objective: training's model-selection metric (breast-level malignant AUC).
OBJECTIVE = "val_malignant_auc"
TRIAL_MODEL_DIR = "model"
SUMMARY_NAME = "summary.csv"
BEST_FLAGS_NAME = "best_trial.flags"


def trial_model_dir(sweep_dir: str, trial_id: str) -> str:
    """The training run directory of one trial."""
    return os.path.join(sweep_dir, f"trial_{trial_id}", TRIAL_MODEL_DIR)


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """One finished trial as the summary shows it."""

    trial_id: str
    status: str
    values: Mapping[str, Any]  # {setting: config value} of the searched settings.
    metrics: Mapping[str, float]
    continued_from: str | None
    model_dir: str


def trial_results(tuner, search_space: tune_space.SearchSpace) -> list[TrialResult]:
    """Every trial of the sweep, completed ones first, best first."""
    oracle = tuner.oracle
    completed, other = [], []
    for trial in oracle.trials.values():
        metrics = {}
        for name in (OBJECTIVE, "val_benign_auc", "best_epoch", "epochs"):
            if trial.metrics.exists(name):
                metrics[name] = trial.metrics.get_last_value(name)
        result = TrialResult(
            trial_id=trial.trial_id,
            status=str(trial.status),
            values=search_space.decode_values(trial.hyperparameters.values),
            metrics=metrics,
            continued_from=trial.hyperparameters.values.get("tuner/trial_id"),
            model_dir=trial_model_dir(tuner.project_dir, trial.trial_id),
        )
        done = str(trial.status) == "COMPLETED" and OBJECTIVE in metrics
        (completed if done else other).append(result)
    completed.sort(key=lambda r: (-r.metrics[OBJECTIVE], r.trial_id))
    other.sort(key=lambda r: r.trial_id)
    return completed + other


def _format_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def summary_rows(results: Sequence[TrialResult], names: Sequence[str], top: int) -> list[dict]:
    """CSV rows of the top completed trials."""
    rows = []
    for rank, r in enumerate(
        [r for r in results if r.status == "COMPLETED" and OBJECTIVE in r.metrics][:top], 1
    ):
        row = {
            "rank": rank,
            "trial_id": r.trial_id,
            OBJECTIVE: f"{r.metrics[OBJECTIVE]:.6f}",
            "val_benign_auc": f"{r.metrics.get('val_benign_auc', float('nan')):.6f}",
            "best_epoch": int(r.metrics.get("best_epoch", 0)),
            "epochs": int(r.metrics.get("epochs", 0)),
        }
        row.update({name: _format_value(r.values.get(name)) for name in names})
        row["continued_from"] = r.continued_from or ""
        row["model_dir"] = r.model_dir
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of summary rows (without the model_dir column)."""
    if not rows:
        return "No completed trials yet."
    columns = [c for c in rows[0] if c != "model_dir"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def write_summary_csv(path: str, rows: Sequence[dict], names: Sequence[str]) -> None:
    columns = (
        ["rank", "trial_id", OBJECTIVE, "val_benign_auc", "best_epoch", "epochs"]
        + list(names)
        + ["continued_from", "model_dir"]
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fileio.atomic_write_text(path, buf.getvalue())


def best_trial_config(results: Sequence[TrialResult], base_config, model_dir: str):
    """The TrainConfig that retrains the best trial in ``model_dir``, and that trial."""
    best = next((r for r in results if r.status == "COMPLETED" and OBJECTIVE in r.metrics), None)
    if best is None:
        return None, None
    config = tune_space.apply_values(base_config, best.values)
    epochs = int(best.metrics.get("epochs") or base_config.epochs)
    config = dataclasses.replace(config, model_dir=model_dir, epochs=epochs, overwrite=False)
    return config, best


def write_best_flagfile(path: str, config, best: TrialResult, sweep_dir: str) -> None:
    """Writes ``config`` as a flagfile for ``python -m mri_keras.train --flagfile=path``.

    Raises:
      RuntimeError: the flagfile would not rebuild ``config`` (a flag out of step with
        ``mri_keras.flags``).
    """
    lines = flags_lib.train_flag_lines(config)
    rebuilt = flags_lib.train_config_from_flag_lines(lines)
    if config.verbose < 1:  # Display only, and not expressible as a flag.
        config = dataclasses.replace(config, verbose=rebuilt.verbose)
    if rebuilt != config:
        diff = {
            f.name: (getattr(config, f.name), getattr(rebuilt, f.name))
            for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(rebuilt, f.name)
        }
        raise RuntimeError(f"best_trial.flags would not rebuild the trial's config: {diff}")
    m = best.metrics
    header = [
        f"# Best trial of the sweep in {sweep_dir}: trial {best.trial_id}, "
        f"{OBJECTIVE}={m[OBJECTIVE]:.6f} at epoch {int(m.get('best_epoch', 0))} of "
        f"{int(m.get('epochs', 0))}.",
        f"# The trial's own run (best.keras, export/): {best.model_dir}",
        "# Retrain it with: python -m mri_keras.train --flagfile=" + path,
    ]
    fileio.atomic_write_text(path, "\n".join(header + lines) + "\n")


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What a search produced (for the chief/local process; workers get ``rows=[]``)."""

    role: str
    results: Sequence[TrialResult]
    rows: Sequence[dict]
    table: str
    summary_path: str | None
    best_flags_path: str | None


def summarize(tuner, config, role: str) -> SweepResult:
    """Writes ``summary.csv`` and ``best_trial.flags`` for the sweep so far.

    Args:
      tuner: the sweep's keras-tuner Tuner.
      config: tune_lib.TuneConfig. Its search space, top_trials and base training config.
      role: str. This process's role ("local" or "chief").
    """
    sweep_dir = tuner.project_dir
    names = config.search_space.names
    results = trial_results(tuner, config.search_space)
    rows = summary_rows(results, names, config.top_trials)
    summary_path = os.path.join(sweep_dir, SUMMARY_NAME)
    write_summary_csv(summary_path, rows, names)
    best_config, best = best_trial_config(
        results, config.train, os.path.join(sweep_dir, "best_trial")
    )
    flags_path = None
    if best is not None:
        flags_path = os.path.join(sweep_dir, BEST_FLAGS_NAME)
        write_best_flagfile(flags_path, best_config, best, sweep_dir)
    return SweepResult(role, results, rows, format_table(rows), summary_path, flags_path)
