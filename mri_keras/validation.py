"""Prediction over a whole split, the validation metrics, and the model-selection rule.

`predict_split` is the one function that scores every exam of a split: training calls it after
every epoch, `mri_keras.evaluate` on the split it reports. It reads the records through tf.data
(`input_pipeline.make_dataset`, unaugmented) and never leaves tensors for numpy per exam.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import tensorflow as tf

from mri_keras import constants, input_pipeline, predictions_io, preprocessing, tta
from mri_keras import metrics as metrics_lib
from tfrecords_tools import schema

_PREDICT_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_predict_cache() -> None:
    """Drops the compiled prediction functions kept per model (a sweep frees each trial's)."""
    _PREDICT_FNS.clear()
    _DEVICE_PREPROCESS.clear()


def _predict_fn(model, tta_mode: str = "none"):
    fns = _PREDICT_FNS.setdefault(model, {})
    fn = fns.get(tta_mode)
    if fn is None:
        # A weak reference: a value that held the model strongly would keep its key (and every
        # trained model) alive for the life of the process.
        model_ref = weakref.ref(model)
        channels = model.inputs[0].shape[-1]  # One per input variant (InputConfig.channels).

        def probs(volume):
            out = model_ref()(volume, training=False)
            # (batch, 4): probability of the positive class of each head, LABELS order.
            return tf.stack([tf.cast(out[k][:, 1], tf.float32) for k in constants.LABELS], -1)

        @tf.function(
            input_signature=[tf.TensorSpec([None, None, None, None, channels], tf.float32)]
        )
        def fn(volume):
            return tta.averaged(probs, volume, tta_mode)

        fns[tta_mode] = fn
    return fn


def validation_dataset(
    records_dir: str, split: str, input_config, *, exam_ids=None, preprocess_on: str = "cpu"
):
    """The dataset ``predict_split`` reads: every exam of a split, unaugmented, with ids;
    with ``preprocess_on="device"`` its stored phases, preprocessed where the model runs."""
    return input_pipeline.make_dataset(
        records_dir,
        split,
        input_config,
        training=False,
        exam_ids=exam_ids,
        with_ids=True,
        preprocess_on=preprocess_on,
    )


_DEVICE_PREPROCESS: dict = {}


def _device_preprocess(input_config):
    """``preprocessing.preprocess_batch`` (no augmentation) as a tf.function per input config:
    the validation step's half of ``--preprocess_on=device``, the definition training uses."""
    fn = _DEVICE_PREPROCESS.get(input_config)
    if fn is None:
        fn = tf.function(
            lambda batch: preprocessing.preprocess_batch(batch, input_config, augment=False),
            reduce_retracing=True,
        )
        _DEVICE_PREPROCESS[input_config] = fn
    return fn


def predict_split(
    model,
    records_dir,
    split: str,
    input_config=None,
    *,
    exam_ids=None,
    dataset=None,
    batch_size: int = 8,
    tta_mode: str | None = None,
) -> predictions_io.Predictions:
    """Scores every exam of a split (no augmentation), in manifest order.

    The one prediction path over records: training validates with it after every epoch and
    ``mri_keras.evaluate`` reports with it.

    Args:
      model: a keras.Model from ``model.build_model`` (or a loaded best.keras; needs
        ``input_config``), or an ``inference.Predictor``. A Predictor backed by a SavedModel is
        run through the export's own ``serving_example`` signature on batches of serialized
        records (the export's preprocessing, as a user of the export would call it); one
        backed by a Keras model goes through ``input_pipeline.make_dataset`` with the input
        config it was trained with.
      records_dir: str (or an open ``Records``). Records directory.
      split: str. "train", "val" or "test".
      input_config: InputConfig, for a keras.Model. Only the input variant and normalisation
        matter.
      exam_ids: optional sequence of exam ids to keep. Defaults to all.
      dataset: optional dataset ``validation_dataset`` built for these arguments, reused
        (a training run predicts the same split after every epoch). Defaults to a new one.
      batch_size: int. Serialized records per ``serving_example`` call (export only).
      tta_mode: optional str. Test-time augmentation (`mri_keras.tta`): "none" (training
        validates so) or "flip" (each exam also scored mirrored; an export through its
        ``serving_example_flip``). Defaults to a Predictor's own ``tta_mode``, else "none".

    Returns:
      ``Predictions``: exam and patient pseudonyms, int64 ``(N, 4)`` labels and ``(N, 4)``
      positive-class probabilities, in ``constants.LABELS`` order.
    """
    if tta_mode is None:
        tta_mode = getattr(model, "tta_mode", "none")
    tta.check_mode(tta_mode)
    if getattr(model, "source", None) == "export":
        return _predict_export(model, records_dir, split, exam_ids, batch_size, tta_mode)
    if getattr(model, "source", None) == "keras":
        model, input_config = model.keras_model, model.input_config
    if input_config is None:
        raise ValueError("predict_split needs the input_config of a Keras model.")
    ds = dataset
    if ds is None:
        ds = validation_dataset(records_dir, split, input_config, exam_ids=exam_ids)
    fn = _predict_fn(model, tta_mode)
    ids, pids, labels, probs = [], [], [], []
    for volume, targets, meta in ds:
        if isinstance(volume, dict):  # Stored phases (validation_dataset(preprocess_on="device")).
            volume = _device_preprocess(input_config)(volume)
        probs.append(fn(volume).numpy())
        positive = [targets[k][:, 1].numpy() for k in constants.LABELS]
        labels.append(np.stack(positive, -1).round().astype(np.int64))
        ids.extend(v.decode() for v in meta["exam_id"].numpy())
        pids.extend(v.decode() for v in meta["patient_id"].numpy())
    return _predictions(ids, pids, labels, probs)


def _predict_export(predictor, records_dir, split, exam_ids, batch_size, tta_mode):
    from mri_keras import export

    serving = export.signature(
        predictor.saved_model, predictor.location.export_dir, "serving_example", tta_mode
    )
    records = input_pipeline.serialized_records(
        records_dir, split, predictor.input_config.input_variant, exam_ids=exam_ids
    )
    spec = {
        schema.KEY_PATIENT_ID: tf.io.FixedLenFeature([], tf.string),
        schema.KEY_LABELS: tf.io.FixedLenFeature([len(constants.LABELS)], tf.int64),
    }
    ids, pids, labels, probs = [], [], [], []
    for batch in records.batch(batch_size):
        out = serving(examples=batch)
        parsed = tf.io.parse_example(batch, spec)
        # The model's own probabilities (an export written with a calibration scales
        # "probabilities"; evaluate reports both scales itself).
        probs.append(out.get("probabilities_uncalibrated", out["probabilities"]).numpy())
        labels.append(parsed[schema.KEY_LABELS].numpy())
        ids.extend(v.decode() for v in out["exam_id"].numpy())
        pids.extend(v.decode() for v in parsed[schema.KEY_PATIENT_ID].numpy())
    return _predictions(ids, pids, labels, probs)


def _predictions(ids, pids, labels, probs) -> predictions_io.Predictions:
    if not probs:
        labels, probs = [np.zeros((0, 4), np.int64)], [np.zeros((0, 4), np.float32)]
    return predictions_io.Predictions(
        tuple(ids), tuple(pids), np.concatenate(labels), np.concatenate(probs)
    )


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
