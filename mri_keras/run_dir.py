"""The run directory of a training run: its layout, the resume check against its saved
settings, its metrics.csv, and the best-model candidates a crash may leave behind.

Layout (``TrainConfig.model_dir``)::

    config.json       the run's settings; a rerun with other settings is refused
    checkpoints/      model + optimizer + bookkeeping after every finished epoch
    best.keras        the epoch with the highest val_malignant_auc (float32, no recomputation)
    export/           SavedModel of best.keras (see mri_keras.export)
    metrics.csv       one row per finished epoch
    tensorboard/      per-step loss and per-epoch metrics
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil

from mri_keras.constants import BEST_MODEL_NAME, CONFIG_NAME, EXPORT_DIR
from mri_keras.train_config import SetupError, TrainConfig
from tfrecords_tools import fileio

CHECKPOINT_DIR = "checkpoints"
METRICS_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (
    CONFIG_NAME,
    CHECKPOINT_DIR,
    BEST_MODEL_NAME,
    EXPORT_DIR,
    METRICS_NAME,
    TENSORBOARD_DIR,
)

METRIC_KEYS = ("loss", "val_loss", "val_malignant_auc", "val_benign_auc")
# Where each epoch's wall time went (metrics.csv): the train steps themselves (with the input
# pipeline they wait on) and the validation pass; the rest of ``seconds`` is checkpoints,
# best-model saving and summaries.
TIMING_KEYS = ("train_seconds", "val_seconds")
# Settings that may change between a run and its resumption: they do not change what is trained
# (longer runs, other hardware, other speed/memory trade-offs).
RESUMABLE_FIELDS = (
    "model_dir",  # The run is the directory's content: a moved or renamed run resumes.
    "epochs",
    "strategy",
    "cpu_replicas",
    "jit_compile",
    "preprocess_on",
    "overwrite",
    "verbose",
    "model.remat_chunk",
)
# Settings earlier versions saved that no longer exist: ignored in a saved config.json, so
# those runs still resume. ``input.seed`` duplicated the run's ``seed`` (the per-epoch streams
# were always drawn from the latter).
RETIRED_FIELDS = ("input.seed",)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> list:
    """``["name: saved X, now Y", ...]`` for settings that differ (resumable ones ignored)."""
    a, b = _flatten(saved), _flatten(current)
    # A cosine schedule spans the whole run: its length is part of the recipe.
    fixed_length = "cosine" in (a.get("lr_schedule"), b.get("lr_schedule"))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_FIELDS and not (key == "epochs" and fixed_length):
            continue
        if key in RETIRED_FIELDS and key not in b:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: saved {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
    return diffs


def prepare_model_dir(config: TrainConfig, is_chief: bool = True) -> bool:
    """Checks ``model_dir`` against this run; writes config.json. Returns True when resuming.

    Raises:
      SetupError: model_dir holds a run with other settings (and overwrite is False), or is a
        file.
    """
    model_dir = config.model_dir
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise SetupError(f"model_dir {model_dir!r} exists and is not a directory.")
    config_path = os.path.join(model_dir, CONFIG_NAME)
    current = config.to_json_dict()
    if config.overwrite and is_chief:
        for name in RUN_FILES:
            path = os.path.join(model_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        for path in glob.glob(os.path.join(model_dir, BEST_MODEL_NAME + ".epoch-*")):
            os.remove(path)
    resuming = False
    if os.path.isfile(config_path) and not config.overwrite:
        try:
            with open(config_path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SetupError(
                f"{config_path} is unreadable ({e}); pass --overwrite to start a new run there."
            ) from None
        diffs = config_differences(saved, current)
        if diffs:
            raise SetupError(
                f"model_dir {model_dir!r} holds a run with other settings:\n  "
                + "\n  ".join(diffs)
                + "\nUse another --model_dir, rerun with the saved settings to resume it, or pass "
                "--overwrite to delete it and start over."
            )
        resuming = True
    elif os.path.isdir(os.path.join(model_dir, CHECKPOINT_DIR)) and not config.overwrite:
        raise SetupError(
            f"model_dir {model_dir!r} holds checkpoints but no {CONFIG_NAME}, so its settings "
            "are unknown; pass --overwrite to start over or use another --model_dir."
        )
    if is_chief:
        os.makedirs(model_dir, exist_ok=True)
        text = json.dumps(current, indent=2, sort_keys=True) + "\n"
        fileio.atomic_write_text(config_path, text, durable=True)
    return resuming


def write_metrics_csv(path: str, history: dict) -> None:
    """Writes (atomically) one row per finished epoch of ``history`` (lists per key)."""
    lines = [",".join(("epoch",) + METRIC_KEYS + ("seconds",) + TIMING_KEYS)]
    for i, epoch in enumerate(history["epoch"]):
        values = [str(epoch)] + [repr(float(history[k][i])) for k in METRIC_KEYS]
        values += [f"{history[k][i]:.2f}" for k in ("seconds",) + TIMING_KEYS]
        lines.append(",".join(values))
    fileio.atomic_write_text(path, "\n".join(lines) + "\n", durable=True)


def read_metrics_csv(path: str) -> list:
    """Rows of a run's metrics.csv as dicts of floats (``epoch`` as int)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in rows]


def candidate_path(model_dir: str, epoch: int) -> str:
    """Where an improved epoch's model is saved before the checkpoint that records it."""
    return os.path.join(model_dir, f"{BEST_MODEL_NAME}.epoch-{epoch}.keras")


def settle_best_model(model_dir: str, best_epoch: int) -> None:
    """Makes best.keras the model of ``best_epoch`` (the checkpoint's record) and drops other
    candidates: those of epochs a crash interrupted before their checkpoint."""
    keep = candidate_path(model_dir, best_epoch)
    if os.path.exists(keep):
        os.replace(keep, os.path.join(model_dir, BEST_MODEL_NAME))
    for path in glob.glob(os.path.join(model_dir, f"{BEST_MODEL_NAME}.epoch-*.keras")):
        os.remove(path)
