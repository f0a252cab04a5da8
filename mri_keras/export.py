"""SavedModel export of a trained model, with the training preprocessing built in.

Signatures of ``MODEL_DIR/export`` (``tf.saved_model.load(path).signatures[...]``):

``serving_default``
  One exam as the raw phases its input variant reads, keyword arguments named after the
  phases (``t0=..., t2=...`` for ``t2-t0``), each float32 ``[S, H, W]`` in canonical
  orientation (slice toward Superior, row toward Posterior, col toward the patient's Left),
  voxel values rescaled as in the records. Applies ``input_pipeline.preprocess`` (input variant
  + normalisation), exactly as training did. Returns ``probabilities`` float32 ``[4]`` in
  ``constants.LABELS`` order and one float32 scalar per label (``left_malignant``, ...).

``serving_example``
  ``examples``: a 1-D batch ``[N]`` of serialized ``tf.train.Example`` records of the
  ``tfrecords_tools.schema`` format (each exam of its own shape; wrap a single record as
  ``[record]``). Returns ``probabilities`` ``[N, 4]``, ``exam_id`` ``[N]`` (the records'
  pseudonyms) and one ``[N]`` vector per label. A record of another schema version, or one
  lacking a needed phase, fails with an error naming it.

``serving_default_flip``, ``serving_example_flip``
  The same inputs and outputs, with left-right flip test-time augmentation (`mri_keras.tta`):
  each exam scored as it is and mirrored, the mirrored exam's sides put back, the two
  averaged. ``python -m mri_keras.predict --tta=flip`` and ``evaluate --tta=flip`` call them.

``assets.extra/mri_keras.json`` records the input variant, phases, labels, model and input
configuration and the epoch exported; :func:`load_exported` reads it back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from mri_keras import config as config_lib
from mri_keras import constants, input_pipeline, tta
from mri_keras import model as model_lib
from tfrecords_tools import schema

SIGNATURES = ("serving_default", "serving_example", "serving_default_flip", "serving_example_flip")


def signature_name(base: str, tta_mode: str = "none") -> str:
    """The signature serving ``base`` ("serving_default" or "serving_example") under a
    test-time augmentation mode: ``serving_example`` + flip -> ``serving_example_flip``."""
    return base if tta.check_mode(tta_mode) == "none" else f"{base}_{tta_mode}"


def signature(saved_model, export_dir: str, base: str, tta_mode: str = "none"):
    """The concrete function of ``signature_name(base, tta_mode)`` in a loaded SavedModel.

    Raises:
      ValueError: the export lacks it (written by an older version), naming what it has.
    """
    name = signature_name(base, tta_mode)
    signatures = saved_model.signatures
    if name not in signatures:
        raise ValueError(
            f"{export_dir} has no {name} signature (has {sorted(signatures)}): it was exported "
            "by an older version; rerun the run's `python -m mri_keras.train` command (a "
            "finished run then only writes its export again), or evaluate best.keras "
            "(--model_format=keras)."
        )
    return signatures[name]


def serving_model_config(model_config: config_lib.ModelConfig) -> config_lib.ModelConfig:
    """The architecture a trained model is saved and served in: float32, no recomputation
    (mixed precision and slice-chunked recomputation are training-time trade-offs; the weights
    and the forward pass are the same)."""
    return dataclasses.replace(model_config, dtype_policy="float32", remat_chunk=0)


def copy_weights(source, target) -> None:
    """Assigns ``source``'s weights to ``target`` by variable path (e.g. from a mixed-precision,
    recomputing or distributed training model into its serving model).

    Raises:
      ValueError: the two models do not hold the same variables.
    """
    by_path = {v.path: v for v in source.weights}
    target_paths = sorted(v.path for v in target.weights)
    if sorted(by_path) != target_paths:
        raise ValueError(
            "Models differ in their variables: only in source "
            f"{sorted(set(by_path) - set(target_paths))[:5]}, only in target "
            f"{sorted(set(target_paths) - set(by_path))[:5]}"
        )
    for v in target.weights:
        v.assign(by_path[v.path].value)


def export_model(
    model,
    export_dir: str,
    input_config: config_lib.InputConfig,
    *,
    model_config: config_lib.ModelConfig | None = None,
    metadata: dict | None = None,
    calibration=None,
) -> str:
    """Writes ``model`` as a SavedModel with its signatures (atomically replacing export_dir).

    Args:
      model: keras.Model from ``model.build_model`` (float32 policy recommended).
      export_dir: str. Destination directory; an existing export there is replaced.
      input_config: InputConfig. Input variant and normalisation the model was trained with.
      model_config: optional ModelConfig, recorded in the metadata.
      metadata: optional dict of extra JSON values recorded in the metadata.
      calibration: optional ``calibration.Calibration``: every signature's ``probabilities``
        (and per-label outputs) are then temperature-scaled, ``probabilities_uncalibrated``
        keeps the model's own; the metadata records it under ``calibration``.

    Returns:
      export_dir.
    """
    phases = constants.phases_needed(input_config.input_variant)
    labels = constants.LABELS

    def batch_probabilities(volumes):
        # (B, S, H, W, C) -> (B, 4) positive-class probabilities in LABELS order.
        out = model(volumes, training=False)
        return tf.stack([tf.cast(out[k][:, 1], tf.float32) for k in labels], -1)

    from mri_keras import calibration as calibration_lib

    temperature = tf.constant(calibration_lib.temperature_vector(calibration), tf.float32)
    clip = calibration_lib.PROBABILITY_CLIP

    def outputs(raw):
        # (..., 4) -> the signature's outputs: sigmoid(logit(p) / T) per label (T = 1 without a
        # calibration), and the model's own probabilities.
        p = tf.clip_by_value(raw, clip, 1.0 - clip)
        probs = tf.sigmoid((tf.math.log(p) - tf.math.log1p(-p)) / temperature)
        if calibration is None:
            probs = raw
        out = {"probabilities": probs, "probabilities_uncalibrated": raw}
        out.update({k: probs[..., i] for i, k in enumerate(labels)})
        return out

    def serve_phases(*tensors, tta_mode="none"):
        volume = input_pipeline.preprocess(dict(zip(phases, tensors)), input_config)
        return outputs(tta.averaged(batch_probabilities, volume[tf.newaxis], tta_mode)[0])

    def serve_examples(examples, tta_mode="none"):
        def one(serialized):
            parsed = schema.decode_example(serialized, phases)
            ok = tf.debugging.Assert(
                tf.equal(parsed[schema.KEY_SCHEMA_VERSION], schema.SCHEMA_VERSION),
                [
                    f"serving_example reads record schema version {schema.SCHEMA_VERSION}; "
                    "exam and version received:",
                    parsed[schema.KEY_EXAM_ID],
                    parsed[schema.KEY_SCHEMA_VERSION],
                ],
            )
            with tf.control_dependencies([ok]):
                volume = input_pipeline.preprocess({p: parsed[p] for p in phases}, input_config)
            return tta.averaged(batch_probabilities, volume[tf.newaxis], tta_mode)[0]

        probs = tf.map_fn(one, examples, fn_output_signature=tf.TensorSpec([4], tf.float32))
        ids = tf.io.parse_example(
            examples, {schema.KEY_EXAM_ID: tf.io.FixedLenFeature([], tf.string)}
        )[schema.KEY_EXAM_ID]
        return {**outputs(probs), "exam_id": ids}

    archive = keras.export.ExportArchive()
    archive.track(model)
    for mode in tta.MODES:
        archive.add_endpoint(
            signature_name("serving_default", mode),
            functools.partial(serve_phases, tta_mode=mode),
            input_signature=[tf.TensorSpec([None, None, None], tf.float32, name=p) for p in phases],
        )
        archive.add_endpoint(
            signature_name("serving_example", mode),
            functools.partial(serve_examples, tta_mode=mode),
            input_signature=[tf.TensorSpec([None], tf.string, name="examples")],
        )
    tmp = export_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    archive.write_out(tmp, verbose=False)
    meta = {
        "input_variant": input_config.input_variant,
        "phases": list(phases),
        "labels": list(labels),
        "signatures": list(SIGNATURES),
        "schema_version": schema.SCHEMA_VERSION,
        "input_config": json.loads(json.dumps(dataclasses.asdict(input_config))),
        "model_config": (
            json.loads(json.dumps(dataclasses.asdict(model_config))) if model_config else None
        ),
        **(metadata or {}),
        "calibration": calibration.to_dict() if calibration is not None else None,
    }
    os.makedirs(os.path.join(tmp, os.path.dirname(constants.EXPORT_METADATA_PATH)), exist_ok=True)
    with open(os.path.join(tmp, constants.EXPORT_METADATA_PATH), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    # Swap in the complete export; a crash leaves either the old export or export.tmp.
    old = export_dir.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(export_dir):
        os.replace(export_dir, old)
    os.replace(tmp, export_dir)
    shutil.rmtree(old, ignore_errors=True)
    return export_dir


def export_from_keras_file(
    keras_path: str,
    export_dir: str,
    model_config: config_lib.ModelConfig,
    input_config: config_lib.InputConfig,
    *,
    metadata: dict | None = None,
    calibration=None,
) -> str:
    """Exports the weights in ``keras_path`` (e.g. best.keras, saved in the serving
    architecture of ``model_config``) into a float32 model (optionally calibrated)."""
    serving_config = serving_model_config(model_config)
    model = model_lib.build_model(serving_config, input_config.channels)
    model.load_weights(keras_path)
    return export_model(
        model,
        export_dir,
        input_config,
        model_config=serving_config,
        metadata=metadata,
        calibration=calibration,
    )


def recalibrate(export_dir: str, keras_path: str, calibration) -> str:
    """Writes ``export_dir`` again from ``keras_path`` with ``calibration`` built in, keeping
    its input and model configuration and its metadata (``best_epoch``, ``run``...).

    Raises:
      FileNotFoundError: ``export_dir`` is not a complete mri_keras export.
      ValueError: its metadata lacks the model configuration needed to rebuild it.
    """
    meta = read_metadata(export_dir)
    if meta is None:
        raise FileNotFoundError(f"{export_dir} is not a complete mri_keras export.")
    if not meta.get("model_config") or not meta.get("input_config"):
        raise ValueError(f"{export_dir}: its metadata lacks model_config / input_config.")
    model_config = config_lib.from_saved(config_lib.ModelConfig, meta["model_config"])
    input_config = config_lib.from_saved(config_lib.InputConfig, meta["input_config"])
    known = ("input_variant", "phases", "labels", "signatures", "schema_version")
    extra = {
        k: v
        for k, v in meta.items()
        if k not in known + ("input_config", "model_config", "calibration")
    }
    return export_from_keras_file(
        keras_path, export_dir, model_config, input_config, metadata=extra, calibration=calibration
    )


def read_metadata(export_dir: str) -> dict | None:
    """The export's ``assets.extra/mri_keras.json``, or None when there is no complete export."""
    path = os.path.join(export_dir, constants.EXPORT_METADATA_PATH)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        return None
    with open(path) as f:
        return json.load(f)


class ExportedModel:
    """A loaded export: the two signatures plus numpy-friendly helpers.

    Attributes:
      saved: the object ``tf.saved_model.load`` returned.
      metadata: dict from ``assets.extra/mri_keras.json``.
      input_variant: str. e.g. "t2-t0".
      phases: tuple of str. The phases ``serving_default`` takes.
      labels: tuple of str. Order of ``probabilities``.
    """

    def __init__(self, path: str):
        meta = read_metadata(path)
        if meta is None:
            raise FileNotFoundError(
                f"{path} is not an mri_keras export (no saved_model.pb or "
                f"{constants.EXPORT_METADATA_PATH})."
            )
        self.path = path
        self.saved = tf.saved_model.load(path)
        self.metadata = meta
        self.input_variant = meta["input_variant"]
        self.phases = tuple(meta["phases"])
        self.labels = tuple(meta["labels"])

    def predict_phases(
        self, phases: Mapping[str, np.ndarray], tta_mode: str = "none"
    ) -> np.ndarray:
        """Probabilities ``(4,)`` (``labels`` order) of one exam given its raw phases.

        Args:
          phases: mapping phase -> ``(S, H, W)`` array in canonical orientation; must hold
            ``self.phases`` (other phases are ignored).
          tta_mode: "none" or "flip" (`mri_keras.tta`).
        """
        missing = [p for p in self.phases if p not in phases]
        if missing:
            raise ValueError(
                f"This model ({self.input_variant}) needs phases {list(self.phases)}; "
                f"missing {missing}."
            )
        shapes = {p: np.shape(phases[p]) for p in self.phases}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 3:
            raise ValueError(f"Phases must be (S, H, W) arrays of one shape. Received: {shapes}")
        fn = signature(self.saved, self.path, "serving_default", tta_mode)
        out = fn(**{p: tf.constant(np.asarray(phases[p], np.float32)) for p in self.phases})
        return out["probabilities"].numpy()

    def predict_examples(self, examples: Sequence[bytes], tta_mode: str = "none") -> dict:
        """Runs ``serving_example`` (``serving_example_flip`` with ``tta_mode="flip"``) on
        serialized records; returns numpy ``probabilities`` ``(N, 4)`` and ``exam_id`` (list
        of str)."""
        fn = signature(self.saved, self.path, "serving_example", tta_mode)
        out = fn(examples=tf.constant(list(examples), tf.string))
        return {
            "probabilities": out["probabilities"].numpy(),
            "exam_id": [v.decode() for v in out["exam_id"].numpy()],
        }


def load_exported(path: str) -> ExportedModel:
    """Loads ``MODEL_DIR/export`` (or any directory :func:`export_model` wrote)."""
    return ExportedModel(path)
