"""The settings of one training run (`TrainConfig`) and the error for bad input found before
training starts (`SetupError`)."""

from __future__ import annotations

import dataclasses
import json

from mri_keras import buckets as buckets_lib
from mri_keras import config as config_lib
from mri_keras import constants

LR_SCHEDULES = constants.LR_SCHEDULES


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
        ``constants.DEFAULT_SLICE_BUCKETS``.
      size_buckets: tuple of ints. Height/width buckets used with jit_compile. Defaults to
        ``constants.DEFAULT_SIZE_BUCKETS``.
      preprocess_on: str. Where the per-voxel preprocessing (rescale, subtraction,
        normalisation, crop, flip) runs: "cpu" (in tf.data), "device" (tf.data only parses
        the stored phases and draws the augmentation; ``mri_keras.preprocessing`` runs inside
        the train step, on the accelerator) or "auto" (device when TensorFlow sees a GPU, else
        cpu: on a CPU-only machine both run on the same cores and tf.data's parallel map is the
        better place). Same numbers either way (float32 rounding). Defaults to "auto".
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
    slice_buckets: tuple[int, ...] = constants.DEFAULT_SLICE_BUCKETS
    size_buckets: tuple[int, ...] = constants.DEFAULT_SIZE_BUCKETS
    preprocess_on: str = "auto"
    overwrite: bool = False
    init_weights: str = ""
    val_split: str = "val"
    verbose: int = 2

    def __post_init__(self):
        # ConfigError names the field; the flag layer re-words it with the flag's name.
        ConfigError = config_lib.ConfigError  # noqa: N806
        for name in ("data_dir", "model_dir"):
            if not getattr(self, name):
                raise ConfigError(name, "a directory path (required)", getattr(self, name))
        config_lib.check_int(self, "epochs", 1)
        if not (config_lib.is_real(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError("learning_rate", "a number > 0", self.learning_rate)
        config_lib.check_choice(self, "lr_schedule", LR_SCHEDULES)
        if not (config_lib.is_real(self.warmup_epochs) and self.warmup_epochs >= 0.0):
            raise ConfigError("warmup_epochs", "a number >= 0", self.warmup_epochs)
        if not (config_lib.is_real(self.train_fraction) and 0.0 < self.train_fraction <= 1.0):
            raise ConfigError("train_fraction", "a number in (0, 1]", self.train_fraction)
        config_lib.check_choice(self, "strategy", constants.STRATEGIES)
        config_lib.check_int(self, "cpu_replicas", 1)
        # Validates (ConfigError) and normalises (sorted, distinct) the buckets.
        spec = buckets_lib.BucketSpec(tuple(self.slice_buckets), tuple(self.size_buckets))
        object.__setattr__(self, "slice_buckets", spec.slice_buckets)
        object.__setattr__(self, "size_buckets", spec.size_buckets)
        config_lib.check_choice(self, "val_split", ("val", "test"))
        config_lib.check_choice(self, "preprocess_on", constants.PREPROCESS_ON)

    def to_json_dict(self) -> dict:
        """The settings as plain JSON values (what config.json holds)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))
