"""The optimizer of a training run: Adam with a learning-rate schedule (linear warm-up, then
constant or cosine decay), wrapped for loss scaling under mixed precision."""

from __future__ import annotations

import math

import keras

from mri_keras.train_config import LR_SCHEDULES, TrainConfig


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


def make_optimizer(config: TrainConfig, steps_per_epoch: int):
    """Adam with ``make_learning_rate``; loss-scaled under the mixed_float16 policy."""
    optimizer = keras.optimizers.Adam(learning_rate=make_learning_rate(config, steps_per_epoch))
    if config.model.dtype_policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
