"""Hyper-parameter search over the training config with keras-tuner.

Every trial is an ordinary training run: ``DoublyDeepHyperModel.build(hp)`` maps the trial's
hyper-parameters onto the ``train_lib.TrainConfig`` the training flags give (no second model
definition), and ``DoublyDeepHyperModel.fit`` calls ``train_lib.train`` on it in the trial's
own directory and reports the best validation breast-level malignant AUC, computed exactly as
training computes it for model selection.

Layout of a sweep directory (``TuneConfig.train.model_dir``)::

    oracle.json, tuner0.json      keras-tuner state (a rerun resumes from it)
    sweep.json                    tuner, search space and fixed settings of the sweep
    trial_<id>/trial.json         keras-tuner's record of the trial
    trial_<id>/model/             the trial's training run (train_lib's model_dir layout)
    trial_<id>/runs.jsonl         one line per run of the trial (tuner id, host, pid, times)
    summary.csv                   the top trials: hyper-parameters, val AUC, epochs
    best_trial.flags              the best trial as a flagfile for ``mri_keras.train``

(the last two written by ``mri_keras.tune_report``, which reads the sweep's results).

Distributed search uses keras-tuner's chief/worker mode: the process whose
``KERASTUNER_TUNER_ID`` contains "chief" runs the oracle behind a gRPC server at
``KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT``; every other process with those variables
set is a worker that asks it for trials. All of them must see the same sweep directory.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import json
import math
import multiprocessing
import os
import shutil
import socket
from collections.abc import Mapping
from concurrent import futures
from typing import Any

import keras
import keras_tuner as kt
from absl import logging

from mri_keras import constants, train_data, train_lib, tune_report, tune_space, validation
from mri_keras import run_dir as run_dir_lib
from tfrecords_tools import fileio, memory, schema

RUNS_LOG = "runs.jsonl"
SWEEP_RECORD_NAME = "sweep.json"
# Settings a resumed sweep must share with the run that started it (others, e.g. the strategy
# or the number of trials, may change between runs).
_RESUME_KEYS = (
    "tuner",
    "search_space",
    "max_epochs",
    "hyperband_factor",
    "hyperband_iterations",
    "fixed_training_settings",
)
# TrainConfig fields that say how or where a run trains, not what it trains.
_RUNTIME_FIELDS = (
    "model_dir",
    "strategy",
    "cpu_replicas",
    "jit_compile",
    "overwrite",
    "verbose",
    "epochs",
)


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """A hyper-parameter sweep.

    Attributes:
      train: train_lib.TrainConfig. The settings every trial starts from (the training flags);
        its ``model_dir`` is the sweep directory. Searched settings are replaced per trial.
      search_space: tune_space.SearchSpace. What is searched and how.
      tuner: str. "hyperband", "bayesian" or "random". Defaults to "hyperband".
      max_trials: int. Trials in the sweep; 0 lets Hyperband run its full schedule (random and
        Bayesian search need a positive number). Defaults to 20.
      max_epochs: int. Epochs of the longest trial: Hyperband's max_epochs, and the epochs of
        every random/Bayesian trial. Defaults to 10.
      hyperband_factor: int. Hyperband's reduction factor. Defaults to 3.
      hyperband_iterations: int. Hyperband sweeps over all brackets. Defaults to 1.
      num_initial_points: int. Random trials before Bayesian optimisation models the objective;
        0 uses keras-tuner's default (3 x the number of hyper-parameters). Defaults to 0.
      max_retries_per_trial: int. Reruns of a crashed trial. Defaults to 0.
      max_consecutive_failed_trials: int. The sweep stops after this many failed trials in a
        row. Defaults to 3.
      seed: int. Seed of the search (keras-tuner seeds its oracle with ``seed + 1`` because it
        treats 0 as "pick one at random"). Defaults to 0.
      overwrite: bool. Delete the sweep in the directory and start over instead of resuming
        (only a local or chief process may). Defaults to False.
      top_trials: int. Rows of the summary. Defaults to 10.
      verbose: int. keras-tuner's per-trial display (0 silent). Defaults to 1.
      isolate_trials: bool. Train each trial in a fresh child process: the sweep's memory
        (host and GPU) stays flat however many trials run, a trial killed by the OS (out of
        memory) only fails that trial, and every trial can set up its own devices (e.g.
        cpu_replicas). Costs a TensorFlow start-up per trial; trial callbacks must then be
        picklable, and a script calling ``run_search`` must guard its top level with
        ``if __name__ == "__main__":`` (children are spawned and import the main module).
        Defaults to False (in-process: Keras state is cleared between trials).
    """

    train: Any
    search_space: tune_space.SearchSpace
    tuner: str = "hyperband"
    max_trials: int = 20
    max_epochs: int = 10
    hyperband_factor: int = 3
    hyperband_iterations: int = 1
    num_initial_points: int = 0
    max_retries_per_trial: int = 0
    max_consecutive_failed_trials: int = 3
    seed: int = 0
    overwrite: bool = False
    top_trials: int = 10
    verbose: int = 1
    isolate_trials: bool = False

    def __post_init__(self):
        if self.tuner not in constants.TUNERS:
            raise ValueError(
                f"tuner must be one of {constants.TUNERS}. Received: tuner={self.tuner!r}"
            )
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1. Received: max_epochs={self.max_epochs}")
        if self.max_trials < 0 or (self.max_trials == 0 and self.tuner != "hyperband"):
            raise ValueError(
                f"max_trials must be >= 1 for tuner={self.tuner!r} (0, meaning Hyperband's own "
                f"schedule, only works with hyperband). Received: max_trials={self.max_trials}"
            )
        if self.hyperband_factor < 2:
            raise ValueError(
                f"hyperband_factor must be >= 2. Received: hyperband_factor={self.hyperband_factor}"
            )
        if self.hyperband_iterations < 1:
            raise ValueError(
                "hyperband_iterations must be >= 1. "
                f"Received: hyperband_iterations={self.hyperband_iterations}"
            )
        for name, minimum in (
            ("num_initial_points", 0),
            ("max_retries_per_trial", 0),
            ("max_consecutive_failed_trials", 1),
        ):
            if getattr(self, name) < minimum:
                raise ValueError(
                    f"{name} must be >= {minimum}. Received: {name}={getattr(self, name)}"
                )
        if self.top_trials < 1:
            raise ValueError(f"top_trials must be >= 1. Received: top_trials={self.top_trials}")
        if not self.train.model_dir:
            raise ValueError("The sweep needs a model_dir (the directory holding every trial).")


# --------------------------------------------------------------------------------------------
# Distributed roles.


def tuner_role() -> str:
    """ "local", "chief" or "worker", from keras-tuner's ``KERASTUNER_*`` environment variables.

    Raises:
      ValueError: ``KERASTUNER_ORACLE_IP`` is set without the port or the tuner id.
    """
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "local"
    required = ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID")
    missing = [v for v in required if not os.environ.get(v)]
    if missing:
        raise ValueError(
            f"Distributed tuning: KERASTUNER_ORACLE_IP is set but {missing} are not. Set "
            "KERASTUNER_TUNER_ID=chief on the oracle process and a unique id (e.g. tuner0) on "
            "every worker, and the same KERASTUNER_ORACLE_IP/KERASTUNER_ORACLE_PORT on all."
        )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def release_memory() -> None:
    """Drops Keras' global state and collects garbage (between trials)."""
    # Validation caches one prediction tf.function per model; without this every trial's
    # model stayed alive (measured: one model per trial). No trial is running here, so
    # nothing uses the cache.
    validation.clear_predict_cache()
    keras.backend.clear_session()
    gc.collect()


# --------------------------------------------------------------------------------------------
# HyperModel and tuners.


def metrics_from_history(history: Mapping[str, Any]) -> dict:
    """The values a trial reports, from ``train_lib.train``'s history.

    Args:
      history: dict. Per-epoch lists (``val_malignant_auc``, ``val_benign_auc``, ...) over
        every epoch of the run (including epochs of a resumed run) and ``best_epoch``.

    Returns:
      {"val_malignant_auc": best value, "val_benign_auc": its value at that epoch,
       "best_epoch": 1-based epoch, "epochs": epochs trained}.

    Raises:
      keras_tuner.errors.FatalValueError: the validation AUC was never defined (a validation
        split without both malignant and non-malignant breasts), which no trial can fix.
    """
    aucs = [float(v) for v in history.get(tune_report.OBJECTIVE, [])]
    finite = [(v, i) for i, v in enumerate(aucs) if math.isfinite(v)]
    if not finite:
        raise kt.errors.FatalValueError(
            f"Training reported no finite {tune_report.OBJECTIVE} (per epoch: {aucs}). The "
            "validation split needs breasts with and without malignancy for the AUC to exist; "
            "check the converter's manifest.json label_counts for 'val'."
        )
    # Training's own model selection (first epoch of the highest AUC) when it reports it.
    best_index = int(history.get("best_epoch") or 0) - 1
    if not (0 <= best_index < len(aucs) and math.isfinite(aucs[best_index])):
        best_index = max(finite, key=lambda t: (t[0], -t[1]))[1]
    best_value = aucs[best_index]
    benign = list(history.get("val_benign_auc", []))
    return {
        tune_report.OBJECTIVE: best_value,
        "val_benign_auc": float(benign[best_index]) if best_index < len(benign) else float("nan"),
        "best_epoch": best_index + 1,
        "epochs": len(aucs),
    }


class DoublyDeepHyperModel(kt.HyperModel):
    """Maps hyper-parameters onto the training config; trains with ``train_lib.train``.

    ``build(hp)`` returns the trial's ``TrainConfig`` (not a Keras model: the training code
    builds the model itself, inside its distribution strategy), so building the search space
    costs nothing. The tuners of this module pass that config to ``fit``.

    Args:
      base_config: train_lib.TrainConfig. Settings every trial starts from.
      search_space: tune_space.SearchSpace. The searched settings.
      isolate_trials: bool. Train in a fresh child process per trial (see
        ``TuneConfig.isolate_trials``). Defaults to False.
    """

    def __init__(
        self, base_config, search_space: tune_space.SearchSpace, *, isolate_trials: bool = False
    ):
        super().__init__(name="doubly_deep_cnn", tunable=True)
        self.base_config = base_config
        self.search_space = search_space
        self.isolate_trials = isolate_trials

    def build(self, hp):
        return tune_space.apply_values(self.base_config, self.search_space.declare(hp))

    def fit(
        self,
        hp,
        model,
        *,
        trial_dir,
        epochs,
        warm_start_dir=None,
        callbacks=None,
        tuner_id="tuner0",
        **kwargs,
    ):
        """Trains one trial.

        Args:
          hp: keras_tuner.HyperParameters. The trial's values (already applied to ``model``).
          model: train_lib.TrainConfig. What ``build(hp)`` returned.
          trial_dir: str. The trial's directory; training writes ``trial_dir/model``.
          epochs: int. Total epochs of this trial.
          warm_start_dir: str or None. A finished trial's run directory to continue from
            (Hyperband's later rounds); copied into this trial's run directory, whose training
            then resumes from the copied checkpoint. Ignored with a cosine learning-rate
            schedule (its run length is part of the recipe). Defaults to None.
          callbacks: list of keras Callbacks driven by the training loop. Defaults to None.
          tuner_id: str. Recorded in the trial's run log. Defaults to "tuner0".
          **kwargs: ignored (keras-tuner passes the arguments of ``search``).

        Returns:
          metrics_from_history(...) of the run.
        """
        del hp, kwargs
        run_dir = os.path.join(trial_dir, tune_report.TRIAL_MODEL_DIR)
        if model.lr_schedule == "cosine":
            # A cosine schedule spans its run: a 3-epoch run's rate has decayed to 0 where a
            # 9-epoch run's is still high, so Hyperband's later rounds train from the start.
            warm_start_dir = None
        if warm_start_dir and not os.path.exists(run_dir):
            # Copy first, rename after: a crash mid-copy leaves no half run to resume from.
            partial = run_dir + ".copying"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(warm_start_dir, partial)
            _retarget_run(partial, run_dir)
            os.replace(partial, run_dir)
        config = dataclasses.replace(model, model_dir=run_dir, epochs=int(epochs), overwrite=False)
        entry = {
            "tuner_id": tuner_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "epochs": int(epochs),
            "warm_start_dir": warm_start_dir,
            "start": _now(),
        }
        try:
            if self.isolate_trials:
                history = _train_in_child_process(config, list(callbacks or []))
            else:
                history = train_lib.train(config, extra_callbacks=list(callbacks or []))
            results = metrics_from_history(history)
        except BaseException as e:
            logging.exception("Trial in %s failed.", trial_dir)
            _append_jsonl(
                os.path.join(trial_dir, RUNS_LOG),
                dict(entry, end=_now(), status=f"error: {type(e).__name__}: {e}"),
            )
            raise
        _append_jsonl(
            os.path.join(trial_dir, RUNS_LOG),
            dict(entry, end=_now(), status="completed", **results),
        )
        return results


def _train_in_child_process(config, callbacks) -> dict:
    """``train_lib.train`` in a fresh (spawned, not forked) Python process; its history.

    Spawned, because a forked child would inherit the parent's TensorFlow runtime threads.
    Exceptions come back with the child's traceback; a child killed by the OS raises
    ``BrokenProcessPool``. Either way the trial fails and the sweep goes on.
    """
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_train_child, config, callbacks).result()


def _train_child(config, callbacks) -> dict:
    memory.tune_malloc()  # A spawned child starts with glibc's defaults.
    history = train_lib.train(config, extra_callbacks=callbacks)
    # Plain values only: the history travels back pickled.
    return json.loads(json.dumps(history, default=str))


def _retarget_run(copy_dir: str, run_dir: str) -> None:
    """Points a copied run's config.json at its new directory so training resumes it.

    ``train_lib`` refuses to resume a run whose recorded settings differ from the current ones,
    and the run directory is one of them.
    """
    path = os.path.join(copy_dir, run_dir_lib.CONFIG_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        saved["model_dir"] = run_dir
        fileio.atomic_write_text(path, json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class _TrainLibTrials:
    """Tuner mixin: a trial is a ``train_lib.train`` run, not keras-tuner's ``Model.fit``.

    keras-tuner's ``Tuner.run_trial`` expects ``build`` to return a compiled Keras model and
    adds callbacks that save its weights; training here owns its model, strategy, checkpoints
    and best model, so this replaces ``run_trial`` (and reads Hyperband's ``tuner/epochs`` and
    ``tuner/trial_id`` itself) and ``load_model``.
    """

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        epochs = int(hp.values.get("tuner/epochs", kwargs.pop("epochs", 1)))
        kwargs.pop("epochs", None)
        warm_start_dir = None
        if hp.values.get("tuner/trial_id"):
            warm_start_dir = tune_report.trial_model_dir(
                self.project_dir, hp.values["tuner/trial_id"]
            )
        callbacks = self._deepcopy_callbacks(kwargs.pop("callbacks", []))
        release_memory()
        try:
            config = self.hypermodel.build(hp)
            return self.hypermodel.fit(
                hp,
                config,
                *args,
                trial_dir=self.get_trial_dir(trial.trial_id),
                epochs=epochs,
                warm_start_dir=warm_start_dir,
                callbacks=callbacks,
                tuner_id=self.tuner_id,
                **kwargs,
            )
        finally:
            release_memory()

    def load_model(self, trial):
        """The best model of a finished trial (its ``best.keras``)."""
        from mri_keras import inference  # Deferred: only needed to load models.

        run_dir = tune_report.trial_model_dir(self.project_dir, trial.trial_id)
        return inference.load_keras_model(os.path.join(run_dir, run_dir_lib.BEST_MODEL_NAME))


class HyperbandTuner(_TrainLibTrials, kt.Hyperband):
    """keras-tuner's Hyperband, each trial a training run."""


class BayesianTuner(_TrainLibTrials, kt.BayesianOptimization):
    """keras-tuner's Bayesian optimisation (Gaussian process), each trial a training run."""


class RandomTuner(_TrainLibTrials, kt.RandomSearch):
    """keras-tuner's random search, each trial a training run."""


def _sweep_record(config: TuneConfig) -> dict:
    fixed = dataclasses.asdict(config.train)
    for name in _RUNTIME_FIELDS:
        fixed.pop(name, None)
    for name in config.search_space.names:
        setting = tune_space.SETTINGS[name]
        (fixed if setting.section is None else fixed.get(setting.section, {})).pop(
            setting.field, None
        )
    record = {
        "tuner": config.tuner,
        "objective": tune_report.OBJECTIVE,
        "search_space": config.search_space.to_json(),
        "max_epochs": config.max_epochs,
        "hyperband_factor": config.hyperband_factor if config.tuner == "hyperband" else None,
        "hyperband_iterations": (
            config.hyperband_iterations if config.tuner == "hyperband" else None
        ),
        "fixed_training_settings": fixed,
    }
    # Through JSON once so tuples and lists compare equal with a reloaded record.
    return json.loads(json.dumps(record, default=str))


def _check_or_write_sweep_record(config: TuneConfig, resuming: bool) -> None:
    path = os.path.join(config.train.model_dir, SWEEP_RECORD_NAME)
    record = _sweep_record(config)
    if resuming and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in _RESUME_KEYS if old.get(k) != record.get(k)]
        if changed:
            details = "; ".join(
                f"{k}: was {json.dumps(old.get(k))}, now {json.dumps(record.get(k))}"
                for k in changed
            )
            raise ValueError(
                f"{config.train.model_dir} holds a sweep started with different settings "
                f"({details}). Rerun with the original settings to resume it, or use a new "
                "--model_dir (or --overwrite to discard it)."
            )
        return
    os.makedirs(config.train.model_dir, exist_ok=True)
    fileio.atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def build_tuner(config: TuneConfig, *, hypermodel: kt.HyperModel | None = None):
    """The keras-tuner Tuner of a sweep (resuming the sweep in the directory unless overwrite).

    Args:
      config: TuneConfig.
      hypermodel: keras_tuner.HyperModel. Defaults to a DoublyDeepHyperModel of the config.

    Returns:
      A HyperbandTuner, BayesianTuner or RandomTuner whose project directory is the sweep
      directory.
    """
    role = tuner_role()
    sweep_dir = os.path.abspath(config.train.model_dir)
    overwrite = config.overwrite and role != "worker"  # A worker never deletes the chief's sweep.
    resuming = not overwrite and os.path.exists(os.path.join(sweep_dir, "oracle.json"))
    if overwrite and os.path.isdir(sweep_dir) and os.listdir(sweep_dir):
        markers = [
            n
            for n in (SWEEP_RECORD_NAME, "oracle.json")
            if os.path.exists(os.path.join(sweep_dir, n))
        ]
        if not markers:
            raise ValueError(
                f"overwrite: {sweep_dir} is not empty and holds no sweep ({SWEEP_RECORD_NAME}, "
                "oracle.json); refusing to delete it. Pick another --model_dir."
            )
        shutil.rmtree(sweep_dir)
    if role != "worker" and not resuming and os.path.isdir(sweep_dir):
        # A training run or a records directory is not a sweep: writing trials into it would mix
        # the sweep's files with the run's (or the records').
        foreign = [
            n
            for n in (run_dir_lib.CONFIG_NAME, run_dir_lib.BEST_MODEL_NAME, schema.MANIFEST_NAME)
            if os.path.exists(os.path.join(sweep_dir, n))
        ]
        if foreign and not os.path.exists(os.path.join(sweep_dir, SWEEP_RECORD_NAME)):
            raise ValueError(
                f"{sweep_dir} holds a training run or records ({', '.join(foreign)}), not a "
                "sweep; pick another --model_dir for the sweep."
            )
    if role != "worker":
        _check_or_write_sweep_record(
            dataclasses.replace(
                config, train=dataclasses.replace(config.train, model_dir=sweep_dir)
            ),
            resuming,
        )
    hypermodel = hypermodel or DoublyDeepHyperModel(
        config.train, config.search_space, isolate_trials=config.isolate_trials
    )
    common = dict(
        hypermodel=hypermodel,
        objective=kt.Objective(tune_report.OBJECTIVE, direction="max"),
        seed=config.seed + 1,
        max_retries_per_trial=config.max_retries_per_trial,
        max_consecutive_failed_trials=config.max_consecutive_failed_trials,
        directory=os.path.dirname(sweep_dir),
        project_name=os.path.basename(sweep_dir),
        overwrite=False,
    )
    if config.tuner == "hyperband":
        tuner = HyperbandTuner(
            max_epochs=config.max_epochs,
            factor=config.hyperband_factor,
            hyperband_iterations=config.hyperband_iterations,
            **common,
        )
        # Hyperband has no trial budget of its own; the base Oracle stops at max_trials.
        if config.max_trials and role != "worker":
            tuner.oracle.max_trials = config.max_trials
    elif config.tuner == "bayesian":
        tuner = BayesianTuner(
            max_trials=config.max_trials,
            num_initial_points=config.num_initial_points or None,
            **common,
        )
    else:
        tuner = RandomTuner(max_trials=config.max_trials, **common)
    if role != "worker":
        tuner.oracle.verbose = config.verbose
    return tuner


# --------------------------------------------------------------------------------------------
# The search.


def run_search(config: TuneConfig, *, callbacks: list | None = None) -> tune_report.SweepResult:
    """Runs (or resumes, or joins as a worker) a sweep.

    Args:
      config: TuneConfig.
      callbacks: list of keras Callbacks given to every trial's training loop (deep-copied
        per trial). Defaults to None.

    Returns:
      SweepResult. A local or chief process returns the summary of the whole sweep (and has
      written summary.csv and best_trial.flags); a worker returns once the oracle has no more
      trials for it, with an empty summary.
    """
    if os.path.exists(config.train.model_dir) and not os.path.isdir(config.train.model_dir):
        raise ValueError(f"model_dir {config.train.model_dir!r} exists and is not a directory.")
    # Records that cannot feed training fail every trial alike: say so once, before any trial.
    train_data.inspect_data(config.train)  # Raises SetupError (a ValueError) naming the problem.
    tuner = build_tuner(config)
    tuner.search(epochs=config.max_epochs, callbacks=copy.copy(callbacks or []))
    role = tuner_role()
    if role == "worker":
        return tune_report.SweepResult(role, [], [], "", None, None)
    return tune_report.summarize(tuner, config, role)
