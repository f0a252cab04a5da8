"""Training: a custom distributed loop, model selection, crash-safe resume and export.

``Model.fit`` cannot train under ``MirroredStrategy`` when replicas hold exams of different
shapes (DESIGN.md, "Training and evaluation"), so one step is ``strategy.run`` on
``next(iterator)`` of ``strategy.distribute_datasets_from_function``: each replica takes one
whole exam of its own shape, its loss is divided by the global batch (the number of replicas)
and ``optimizer.apply_gradients`` inside the replica function all-reduces the gradients. One
step therefore averages the gradients of the replicas' exams exactly as one replica would.

Run directory (``TrainConfig.model_dir``)::

    config.json       the run's settings; a rerun with other settings is refused
    checkpoints/      model + optimizer + bookkeeping after every finished epoch
    best.keras        the epoch with the highest val_malignant_auc (float32, no recomputation)
    export/           SavedModel of best.keras (see mri_keras.export)
    metrics.csv       one row per finished epoch
    tensorboard/      per-step loss and per-epoch metrics

Crash safety: a checkpoint is made of files written under temporary names and made current by
an atomic rename of its index (``tf.train.CheckpointManager``), ``best.keras`` and
``metrics.csv`` are replaced atomically, and an improved model is saved under a name tied to its
epoch before the checkpoint that records it, then renamed. A run killed at any moment and
started again with the same settings resumes from its last finished epoch with the same
bookkeeping; each epoch reads a data stream seeded by (seed, epoch), so the resumed epochs see
the exams and augmentations the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import threading
import time
import weakref
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from mri_keras import buckets as buckets_lib
from mri_keras import config as config_lib
from mri_keras import constants, input_pipeline
from mri_keras import export as export_lib
from mri_keras import metrics as metrics_lib
from mri_keras import model as model_lib
from mri_keras import strategy as strategy_lib
from tfrecords_tools import schema

CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_MODEL_NAME = "best.keras"
EXPORT_DIR = "export"
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
LR_SCHEDULES = constants.LR_SCHEDULES
# Settings that may change between a run and its resumption: they do not change what is trained
# (longer runs, other hardware, other speed/memory trade-offs).
RESUMABLE_FIELDS = (
    "model_dir",  # The run is the directory's content: a moved or renamed run resumes.
    "epochs",
    "strategy",
    "cpu_replicas",
    "jit_compile",
    "overwrite",
    "verbose",
    "model.remat_chunk",
)


class SetupError(ValueError):
    """Bad input found before training: data, records, or the model directory."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs.

    Attributes:
      data_dir: str. Records directory written by ``python -m tfrecords_tools.convert``.
      model_dir: str. Run directory (created); a rerun with the same settings resumes.
      model: ModelConfig. Defaults to the paper's model.
      input: InputConfig. Input variant, normalisation and augmentation.
      epochs: int. Total epochs (an epoch = ceil(train exams / global replicas) steps).
        Defaults to 50.
      learning_rate: float. Adam learning rate (the peak of a schedule). Defaults to 1e-5
        (the paper).
      lr_schedule: str. "constant" (the paper) or "cosine" (decays to 0 over the run's steps
        after the warm-up; the run length then belongs to the recipe and a resumed run
        cannot change ``epochs``). Defaults to "constant".
      warmup_epochs: float. Epochs of linear warm-up from ~0 to ``learning_rate`` at the start
        (0: none). Defaults to 0.
      train_fraction: float in (0, 1]. Fraction of training patients kept (seeded), for the
        data-size experiment. Defaults to 1.
      seed: int. Seeds initialisation, the patient subsample and the per-epoch data streams.
        Defaults to 0.
      strategy: str. "auto", "one_device", "mirrored" or "multi_worker". Defaults to "auto".
      cpu_replicas: int. Logical CPU replicas per worker when there is no GPU. Defaults to 1.
      jit_compile: bool. XLA-compile the forward/backward pass; training exams are then
        padded/cropped (centred) to shape buckets so XLA compiles a bounded number of times
        (``mri_keras.buckets``). Validation and export always see whole exams. Defaults to False.
      slice_buckets: tuple of ints. Slice-count buckets used with jit_compile. Defaults to
        ``buckets.DEFAULT_SLICE_BUCKETS``.
      size_buckets: tuple of ints. Height/width buckets used with jit_compile. Defaults to
        ``buckets.DEFAULT_SIZE_BUCKETS``.
      overwrite: bool. Delete an existing run in model_dir and start over. Defaults to False.
      init_weights: str. Weights file (.keras / .weights.h5) to start from instead of a random
        initialisation (ignored when resuming). Defaults to "" (none).
      val_split: str. Split used for model selection. Defaults to "val".
      verbose: int. 0 silent; 1 start-up summary, one line per epoch and end summary; 2 also
        a progress bar per epoch. Defaults to 2.
    """

    data_dir: str
    model_dir: str
    model: config_lib.ModelConfig = dataclasses.field(default_factory=config_lib.ModelConfig)
    input: config_lib.InputConfig = dataclasses.field(default_factory=config_lib.InputConfig)
    epochs: int = 50
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    train_fraction: float = 1.0
    seed: int = 0
    strategy: str = "auto"
    cpu_replicas: int = 1
    jit_compile: bool = False
    slice_buckets: tuple[int, ...] = buckets_lib.DEFAULT_SLICE_BUCKETS
    size_buckets: tuple[int, ...] = buckets_lib.DEFAULT_SIZE_BUCKETS
    overwrite: bool = False
    init_weights: str = ""
    val_split: str = "val"
    verbose: int = 2

    def __post_init__(self):
        if not self.data_dir or not self.model_dir:
            raise ValueError(
                f"data_dir and model_dir are required. Received: data_dir={self.data_dir!r}, "
                f"model_dir={self.model_dir!r}"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1. Received: epochs={self.epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0. Received: {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}. Received: {self.lr_schedule!r}"
            )
        if not self.warmup_epochs >= 0.0:
            raise ValueError(f"warmup_epochs must be >= 0. Received: {self.warmup_epochs}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(
                f"train_fraction must be in (0, 1]. Received: train_fraction={self.train_fraction}"
            )
        if self.strategy not in strategy_lib.STRATEGIES:
            raise ValueError(
                f"strategy must be one of {strategy_lib.STRATEGIES}. Received: {self.strategy!r}"
            )
        if self.cpu_replicas < 1:
            raise ValueError(f"cpu_replicas must be >= 1. Received: {self.cpu_replicas}")
        # Validates and normalises (sorted, distinct) the buckets.
        spec = buckets_lib.BucketSpec(tuple(self.slice_buckets), tuple(self.size_buckets))
        object.__setattr__(self, "slice_buckets", spec.slice_buckets)
        object.__setattr__(self, "size_buckets", spec.size_buckets)
        if self.val_split not in schema.SPLITS or self.val_split == "train":
            raise ValueError(f"val_split must be 'val' or 'test'. Received: {self.val_split!r}")

    def to_json_dict(self) -> dict:
        """The settings as plain JSON values (what config.json holds)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------- data checks


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the run reads, checked before training.

    Attributes:
      manifest: dict. The records' manifest.
      train_exam_ids: tuple of str or None. Training exams kept by train_fraction (None: all).
      num_train: int. Training exams used.
      num_train_patients: int. Training patients used.
      num_val: int. Validation exams.
      split_counts: dict split -> number of exams in the records.
    """

    manifest: dict
    train_exam_ids: tuple | None
    num_train: int
    num_train_patients: int
    num_val: int
    split_counts: dict


def select_train_exams(exams: Sequence[dict], fraction: float, seed: int):
    """Seeded subsample of training PATIENTS (all their exams kept together).

    Args:
      exams: manifest exam entries (``exam_id``, ``patient_id``).
      fraction: float in (0, 1]. Patients kept: ``max(1, round(fraction * patients))``.
      seed: int.

    Returns:
      ``(exam ids or None when fraction == 1, number of patients kept)``.
    """
    patients = sorted({e["patient_id"] for e in exams})
    if fraction >= 1.0:
        return None, len(patients)
    keep_n = max(1, int(round(fraction * len(patients))))
    rng = np.random.default_rng(seed)
    kept = set(rng.choice(patients, size=keep_n, replace=False).tolist())
    return tuple(sorted(e["exam_id"] for e in exams if e["patient_id"] in kept)), keep_n


def _peek_record(records_dir: str, split: str, shard_names) -> dict:
    path = os.path.join(records_dir, shard_names[0])
    try:
        for raw in tf.data.TFRecordDataset(path).take(1):
            return schema.decode_example_numpy(raw.numpy())
    except tf.errors.OpError as e:
        raise SetupError(f"{path}: not a readable TFRecord file ({e.message}).") from None
    except ValueError as e:  # decode_example_numpy: schema version.
        raise SetupError(f"{path}: {e}") from None
    raise SetupError(f"{path}: the first shard of split {split!r} holds no records.")


# A whole-split shuffle buffer may take at most this fraction of the machine's memory.
WHOLE_SPLIT_BUFFER_MEMORY_FRACTION = 0.25


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_whole_split_buffer(data_dir: str, shard_names) -> None:
    """shuffle_buffer=0 holds every training record in memory: refuse it where it won't fit."""
    size = sum(os.path.getsize(os.path.join(data_dir, name)) for name in shard_names)
    memory = _physical_memory_bytes()
    if memory and size > WHOLE_SPLIT_BUFFER_MEMORY_FRACTION * memory:
        raise SetupError(
            f"--shuffle_buffer=0 would hold the whole training split of {data_dir!r} in "
            f"memory ({size / 2**30:.1f} GiB of records; this machine has "
            f"{memory / 2**30:.1f} GiB): give a buffer size in exams instead (e.g. "
            "--shuffle_buffer=256)."
        )


def inspect_data(config: TrainConfig) -> DataInfo:
    """Checks the records directory can feed this run; raises ``SetupError`` naming the problem."""
    data_dir = config.data_dir
    if not os.path.isdir(data_dir):
        raise SetupError(f"data_dir {data_dir!r} does not exist.")
    if not os.listdir(data_dir):
        raise SetupError(
            f"data_dir {data_dir!r} is empty; convert DICOM exams into it first with "
            "`python -m tfrecords_tools.convert --output_dir=...`."
        )
    try:
        manifest = schema.read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(str(e)) from None
    variant = config.input.input_variant
    needed = constants.phases_needed(variant)
    stored = manifest.get("phases") or []
    missing = [p for p in needed if p not in stored]
    if missing:
        raise SetupError(
            f"Input variant {variant!r} needs phases {list(needed)}, but the records in "
            f"{data_dir!r} hold only {list(stored)} (missing {missing}). Pick another --input "
            "or convert with those phases."
        )
    splits = manifest.get("splits", {})
    counts = {s: int(splits.get(s, {}).get("num_exams", 0)) for s in schema.SPLITS}
    for split in ("train", config.val_split):
        entry = splits.get(split)
        if not entry or not entry.get("num_exams") or not entry.get("shards"):
            raise SetupError(
                f"Split {split!r} of {data_dir!r} has no exams (manifest counts: {counts}); "
                + (
                    "training needs training exams."
                    if split == "train"
                    else "model selection needs a validation split: convert with val patients."
                )
            )
        for name in entry["shards"]:
            if not os.path.isfile(os.path.join(data_dir, name)):
                raise SetupError(
                    f"{os.path.join(data_dir, name)} is listed in the manifest (split "
                    f"{split!r}) but does not exist."
                )
    record = _peek_record(data_dir, "train", splits["train"]["shards"])
    record_missing = [p for p in needed if p not in record[schema.KEY_PHASES]]
    if record_missing:
        raise SetupError(
            f"Input variant {variant!r} needs phases {list(needed)}, but exam "
            f"{record[schema.KEY_EXAM_ID]} in {data_dir!r} stores only "
            f"{list(record[schema.KEY_PHASES])}."
        )
    if config.input.shuffle_buffer == 0:
        _check_whole_split_buffer(data_dir, splits["train"]["shards"])
    train_exams = splits["train"].get("exams")
    if train_exams is None:
        if config.train_fraction < 1.0:
            raise SetupError(
                f"train_fraction={config.train_fraction} needs the per-exam list of the "
                f"manifest ('splits.train.exams'), which {data_dir!r} lacks."
            )
        ids, patients = None, int(splits["train"].get("num_patients", 0))
    else:
        ids, patients = select_train_exams(train_exams, config.train_fraction, config.seed)
    num_train = len(ids) if ids is not None else counts["train"]
    return DataInfo(manifest, ids, num_train, patients, counts[config.val_split], counts)


# --------------------------------------------------------------------------- model dir


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
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: saved {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
    return diffs


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        _atomic_write_text(config_path, json.dumps(current, indent=2, sort_keys=True) + "\n")
    return resuming


# --------------------------------------------------------------------------- prediction

_PREDICT_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _predict_fn(model):
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        # A weak reference: a value that held the model strongly would keep its key (and every
        # trained model) alive for the life of the process.
        model_ref = weakref.ref(model)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 1], tf.float32)])
        def fn(volume):
            out = model_ref()(volume, training=False)
            # (batch, 4): probability of the positive class of each head, LABELS order.
            return tf.stack([tf.cast(out[k][:, 1], tf.float32) for k in constants.LABELS], -1)

        _PREDICT_FNS[model] = fn
    return fn


def validation_dataset(records_dir: str, split: str, input_config, *, exam_ids=None):
    """The dataset ``predict_split`` reads: every exam of a split, unaugmented, with ids."""
    return input_pipeline.make_dataset(
        records_dir, split, input_config, training=False, exam_ids=exam_ids, with_ids=True
    )


def predict_split(
    model, records_dir: str, split: str, input_config, *, exam_ids=None, dataset=None
):
    """Runs ``model`` over every exam of a split (no augmentation), in manifest order.

    Args:
      model: keras.Model from ``model.build_model`` (or a loaded best.keras).
      records_dir: str. Records directory.
      split: str. "train", "val" or "test".
      input_config: InputConfig. Only the input variant and normalisation matter.
      exam_ids: optional sequence of exam ids to keep. Defaults to all.
      dataset: optional dataset ``validation_dataset`` built for these arguments, reused
        (a training run predicts the same split after every epoch). Defaults to a new one.

    Returns:
      ``(exam_ids, patient_ids, labels, probs)``: two lists of str (pseudonyms), int64
      ``(N, 4)`` labels and float32 ``(N, 4)`` positive-class probabilities, both in
      ``constants.LABELS`` order.
    """
    ds = dataset
    if ds is None:
        ds = validation_dataset(records_dir, split, input_config, exam_ids=exam_ids)
    fn = _predict_fn(model)
    ids, pids, labels, probs = [], [], [], []
    for volume, targets, meta in ds:
        probs.append(fn(volume).numpy())
        positive = [targets[k][:, 1].numpy() for k in constants.LABELS]
        labels.append(np.stack(positive, -1).round().astype(np.int64))
        ids.extend(v.decode() for v in meta["exam_id"].numpy())
        pids.extend(v.decode() for v in meta["patient_id"].numpy())
    if not probs:
        return ids, pids, np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32)
    return ids, pids, np.concatenate(labels), np.concatenate(probs).astype(np.float32)


def validation_metrics(labels, probs) -> dict:
    """``val_loss`` (mean over exams of the summed cross-entropy) and breast-level AUCs."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    ce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(axis=1)
    return {
        "val_loss": float(ce.mean()) if len(ce) else float("nan"),
        "val_malignant_auc": metrics_lib.breast_level_auc(labels, probs, "malignant"),
        "val_benign_auc": metrics_lib.breast_level_auc(labels, probs, "benign"),
    }


def is_improvement(
    value: float,
    best: float | None,
    loss: float | None = None,
    best_loss: float | None = None,
) -> bool:
    """The model selection rule: does this epoch replace the best one so far?

    1. Higher val_malignant_auc wins.
    2. Equal AUCs (within 1e-9: the same ranking of the validation breasts): lower val_loss
       wins, when both losses are known.
    3. Still equal: the earlier epoch stays (the rule is deterministic; no tie moves the
       choice to a later epoch).

    NaN (a one-class validation split) never beats a number; while no epoch has a number, the
    latest epoch is kept.
    """
    if best is None:
        return True
    if math.isnan(value):
        return math.isnan(best)
    if math.isnan(best) or value > best + 1e-9:
        return True
    if value < best - 1e-9:
        return False
    if loss is None or best_loss is None or math.isnan(loss) or math.isnan(best_loss):
        return False
    return loss < best_loss


# --------------------------------------------------------------------------- training


@keras.saving.register_keras_serializable(package="mri_keras")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak``, then constant or a cosine decay to 0 at ``total_steps``.

    ``lr(step) = peak * min(1, (step + 1) / warmup_steps) * decay(step)``, with ``decay = 1``
    ("constant") or ``0.5 * (1 + cos(pi * p))``, ``p = (step - warmup) / (total - warmup)``
    clipped to [0, 1] ("cosine"). The step is the optimizer's iteration count, which the
    checkpoint holds, so a resumed run continues the same curve.
    """

    def __init__(self, peak, total_steps, warmup_steps=0, kind="constant"):
        if kind not in LR_SCHEDULES:
            raise ValueError(f"kind must be one of {LR_SCHEDULES}. Received: {kind!r}")
        self.peak, self.total_steps = float(peak), int(total_steps)
        self.warmup_steps, self.kind = int(warmup_steps), kind

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        lr = keras.ops.convert_to_tensor(self.peak, "float32")
        if self.warmup_steps > 0:
            lr = lr * keras.ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        if self.kind == "cosine":
            span = float(max(1, self.total_steps - self.warmup_steps))
            progress = keras.ops.clip((step - float(self.warmup_steps)) / span, 0.0, 1.0)
            lr = lr * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        return lr

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
        }


def make_learning_rate(config: TrainConfig, steps_per_epoch: int):
    """The optimizer's learning rate: a float (constant, no warm-up) or a ``WarmupSchedule``."""
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "constant" and warmup_steps == 0:
        return config.learning_rate
    return WarmupSchedule(
        config.learning_rate, config.epochs * steps_per_epoch, warmup_steps, config.lr_schedule
    )


def _make_optimizer(config: TrainConfig, steps_per_epoch: int):
    optimizer = keras.optimizers.Adam(learning_rate=make_learning_rate(config, steps_per_epoch))
    if config.model.dtype_policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _make_train_step(model, optimizer, strategy, jit_compile: bool):
    """``train_step(iterator) -> mean loss over the global batch`` (a tf.function)."""
    num_replicas = strategy.num_replicas_in_sync
    scale = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    variables = model.trainable_variables

    def forward_backward(volume, targets):
        with tf.GradientTape() as tape:
            preds = model(volume, training=True)
            per_exam = model_lib.compute_loss(targets, preds)  # (batch,)
            global_batch = num_replicas * tf.shape(per_exam)[0]
            loss = tf.reduce_sum(per_exam) / tf.cast(global_batch, per_exam.dtype)
            scaled = optimizer.scale_loss(loss) if scale else loss
        return loss, tape.gradient(scaled, variables)

    if jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(volume, targets):
        loss, grads = forward_backward(volume, targets)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function
    def train_step(iterator):
        volume, targets = next(iterator)
        per_replica = strategy.run(replica_step, args=(volume, targets))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return train_step


def _write_metrics_csv(path: str, history: dict) -> None:
    lines = [",".join(("epoch",) + METRIC_KEYS + ("seconds",) + TIMING_KEYS)]
    for i, epoch in enumerate(history["epoch"]):
        values = [str(epoch)] + [repr(float(history[k][i])) for k in METRIC_KEYS]
        values += [f"{history[k][i]:.2f}" for k in ("seconds",) + TIMING_KEYS]
        lines.append(",".join(values))
    _atomic_write_text(path, "\n".join(lines) + "\n")


def read_metrics_csv(path: str) -> list:
    """Rows of a run's metrics.csv as dicts of floats (``epoch`` as int)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in rows]


def _weights_fingerprint(model) -> str:
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w, np.float32).tobytes())
    return digest.hexdigest()


def _log(config: TrainConfig, is_chief: bool, text: str) -> None:
    if config.verbose and is_chief:
        print(text, flush=True)


def _empty_history() -> dict:
    return {"epoch": [], "seconds": [], **{k: [] for k in METRIC_KEYS + TIMING_KEYS}}


def _complete_history(history: dict) -> dict:
    """A history restored from a run made before the timing columns existed gets NaNs."""
    for k in TIMING_KEYS:
        history.setdefault(k, [float("nan")] * len(history["epoch"]))
    return history


def _progress_bar_wanted(config: TrainConfig, is_chief: bool) -> bool:
    """Progress bars only on a terminal: redrawn into a log file they are hundreds of lines."""
    if config.verbose < 2 or not is_chief:
        return False
    try:
        return os.isatty(1)
    except (OSError, ValueError):
        return False


def train(config: TrainConfig, *, extra_callbacks=None) -> dict:
    """Trains (or resumes) a run; keeps and exports the best epoch by val_malignant_auc.

    Args:
      config: TrainConfig.
      extra_callbacks: optional list of ``keras.callbacks.Callback``. Driven from the loop:
        ``on_train_begin/end``, ``on_epoch_begin/end`` (logs: loss, val_loss,
        val_malignant_auc, val_benign_auc) and ``on_train_batch_begin/end`` (logs: loss).
        Setting ``model.stop_training = True`` ends the run after the current epoch.

    Returns:
      The history: dict with per-epoch lists ``epoch`` (1-based), ``loss``, ``val_loss``,
      ``val_malignant_auc``, ``val_benign_auc``, ``seconds`` (all epochs of the run, resumed
      ones included), plus ``best_epoch`` (1-based), ``best_val_malignant_auc``,
      ``model_dir``, ``best_model`` and ``export_dir`` paths, and ``weights_fingerprint``
      (sha256 of the final weights, to compare workers).

    Raises:
      SetupError: bad input found before training (see ``inspect_data``,
        ``prepare_model_dir``).
    """
    # The strategy comes first: MultiWorkerMirroredStrategy must exist before other TF work.
    strategy, role = strategy_lib.make_strategy(config.strategy, config.cpu_replicas)
    info = inspect_data(config)
    if info.num_train < strategy.num_replicas_in_sync:
        raise SetupError(
            f"{info.num_train} training exam(s) for {strategy.num_replicas_in_sync} replicas: "
            "every replica needs at least one exam per step; use fewer replicas."
        )
    resuming = prepare_model_dir(config, role.is_chief)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _barrier(strategy)  # Workers look at model_dir only after the chief has prepared it.
    is_chief = role.is_chief
    model_dir = config.model_dir
    best_path = os.path.join(model_dir, BEST_MODEL_NAME)
    export_dir = os.path.join(model_dir, EXPORT_DIR)
    ckpt_dir = os.path.join(model_dir, CHECKPOINT_DIR)

    steps = math.ceil(info.num_train / strategy.num_replicas_in_sync)
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = model_lib.build_model(config.model)
        optimizer = _make_optimizer(config, steps)
        optimizer.build(model.trainable_variables)
    run_state = tf.Variable("", dtype=tf.string, trainable=False, name="run_state")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, run_state=run_state)
    write_dir = strategy_lib.worker_write_dir(ckpt_dir, role)
    manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=2)

    history, best_epoch, best_auc, best_loss, start_epoch = _empty_history(), 0, None, None, 0
    latest = tf.train.latest_checkpoint(ckpt_dir)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        state = json.loads(run_state.numpy().decode())
        history, best_epoch = _complete_history(state["history"]), int(state["best_epoch"])
        best_auc = state["best_val_malignant_auc"]
        best_loss = state.get("best_val_loss")
        start_epoch = len(history["epoch"])
        if is_chief:
            _settle_best_model(model_dir, best_epoch)
    elif config.init_weights:
        if not os.path.isfile(config.init_weights):
            raise SetupError(f"init_weights {config.init_weights!r} does not exist.")
        model.load_weights(config.init_weights)

    _log(config, is_chief, _startup_summary(config, strategy, info, model, steps, resuming, latest))

    writer = None
    if is_chief:
        _write_metrics_csv(os.path.join(model_dir, METRICS_NAME), history)
        writer = tf.summary.create_file_writer(os.path.join(model_dir, TENSORBOARD_DIR))
    train_step = _make_train_step(model, optimizer, strategy, config.jit_compile)
    val_dataset = validation_dataset(config.data_dir, config.val_split, config.input)
    callbacks = keras.callbacks.CallbackList(list(extra_callbacks or []), model=model)
    model.stop_training = False

    def dataset_fn(epoch, input_context):
        replicas_per_pipeline = max(
            1, input_context.num_replicas_in_sync // input_context.num_input_pipelines
        )
        # One seeded stream per epoch: a resumed epoch sees what the original run would have.
        epoch_input = dataclasses.replace(config.input, seed=config.seed * 100_003 + epoch)
        ds = input_pipeline.make_dataset(
            config.data_dir,
            "train",
            epoch_input,
            training=True,
            exam_ids=info.train_exam_ids,
            input_context=input_context,
            repeat=True,
            # Exactly this epoch's exams for this pipeline: nothing read ahead into the next.
            num_exams=steps * replicas_per_pipeline,
        )
        if config.jit_compile:
            spec = buckets_lib.BucketSpec(config.slice_buckets, config.size_buckets)
            ds = ds.map(buckets_lib.bucket_map_fn(spec), num_parallel_calls=tf.data.AUTOTUNE)
        return ds

    # best.keras is saved in the serving architecture (float32, no recomputation, plain
    # variables), so evaluation and export load it whatever the training-time options were.
    portable = None
    callbacks.on_train_begin()
    for epoch in range(start_epoch, config.epochs):
        if model.stop_training:
            break
        started = time.time()
        callbacks.on_epoch_begin(epoch)
        if config.verbose > 1:
            _log(config, is_chief, f"Epoch {epoch + 1}/{config.epochs}")
        dist = strategy.distribute_datasets_from_function(lambda ctx, e=epoch: dataset_fn(e, ctx))
        iterator = iter(dist)
        progbar = None
        if _progress_bar_wanted(config, is_chief):
            progbar = keras.utils.Progbar(steps, verbose=1, stateful_metrics=["loss"])
        # Losses stay tensors until the epoch ends: reading each back would wait for its step
        # and keep the host from queueing the next one (and an accelerator idle meanwhile).
        losses = []
        for step in range(steps):
            callbacks.on_train_batch_begin(step)
            loss = train_step(iterator)
            losses.append(loss)
            if progbar is not None:
                progbar.update(step + 1, [("loss", float(loss))])
            callbacks.on_train_batch_end(step, {"loss": loss})
        losses = np.asarray([float(v) for v in losses])
        train_seconds = time.time() - started
        # The thread must hold the last references: dropping ours after it started would leave
        # the destruction (and its wait) to whichever side lets go last.
        retired = [iterator, dist]
        del iterator, dist
        _retire_in_background(retired)
        if writer is not None:
            # At most ~50 points per epoch: each scalar costs ~1 ms to write.
            every = max(1, steps // 50)
            with writer.as_default():
                for first in range(0, steps, every):
                    tf.summary.scalar(
                        "batch_loss",
                        float(losses[first : first + every].mean()),
                        step=epoch * steps + min(first + every, steps),
                    )

        val_started = time.time()
        _, _, labels, probs = predict_split(
            model, config.data_dir, config.val_split, config.input, dataset=val_dataset
        )
        logs = {"loss": float(losses.mean()), **validation_metrics(labels, probs)}
        val_seconds = time.time() - val_started
        improved = is_improvement(logs["val_malignant_auc"], best_auc, logs["val_loss"], best_loss)
        if improved:
            best_epoch, best_auc = epoch + 1, logs["val_malignant_auc"]
            best_loss = logs["val_loss"]
        history["epoch"].append(epoch + 1)
        for k in METRIC_KEYS:
            history[k].append(logs[k])
        history["train_seconds"].append(train_seconds)
        history["val_seconds"].append(val_seconds)

        # Order matters for crash safety: candidate file, then checkpoint, then rename.
        if improved and is_chief:
            if portable is None:
                portable = model_lib.build_model(export_lib.serving_model_config(config.model))
            export_lib.copy_weights(model, portable)
            portable.save(_candidate_path(model_dir, epoch + 1))
        # The epoch's time includes its share of the bookkeeping below, so the checkpoint
        # records it as measured up to here (the best model saved, the checkpoint not yet).
        history["seconds"].append(time.time() - started)
        run_state.assign(
            json.dumps(
                {
                    "history": history,
                    "best_epoch": best_epoch,
                    "best_val_malignant_auc": best_auc,
                    "best_val_loss": best_loss,
                }
            )
        )
        manager.save(checkpoint_number=epoch + 1)
        if is_chief:
            _settle_best_model(model_dir, best_epoch)
            _write_metrics_csv(os.path.join(model_dir, METRICS_NAME), history)
            with writer.as_default():
                for k in METRIC_KEYS:
                    tf.summary.scalar(k, logs[k], step=epoch + 1)
            writer.flush()
        _log(
            config,
            is_chief,
            ("" if config.verbose > 1 else f"Epoch {epoch + 1}/{config.epochs}: ")
            + "  ".join(f"{k}: {logs[k]:.4f}" for k in METRIC_KEYS)
            + f"  ({history['seconds'][-1]:.1f} s: steps {train_seconds:.1f}, "
            f"validation {val_seconds:.1f})"
            + (f"  (best so far: epoch {best_epoch})" if not improved else "  (new best)"),
        )
        callbacks.on_epoch_end(epoch, dict(logs))
    callbacks.on_train_end()

    if not is_chief:
        shutil.rmtree(write_dir, ignore_errors=True)
    elif history["epoch"]:
        _export_best(config, best_path, export_dir, best_epoch, best_auc)
    if writer is not None:
        writer.close()
    result = dict(history)
    result.update(
        best_epoch=best_epoch,
        best_val_malignant_auc=best_auc,
        model_dir=model_dir,
        best_model=best_path,
        export_dir=export_dir,
        weights_fingerprint=_weights_fingerprint(model),
    )
    _log(config, is_chief, _end_summary(config, result))
    return result


def _retire_in_background(holder: list) -> threading.Thread:
    """Drops an epoch's dataset iterator (and dataset) in another thread.

    ``holder`` must hold the only remaining references. Destroying a tf.data iterator waits
    for its pipeline's background threads: measured on the demo, dropping each epoch's
    iterator in the loop cost 4.6-27.6 s in about half of the epochs. The wait is idle; done
    in another thread it no longer holds up the next epoch (measured: 0.000-0.005 s in the
    loop, where the earlier version of this function, whose caller still held a reference,
    measured 7.2 s).

    The thread is not a daemon: the interpreter waits for it before finalising. A daemon
    thread still inside TensorFlow's destructor at exit is stopped by Python's finalisation
    with a forced unwind through C++ frames, which aborts the process ("FATAL: exception not
    rethrown", seen once at the end of a finished run).

    Returns:
      The started thread.
    """
    thread = threading.Thread(target=holder.clear, name="retire-iterator", daemon=False)
    thread.start()
    return thread


def _barrier(strategy) -> None:
    one = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce(tf.distribute.ReduceOp.SUM, one, axis=None).numpy()


def _candidate_path(model_dir: str, epoch: int) -> str:
    return os.path.join(model_dir, f"{BEST_MODEL_NAME}.epoch-{epoch}.keras")


def _settle_best_model(model_dir: str, best_epoch: int) -> None:
    """Makes best.keras the model of ``best_epoch`` (the checkpoint's record) and drops other
    candidates: those of epochs a crash interrupted before their checkpoint."""
    keep = _candidate_path(model_dir, best_epoch)
    if os.path.exists(keep):
        os.replace(keep, os.path.join(model_dir, BEST_MODEL_NAME))
    for path in glob.glob(os.path.join(model_dir, f"{BEST_MODEL_NAME}.epoch-*.keras")):
        os.remove(path)


def _export_best(config, best_path, export_dir, best_epoch, best_auc) -> None:
    meta = export_lib.read_metadata(export_dir)
    if meta and meta.get("best_epoch") == best_epoch and meta.get("run") == config.model_dir:
        return  # Already exported (a rerun of a finished run).
    export_lib.export_from_keras_file(
        best_path,
        export_dir,
        config.model,
        config.input,
        metadata={
            "best_epoch": best_epoch,
            "val_malignant_auc": best_auc,
            "run": config.model_dir,
        },
    )


def _startup_summary(config, strategy, info, model, steps, resuming, latest) -> str:
    lines = [
        "mri_keras training",
        f"  strategy:      {strategy_lib.describe(strategy)}",
        f"  data_dir:      {config.data_dir}",
        "  exams:         "
        + ", ".join(f"{s} {n}" for s, n in info.split_counts.items())
        + (
            f" (training on {info.num_train} exams of {info.num_train_patients} patients, "
            f"train_fraction={config.train_fraction})"
            if info.train_exam_ids is not None
            else ""
        ),
        f"  input:         {config.input.input_variant} (phases "
        f"{', '.join(constants.phases_needed(config.input.input_variant))}), "
        f"{config.input.normalization}, flip={config.input.flip}, crop={config.input.crop}, "
        f"crop_slices={config.input.crop_slices}",
        f"  model:         width {config.model.width}, "
        f"blocks {tuple(config.model.blocks_per_stage)}, init {config.model.init}, "
        f"norm {config.model.norm}, "
        f"{model.count_params():,} parameters, {config.model.dtype_policy}, "
        f"jit_compile={config.jit_compile}, remat={config.model.remat_chunk}",
        f"  recipe:        Adam lr {config.learning_rate:g} ({config.lr_schedule}"
        + (f", {config.warmup_epochs:g} warm-up epochs" if config.warmup_epochs else "")
        + f"), {config.epochs} epochs x {steps} steps ({strategy.num_replicas_in_sync} exam(s) "
        f"per step), seed {config.seed}",
        f"  model_dir:     {config.model_dir}"
        + (
            f" (resuming from {os.path.basename(latest)})"
            if latest
            else " (resuming: no finished epoch yet)"
            if resuming
            else ""
        ),
    ]
    return "\n".join(lines)


def _end_summary(config, result) -> str:
    d = config.model_dir
    epochs = result["epoch"]
    best = result["best_epoch"]
    auc = result["best_val_malignant_auc"]
    lines = [
        f"Finished {len(epochs)} epoch(s) of {config.epochs}; best epoch {best} "
        f"(val_malignant_auc {auc if auc is None else round(auc, 4)}).",
        f"  best model:   {os.path.join(d, BEST_MODEL_NAME)}",
        f"  SavedModel:   {os.path.join(d, EXPORT_DIR)} "
        "(signatures serving_default, serving_example)",
        f"  metrics:      {os.path.join(d, METRICS_NAME)}",
        f"  checkpoints:  {os.path.join(d, CHECKPOINT_DIR)}",
        f"  TensorBoard:  tensorboard --logdir {os.path.join(d, TENSORBOARD_DIR)}",
        f"  settings:     {os.path.join(d, CONFIG_NAME)}",
    ]
    return "\n".join(lines)
