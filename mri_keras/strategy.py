"""Picks the `tf.distribute` strategy a training run uses.

``one_device`` trains on the first GPU (or the CPU), ``mirrored`` on every visible GPU (or on
``cpu_replicas`` logical CPU devices, for tests and CPU machines), ``multi_worker`` on every
worker named in ``TF_CONFIG`` (each worker mirrors its own GPUs, or ``cpu_replicas`` CPUs), and
``auto`` chooses: ``multi_worker`` when ``TF_CONFIG`` names more than one task, ``mirrored``
with more than one GPU (or ``cpu_replicas > 1``), ``one_device`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import tensorflow as tf

from mri_keras.constants import STRATEGIES


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """Where this process sits in a (possibly single-process) run.

    Attributes:
      task_type: str or None. ``TF_CONFIG`` task type ("chief"/"worker"), None outside
        multi-worker runs.
      task_id: int. Index of the task within its type.
      is_chief: bool. Whether this process writes the run's outputs (metrics, best model,
        export, TensorBoard) and the checkpoints in the model directory.
    """

    task_type: object = None
    task_id: int = 0
    is_chief: bool = True


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw!r}") from None


def _num_tasks(tf_config: dict) -> int:
    cluster = tf_config.get("cluster", {})
    return sum(len(v) for k, v in cluster.items() if k in ("chief", "worker"))


def configure_cpu_replicas(count: int) -> list:
    """Splits the CPU into ``count`` logical devices; returns the logical CPU devices to use.

    Logical devices can only be configured before TensorFlow's runtime starts. When it has
    already started (a second run in one process), the existing logical CPUs are reused if
    there are enough of them.

    Raises:
      ValueError: the runtime already started with fewer logical CPUs than ``count``.
    """
    if count < 1:
        raise ValueError(f"cpu_replicas must be >= 1. Received: cpu_replicas={count}")
    cpus = tf.config.list_physical_devices("CPU")
    if count > 1 and len(tf.config.get_logical_device_configuration(cpus[0]) or []) < count:
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
            )
        except RuntimeError:
            pass  # Runtime already initialised: check below what we have.
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < count:
        raise ValueError(
            f"cpu_replicas={count} needs {count} logical CPU devices, but TensorFlow already "
            f"started in this process with {len(logical)}. Run training in a fresh process "
            "(e.g. `python -m mri_keras.train ...`)."
        )
    return logical[:count]


def make_strategy(name: str, cpu_replicas: int = 1):
    """Builds the strategy; call it before any other TensorFlow work in the process.

    Args:
      name: str. One of ``STRATEGIES``.
      cpu_replicas: int. Logical CPU replicas per worker when no GPU is visible. Defaults to 1.

    Returns:
      ``(strategy, WorkerRole)``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. Received: strategy={name!r}")
    tf_config = _tf_config()
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        if _num_tasks(tf_config) > 1:
            name = "multi_worker"
        elif len(gpus) > 1 or (not gpus and cpu_replicas > 1):
            name = "mirrored"
        else:
            name = "one_device"

    if name == "one_device":
        if cpu_replicas != 1 and not gpus:
            raise ValueError(
                f"strategy=one_device trains on one device; cpu_replicas={cpu_replicas} "
                "needs --strategy=mirrored (or auto)."
            )
        device = "/gpu:0" if gpus else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device), WorkerRole()

    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy(), WorkerRole()
        devices = [d.name for d in configure_cpu_replicas(cpu_replicas)]
        return tf.distribute.MirroredStrategy(devices=devices), WorkerRole()

    # multi_worker
    if not tf_config or "task" not in tf_config or not tf_config.get("cluster"):
        raise ValueError(
            "strategy=multi_worker reads the cluster from the TF_CONFIG environment variable, "
            'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\'. '
            f"Received: TF_CONFIG={os.environ.get('TF_CONFIG', '')!r}"
        )
    if not gpus and cpu_replicas > 1:
        configure_cpu_replicas(cpu_replicas)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    # Keras/TF convention: the chief (or worker 0 when there is no chief) writes the outputs.
    has_chief = "chief" in tf_config.get("cluster", {})
    is_chief = task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)
    return strategy, WorkerRole(task_type, task_id, is_chief)


def worker_write_dir(directory: str, role: WorkerRole) -> str:
    """Directory this worker writes ``directory``'s files to (TF multi-worker convention).

    The chief writes to ``directory`` itself; other workers write to a private temporary
    directory (they must take part in every save, but their copies are thrown away).
    """
    if role.is_chief:
        return directory
    return tempfile.mkdtemp(prefix=f"mri_keras_{role.task_type}_{role.task_id}_")


def describe(strategy) -> str:
    """One line naming the strategy, its replicas and their devices."""
    kind = type(strategy).__name__
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        kind = "MultiWorkerMirroredStrategy"  # Its class is called CollectiveAllReduceStrategy.
    devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
    return f"{kind}, {strategy.num_replicas_in_sync} replica(s) in sync, devices: {devices}"
