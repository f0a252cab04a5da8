"""Loading a trained model for inference: from a MODEL_DIR, its export/ SavedModel, or best.keras.

Both evaluation (`mri_keras.evaluate`, over TFRecords) and prediction on a new DICOM exam
(`mri_keras.predict`) go through a `Predictor`, which maps the raw canonical phases of one exam
(float32 ``(S, H, W)`` each, as `tfrecords_tools.dicom_reader.load_exam` and
`tfrecords_tools.schema.decode_example` return them) to four probabilities in
``constants.LABELS`` order. Preprocessing (input variant and normalisation) is the model's own:
inside the SavedModel's ``serving_default``, or `input_pipeline.preprocess` with the input
config the model was trained with (MODEL_DIR/config.json) for a Keras model. Both paths give
the same numbers for the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np

from mri_keras import config as config_lib
from mri_keras import constants

SAVED_MODEL_PB = "saved_model.pb"
MODEL_FORMATS = ("auto", "export", "keras")


@dataclasses.dataclass(frozen=True)
class ModelLocation:
    """Where a model's pieces live.

    Attributes:
      export_dir: Optional[str]. SavedModel directory, if any.
      keras_path: Optional[str]. ``.keras`` file, if any.
      model_dir: Optional[str]. The training run's directory (holds config.json), if known.
    """

    export_dir: str | None
    keras_path: str | None
    model_dir: str | None


def locate_model(path: str) -> ModelLocation:
    """Resolves ``--model``: a MODEL_DIR, its ``export/`` SavedModel, or a ``.keras`` file.

    A SavedModel has no intermediate layers, so saliency maps need the Keras model; it is found
    next to the export (``MODEL_DIR/best.keras`` when ``path`` is ``MODEL_DIR/export``).

    Raises:
      FileNotFoundError: ``path`` holds neither a SavedModel nor a ``.keras`` model.
    """
    path = os.path.abspath(path.rstrip("/") or "/")
    if os.path.isfile(path) and path.endswith(".keras"):
        model_dir = os.path.dirname(path)
        export = os.path.join(model_dir, constants.EXPORT_DIR)
        return ModelLocation(
            export_dir=export if os.path.isfile(os.path.join(export, SAVED_MODEL_PB)) else None,
            keras_path=path,
            model_dir=model_dir,
        )
    if os.path.isfile(os.path.join(path, SAVED_MODEL_PB)):
        parent = os.path.dirname(path)
        keras_path = os.path.join(parent, constants.BEST_MODEL_NAME)
        has_run = os.path.isfile(os.path.join(parent, constants.CONFIG_NAME)) or os.path.isfile(
            keras_path
        )
        return ModelLocation(
            export_dir=path,
            keras_path=keras_path if os.path.isfile(keras_path) else None,
            model_dir=parent if has_run else None,
        )
    export = os.path.join(path, constants.EXPORT_DIR)
    keras_path = os.path.join(path, constants.BEST_MODEL_NAME)
    has_export = os.path.isfile(os.path.join(export, SAVED_MODEL_PB))
    has_keras = os.path.isfile(keras_path)
    if has_export or has_keras:
        return ModelLocation(
            export_dir=export if has_export else None,
            keras_path=keras_path if has_keras else None,
            model_dir=path,
        )
    raise FileNotFoundError(
        f"No model at {path!r}: expected a training MODEL_DIR (with {constants.EXPORT_DIR}/ or "
        f"{constants.BEST_MODEL_NAME}), an exported SavedModel directory (with {SAVED_MODEL_PB}) "
        "or a .keras file."
    )


def load_input_config(location: ModelLocation) -> config_lib.InputConfig:
    """The input config a model was trained with.

    Read from the two files the project writes: the export's
    ``assets.extra/mri_keras.json`` (key ``input_config``, written by ``mri_keras.export``),
    else ``MODEL_DIR/config.json`` (key ``input``, written by training).

    Raises:
      FileNotFoundError: neither file exists or holds its key (the message names both).
      ValueError: a file is not valid JSON, or holds an invalid input config.
    """
    sources = []
    if location.export_dir:
        sources.append(
            (os.path.join(location.export_dir, constants.EXPORT_METADATA_PATH), "input_config")
        )
    if location.model_dir:
        sources.append((os.path.join(location.model_dir, constants.CONFIG_NAME), "input"))
    for path, key in sources:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            try:
                saved = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if isinstance(saved, Mapping) and isinstance(saved.get(key), Mapping):
            try:
                return config_lib.from_saved(config_lib.InputConfig, saved[key])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: {key!r} is not a valid input config: {e}") from None
    directory = location.model_dir or location.export_dir or "the model"
    expected = " or ".join(f"{path} (with an {key!r} object)" for path, key in sources)
    raise FileNotFoundError(
        f"Cannot tell which input variant / preprocessing the model in {directory} expects: "
        f"expected {expected or 'an export or a training run directory'}."
    )


def _positive_probs(outputs: Mapping) -> np.ndarray:
    """(4,) p(positive) in LABELS order from a dict of per-head outputs."""
    probs = np.zeros(len(constants.LABELS), np.float64)
    for i, label in enumerate(constants.LABELS):
        if label not in outputs:
            raise KeyError(f"Model output lacks head {label!r}; it has {sorted(outputs)}")
        value = np.asarray(outputs[label], np.float64).reshape(-1)
        if value.size == 2:  # softmax over (negative, positive)
            probs[i] = value[1]
        elif value.size == 1:  # already p(positive)
            probs[i] = value[0]
        else:
            raise ValueError(
                f"Head {label!r} returned shape {np.shape(outputs[label])}; "
                "expected one exam's 2-way softmax."
            )
    return probs


class Predictor:
    """Maps raw phases of one exam to p(positive) per label.

    Attributes:
      input_config: InputConfig the model was trained with.
      phases: tuple of phase names the model reads.
      source: str. "export" or "keras".
      location: ModelLocation.
      tta_mode: str. Test-time augmentation of every call (`mri_keras.tta`): "none" or "flip".
      calibration: Optional[``calibration.Calibration``]. The temperatures saved with the
        model (`model_calibration`), or None. Calls return the model's own probabilities;
        `mri_keras.predict` applies this.
      saved_model: the loaded SavedModel (source "export"), else absent.
      keras_model: the loaded keras.Model (source "keras"), else absent.
    """

    def __init__(self, location: ModelLocation, model_format: str = "auto", tta_mode="none"):
        from mri_keras import tta

        self.tta_mode = tta.check_mode(tta_mode)
        if model_format not in MODEL_FORMATS:
            raise ValueError(
                f"model_format must be one of {MODEL_FORMATS}. "
                f"Received: model_format={model_format!r}"
            )
        self.location = location
        self.input_config = load_input_config(location)
        self.phases = constants.phases_needed(self.input_config.input_variant)
        use_export = location.export_dir is not None and model_format in ("auto", "export")
        if model_format == "export" and location.export_dir is None:
            raise FileNotFoundError(f"No exported SavedModel found for {location}")
        if model_format == "keras" and location.keras_path is None:
            raise FileNotFoundError(f"No {constants.BEST_MODEL_NAME} found for {location}")
        self.source = "export" if use_export else "keras"
        if use_export:
            self._init_export(location.export_dir)
        else:
            self.keras_model = load_keras_model(location.keras_path)
            self._keras_fn = None
        self.calibration = model_calibration(location, self.source)

    def _init_export(self, export_dir: str):
        import tensorflow as tf

        from mri_keras import export

        self.saved_model = tf.saved_model.load(export_dir)
        self._serving = export.signature(
            self.saved_model, export_dir, "serving_default", self.tta_mode
        )
        _, kwargs = self._serving.structured_input_signature
        self._serving_inputs = tuple(kwargs)
        unknown = [k for k in self._serving_inputs if k not in constants.PHASES]
        if unknown:
            raise ValueError(
                f"{export_dir}: serving_default inputs {self._serving_inputs} are not "
                f"phase names {constants.PHASES}"
            )
        # An export's own signature is the truth about which phases it reads.
        self.phases = tuple(p for p in constants.PHASES if p in self._serving_inputs)

    def saliency_model(self):
        """The Keras model (``best.keras``) that heatmaps differentiate, loaded once.

        Raises:
          FileNotFoundError: no ``.keras`` model next to the export.
        """
        if self.source == "keras":
            return self.keras_model
        if self.location.keras_path is None:
            raise FileNotFoundError(
                f"Heatmaps need the Keras model ({constants.BEST_MODEL_NAME}) next to the "
                f"export ({self.location.model_dir or self.location.export_dir}): a SavedModel "
                "has no intermediate layers to compute Grad-CAM on."
            )
        if getattr(self, "_saliency_model", None) is None:
            self._saliency_model = load_keras_model(self.location.keras_path)
        return self._saliency_model

    def __call__(self, phases: Mapping[str, np.ndarray]) -> np.ndarray:
        """Returns float64 (4,) probabilities for one exam's raw phases ``{phase: (S,H,W)}``."""
        import tensorflow as tf

        missing = [p for p in self.phases if p not in phases]
        if missing:
            raise KeyError(f"The model needs phase(s) {missing}; got {sorted(phases)}")
        if self.source == "export":
            feed = {p: tf.convert_to_tensor(phases[p], tf.float32) for p in self.phases}
            out = self._serving(**feed)
            if "probabilities_uncalibrated" in out:  # The model's own, as the Keras path.
                return np.asarray(out["probabilities_uncalibrated"], np.float64)
            return _positive_probs(out)
        volume = preprocess_phases(phases, self.input_config)[tf.newaxis]  # (1, S, H, W, C)
        if self._keras_fn is None:
            from mri_keras import tta

            model, mode = self.keras_model, self.tta_mode

            def probs(x):
                out = model(x, training=False)
                return tf.stack([out[k][:, 1] for k in constants.LABELS], -1)

            self._keras_fn = tf.function(
                lambda x: tta.averaged(probs, x, mode), reduce_retracing=True
            )
        return np.asarray(self._keras_fn(volume)[0], np.float64)


def model_calibration(location: ModelLocation, source: str):
    """The temperature scaling saved with a model (``evaluate --calibrate``), or None.

    An export carries the one it was written with (its metadata); otherwise
    ``MODEL_DIR/calibration.json`` counts when it is newer than ``best.keras`` (one fitted
    before the weights last changed is stale and ignored).

    Raises:
      ValueError: the file or the metadata holds no valid calibration (named).
    """
    from mri_keras import calibration as calibration_lib

    if source == "export":
        path = os.path.join(location.export_dir, constants.EXPORT_METADATA_PATH)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            saved = json.load(f).get("calibration")
        return None if saved is None else calibration_lib.from_dict(saved, path)
    directory = location.model_dir or os.path.dirname(location.keras_path)
    path = os.path.join(directory, calibration_lib.FILENAME)
    if not os.path.isfile(path):
        return None
    if location.keras_path and os.path.getmtime(path) < os.path.getmtime(location.keras_path):
        return None
    return calibration_lib.load_calibration(path)


def preprocess_phases(phases: Mapping[str, np.ndarray], input_config):
    """`input_pipeline.preprocess` on numpy/tensor phases; returns a (S, H, W, C) tensor
    (C = ``input_config.channels``)."""
    import tensorflow as tf

    from mri_keras import input_pipeline

    tensors = {
        p: tf.convert_to_tensor(phases[p], tf.float32)
        for p in constants.phases_needed(input_config.input_variant)
    }
    return input_pipeline.preprocess(tensors, input_config)


def load_keras_model(path: str):
    """Loads a ``.keras`` model written by training (registers mri_keras layers first)."""
    import keras

    from mri_keras import model as _model_lib  # noqa: F401  (registers custom layers)

    return keras.saving.load_model(path, compile=False)


def load_predictor(path: str, model_format: str = "auto", tta_mode: str = "none") -> Predictor:
    """Resolves ``path`` (see `locate_model`) and returns a `Predictor` scoring with
    test-time augmentation ``tta_mode`` (`mri_keras.tta`)."""
    return Predictor(locate_model(path), model_format, tta_mode)
