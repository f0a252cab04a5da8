"""Hyper-parameter search: ``python -m mri_keras.tune --flagfile=configs/tune.flags``.

Takes every training flag (``mri_keras/flags.py``; ``--model_dir`` holds the whole sweep) plus
the search flags below. The searched settings and their ranges come from ``--search_space``
(JSON, see ``mri_keras/tune_space.py``). Rerunning the same command resumes the sweep.
Distributed: set ``KERASTUNER_TUNER_ID`` (``chief`` / ``tuner0``, ``tuner1``, ...),
``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT`` (see ``scripts/tune_distributed.sh``).
The work is in ``mri_keras.tune_lib``.
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import os
import sys
from collections.abc import Sequence

from absl import app
from absl import flags as absl_flags

from mri_keras import constants
from mri_keras import flags as flags_lib
from tfrecords_tools import memory


def define_tune_flags(flag_values: absl_flags.FlagValues = absl_flags.FLAGS) -> None:
    """Defines the training flags and the search flags on ``flag_values`` (idempotent)."""
    flags_lib.define_flags(flag_values)
    if "tuner" in flag_values:
        return
    fv = dict(flag_values=flag_values)
    absl_flags.DEFINE_enum(
        "tuner",
        "hyperband",
        list(constants.TUNERS),
        "Search algorithm: hyperband (successive halving over epochs), bayesian (Gaussian "
        "process) or random.",
        **fv,
    )
    absl_flags.DEFINE_integer(
        "max_trials",
        20,
        "Trials in the sweep (a rerun with a larger number extends it). 0 with "
        "--tuner=hyperband runs Hyperband's whole schedule.",
        **fv,
    )
    absl_flags.DEFINE_integer(
        "max_epochs",
        None,
        "Epochs of the longest trial: Hyperband's maximum, every trial's epochs for "
        "random/bayesian. Defaults to --epochs.",
        **fv,
    )
    absl_flags.DEFINE_string(
        "search_space",
        "",
        "JSON file of the searched settings and their ranges (configs/tune_space.json); empty "
        "for the built-in default (the same as that file).",
        **fv,
    )
    absl_flags.DEFINE_integer("hyperband_factor", 3, "Hyperband's reduction factor.", **fv)
    absl_flags.DEFINE_integer(
        "hyperband_iterations", 1, "Hyperband sweeps over all its brackets.", **fv
    )
    absl_flags.DEFINE_integer(
        "num_initial_points",
        0,
        "Bayesian: random trials before the Gaussian process (0: 3 x searched settings).",
        **fv,
    )
    absl_flags.DEFINE_integer("max_retries_per_trial", 0, "Reruns of a trial that crashed.", **fv)
    absl_flags.DEFINE_integer(
        "max_consecutive_failed_trials",
        3,
        "Stop the sweep after this many failed trials in a row.",
        **fv,
    )
    absl_flags.DEFINE_bool(
        "isolate_trials",
        True,
        "Train each trial in a fresh child process, so memory (host and GPU) stays flat over "
        "the sweep and a trial that runs out of memory fails alone. --noisolate_trials trains "
        "in this process (clearing Keras state between trials; saves a TensorFlow start-up "
        "per trial).",
        **fv,
    )
    absl_flags.DEFINE_integer("top_trials", 10, "Trials listed in summary.csv and printed.", **fv)


def _search_space_path(path: str) -> str:
    """``path`` as given, or, when it is relative and not found from the working directory,
    the same path in the installed package or this checkout (``configs/tune.flags`` names
    ``configs/tune_space.json``, so the flagfile works from any directory; a wheel ships
    ``configs/`` inside the package)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    package = os.path.dirname(os.path.abspath(__file__))
    for root in (package, os.path.dirname(package)):
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    return path


def tune_config_from_flags(fv: absl_flags.FlagValues = absl_flags.FLAGS):
    """Converts parsed flags into a ``tune_lib.TuneConfig`` (the only place they are read).

    Raises:
      ValueError: a bad flag value or search space, naming it.
    """
    from mri_keras import (
        tune_lib,  # Deferred: --help stays fast.
        tune_space,
    )

    train = flags_lib.train_config_from_flags(fv)
    return tune_lib.TuneConfig(
        train=train,
        search_space=tune_space.load_search_space(_search_space_path(fv.search_space)),
        tuner=fv.tuner,
        max_trials=fv.max_trials,
        max_epochs=train.epochs if fv.max_epochs is None else fv.max_epochs,
        hyperband_factor=fv.hyperband_factor,
        hyperband_iterations=fv.hyperband_iterations,
        num_initial_points=fv.num_initial_points,
        max_retries_per_trial=fv.max_retries_per_trial,
        max_consecutive_failed_trials=fv.max_consecutive_failed_trials,
        seed=fv.seed,
        overwrite=fv.overwrite,
        top_trials=fv.top_trials,
        verbose=1 if fv.progress else 0,
        isolate_trials=fv.isolate_trials,
    )


def _tune(flag_values):
    from mri_keras import tune_lib, tune_report

    try:
        config = tune_config_from_flags(flag_values)
    except ValueError as e:  # Includes tune_space.SearchSpaceError.
        sys.exit(f"mri_keras.tune: error: {e}")
    try:
        result = tune_lib.run_search(config)
    except ValueError as e:  # A sweep started with other settings; bad data (SetupError).
        sys.exit(f"mri_keras.tune: error: {e}")
    if result.role == "worker":
        print("mri_keras.tune: worker finished: the oracle has no more trials.", flush=True)
        return result
    print(f"\nTop trials ({tune_report.OBJECTIVE}, max):\n{result.table}", flush=True)
    print(f"\nSummary:            {result.summary_path}")
    if result.best_flags_path:
        print(f"Best-trial flags:   {result.best_flags_path}")
        print(f"Retrain the best:   python -m mri_keras.train --flagfile={result.best_flags_path}")
    return result


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected command-line arguments: {list(argv[1:])}")
    memory.tune_malloc()  # Reuse freed exam-sized blocks (tfrecords_tools.memory).
    _tune(absl_flags.FLAGS)


def run(argv: Sequence[str]):
    """Parses ``argv`` (flags and ``--flagfile``s, without the program name) into fresh flag
    values and runs the sweep; returns the ``tune_report.SweepResult``.

    For in-process use (tests, notebooks): the global ``absl.flags.FLAGS`` is not touched.
    Exits (``SystemExit``) on bad flags or settings, with the command line's message.
    """
    fv = flags_lib.parse_in_process("mri_keras.tune", define_tune_flags, argv)
    return _tune(fv)


def entry(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    define_tune_flags()
    absl_flags.adopt_module_key_flags(flags_lib)  # --help lists the training flags too.
    try:  # Nested flagfiles resolve from any working directory (flags_lib.expand_flagfiles).
        argv = flags_lib.expand_flagfiles(sys.argv if argv is None else argv)
    except absl_flags.Error as e:
        sys.exit(f"mri_keras.tune: error: {e}")
    app.run(main, argv=argv)


if __name__ == "__main__":
    entry()
