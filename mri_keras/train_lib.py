"""Training: a custom distributed loop, model selection, crash-safe resume and export.

``Model.fit`` cannot train under ``MirroredStrategy`` when replicas hold exams of different
shapes (DESIGN.md, "Training and evaluation"), so one step is ``strategy.run`` on
``next(iterator)`` of ``strategy.distribute_datasets_from_function``: each replica takes one
whole exam of its own shape, its loss is divided by the global batch (the number of replicas)
and ``optimizer.apply_gradients`` inside the replica function all-reduces the gradients. One
step therefore averages the gradients of the replicas' exams exactly as one replica would.

The run directory's layout and the resume check: ``mri_keras.run_dir``. The settings:
``mri_keras.train_config``; the data checks: ``mri_keras.train_data``; validation and the
model-selection rule: ``mri_keras.validation``; the learning-rate schedule:
``mri_keras.schedules``.

Crash safety: a checkpoint is made of files written under temporary names and made current by
an atomic rename of its index (``tf.train.CheckpointManager``), ``best.keras`` and
``metrics.csv`` are replaced atomically, and an improved model is saved under a name tied to its
epoch before the checkpoint that records it, then renamed. A run killed at any moment and
started again with the same settings resumes from its last finished epoch with the same
bookkeeping; each epoch reads a data stream seeded by (seed, epoch), so the resumed epochs see
the exams and augmentations the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from mri_keras import buckets as buckets_lib
from mri_keras import constants, input_pipeline, preprocessing, schedules, validation
from mri_keras import export as export_lib
from mri_keras import model as model_lib
from mri_keras import run_dir as run_dir_lib
from mri_keras import strategy as strategy_lib
from mri_keras.run_dir import (
    BEST_MODEL_NAME,
    CHECKPOINT_DIR,
    CONFIG_NAME,
    EXPORT_DIR,
    METRIC_KEYS,
    METRICS_NAME,
    TENSORBOARD_DIR,
    TIMING_KEYS,
)
from mri_keras.train_config import SetupError, TrainConfig
from mri_keras.train_data import inspect_data

__all__ = ["SetupError", "TrainConfig", "train"]


def _make_train_step(
    model, optimizer, strategy, jit_compile: bool, device_input=None, bucket_spec=None
):
    """``train_step(iterator) -> mean loss over the global batch`` (a tf.function).

    With ``device_input`` (an InputConfig) the iterator yields stored phases (``make_dataset``
    with ``preprocess_on="device"``) and each replica preprocesses its exam on its own device
    (``preprocessing.preprocess_batch``) before the forward pass; with ``bucket_spec`` too,
    the preprocessed volume is then fitted to its bucket there, as the CPU path does in tf.data,
    so the XLA-compiled pass still sees a bounded number of shapes.
    """
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
        if device_input is not None:
            volume = preprocessing.preprocess_batch(volume, device_input)
            if bucket_spec is not None:
                volume = buckets_lib.fit_to_bucket(volume, bucket_spec)
        loss, grads = forward_backward(volume, targets)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function
    def train_step(iterator):
        volume, targets = next(iterator)
        per_replica = strategy.run(replica_step, args=(volume, targets))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return train_step


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
    resuming = run_dir_lib.prepare_model_dir(config, role.is_chief)
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
        model = model_lib.build_model(config.model, config.input.channels)
        optimizer = schedules.make_optimizer(config, steps)
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
            run_dir_lib.settle_best_model(model_dir, best_epoch)
    elif config.init_weights:
        if not os.path.isfile(config.init_weights):
            raise SetupError(f"init_weights {config.init_weights!r} does not exist.")
        model.load_weights(config.init_weights)

    _log(config, is_chief, _startup_summary(config, strategy, info, model, steps, resuming, latest))

    writer = None
    if is_chief:
        run_dir_lib.write_metrics_csv(os.path.join(model_dir, METRICS_NAME), history)
        writer = tf.summary.create_file_writer(os.path.join(model_dir, TENSORBOARD_DIR))
    preprocess_on = resolve_preprocess_on(config.preprocess_on)
    bucket_spec = None
    if config.jit_compile:
        bucket_spec = buckets_lib.BucketSpec(config.slice_buckets, config.size_buckets)
    on_device = preprocess_on == "device"
    train_step = _make_train_step(
        model,
        optimizer,
        strategy,
        config.jit_compile,
        device_input=config.input if on_device else None,
        bucket_spec=bucket_spec,
    )
    val_dataset = validation.validation_dataset(
        config.data_dir, config.val_split, config.input, preprocess_on=preprocess_on
    )
    callbacks = keras.callbacks.CallbackList(list(extra_callbacks or []), model=model)
    model.stop_training = False

    def dataset_fn(epoch, input_context):
        replicas_per_pipeline = max(
            1, input_context.num_replicas_in_sync // input_context.num_input_pipelines
        )
        ds = input_pipeline.make_dataset(
            config.data_dir,
            "train",
            config.input,
            training=True,
            exam_ids=info.train_exam_ids,
            input_context=input_context,
            repeat=True,
            # Exactly this epoch's exams for this pipeline: nothing read ahead into the next.
            num_exams=steps * replicas_per_pipeline,
            # One seeded stream per epoch: a resumed epoch sees what the original run would.
            seed=config.seed * 100_003 + epoch,
            preprocess_on=preprocess_on,
        )
        if bucket_spec is not None and not on_device:
            ds = ds.map(buckets_lib.bucket_map_fn(bucket_spec), num_parallel_calls=tf.data.AUTOTUNE)
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
        scored = validation.predict_split(
            model, config.data_dir, config.val_split, config.input, dataset=val_dataset
        )
        logs = {
            "loss": float(losses.mean()),
            **validation.validation_metrics(scored.labels, scored.probs),
        }
        val_seconds = time.time() - val_started
        improved = validation.is_improvement(
            logs["val_malignant_auc"], best_auc, logs["val_loss"], best_loss
        )
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
                portable = model_lib.build_model(
                    export_lib.serving_model_config(config.model), config.input.channels
                )
            export_lib.copy_weights(model, portable)
            portable.save(run_dir_lib.candidate_path(model_dir, epoch + 1))
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
            run_dir_lib.settle_best_model(model_dir, best_epoch)
            run_dir_lib.write_metrics_csv(os.path.join(model_dir, METRICS_NAME), history)
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


def resolve_preprocess_on(preprocess_on: str) -> str:
    """``TrainConfig.preprocess_on`` with "auto" resolved: "device" when TensorFlow sees a
    GPU, else "cpu" (on a CPU-only machine both placements share the same cores, and the tf.data
    map overlaps the step)."""
    if preprocess_on != "auto":
        return preprocess_on
    return "device" if tf.config.list_physical_devices("GPU") else "cpu"


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


def _export_best(config, best_path, export_dir, best_epoch, best_auc) -> None:
    from mri_keras import inference

    # A temperature scaling fitted on this best.keras (evaluate --calibrate) stays built in.
    calibration = inference.model_calibration(
        inference.ModelLocation(None, best_path, config.model_dir), "keras"
    )
    meta = export_lib.read_metadata(export_dir)
    if (
        meta
        and meta.get("best_epoch") == best_epoch
        and meta.get("run") == config.model_dir
        and meta.get("signatures") == list(export_lib.SIGNATURES)
        and meta.get("calibration") == (calibration.to_dict() if calibration else None)
    ):
        return  # Already exported (a rerun of a finished run), with today's signatures.
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
        calibration=calibration,
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
        f"crop_slices={config.input.crop_slices}, preprocessing on "
        f"{resolve_preprocess_on(config.preprocess_on)}",
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
        f"(signatures {', '.join(export_lib.SIGNATURES)})",
        f"  metrics:      {os.path.join(d, METRICS_NAME)}",
        f"  checkpoints:  {os.path.join(d, CHECKPOINT_DIR)}",
        f"  TensorBoard:  tensorboard --logdir {os.path.join(d, TENSORBOARD_DIR)}",
        f"  settings:     {os.path.join(d, CONFIG_NAME)}",
    ]
    return "\n".join(lines)
