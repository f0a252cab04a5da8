"""Data checks before training: the records can feed the run (`inspect_data`), and the seeded
subsample of training patients of the data-size experiment (`select_train_exams`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from mri_keras import constants
from mri_keras.train_config import SetupError, TrainConfig
from tfrecords_tools import schema
from tfrecords_tools.records import Records


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


# A whole-split shuffle buffer may take at most this fraction of the machine's memory.
WHOLE_SPLIT_BUFFER_MEMORY_FRACTION = 0.25


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_whole_split_buffer(shard_paths: Sequence[str], data_dir: str) -> None:
    """shuffle_buffer=0 holds every training record in memory: refuse it where it won't fit."""
    size = sum(os.path.getsize(path) for path in shard_paths)
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
    variant = config.input.input_variant
    needed = constants.phases_needed(variant)
    try:
        records = Records.open(data_dir, name="data_dir")
        records.check_phases(needed, f"Input variant {variant!r} (--input)")
        counts = records.counts()
        shards = {}
        for split in ("train", config.val_split):
            if not counts[split]:
                raise SetupError(
                    f"Split {split!r} of {data_dir!r} has no exams (manifest counts: {counts}); "
                    + (
                        "training needs training exams."
                        if split == "train"
                        else "model selection needs a validation split: convert with val patients."
                    )
                )
            shards[split] = records.shard_paths(split)
        record = records.first_record("train")
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, SetupError):
            raise
        raise SetupError(str(e)) from None
    record_missing = [p for p in needed if p not in record[schema.KEY_PHASES]]
    if record_missing:
        raise SetupError(
            f"Input variant {variant!r} needs phases {list(needed)}, but exam "
            f"{record[schema.KEY_EXAM_ID]} in {data_dir!r} stores only "
            f"{list(record[schema.KEY_PHASES])}."
        )
    if config.input.shuffle_buffer == 0:
        _check_whole_split_buffer(shards["train"], data_dir)
    train_exams = records.exams("train")
    if train_exams is None:
        if config.train_fraction < 1.0:
            raise SetupError(
                f"train_fraction={config.train_fraction} needs the per-exam list of the "
                f"manifest ('splits.train.exams'), which {data_dir!r} lacks."
            )
        ids, patients = None, int(records.split_entry("train").get("num_patients", 0))
    else:
        ids, patients = select_train_exams(train_exams, config.train_fraction, config.seed)
    num_train = len(ids) if ids is not None else counts["train"]
    return DataInfo(records.manifest, ids, num_train, patients, counts[config.val_split], counts)
