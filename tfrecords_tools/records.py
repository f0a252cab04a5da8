"""Reading a converted records directory: the one place that goes manifest -> shards -> records.

Training (`mri_keras.train_data`), the input pipeline, evaluation and ``tfrecords_tools.inspect``
all open a records directory through :class:`Records`, so each check (the manifest's schema
version, the phases an input needs, a split with shards, every listed shard present) is written
once and reports the same way everywhere::

    records = Records.open("RECORDS")
    records.check_phases(("t0", "t2"), "Input variant 't2-t0'")
    paths = records.shard_paths("train")      # manifest order; every file checked
    for split, record in records.iter_numpy(("val",)):
        ...                                   # schema.decode_example_numpy dicts

Errors: ``FileNotFoundError`` for a missing directory, manifest or listed shard file;
:class:`RecordsError` (a ``ValueError``) for everything else (schema version, unknown or empty
split, missing phases, unreadable shard). Each message names the directory (or file), the split
and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

from tfrecords_tools import schema

CONVERT_HINT = "convert DICOM exams into it first with `python -m tfrecords_tools.convert`"


class RecordsError(ValueError):
    """A records directory cannot serve what was asked of it (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Records:
    """A converted records directory and its manifest.

    Attributes:
      directory: str. The directory (as given).
      manifest: dict. Its ``manifest.json`` (schema version checked).
    """

    directory: str
    manifest: dict

    @classmethod
    def open(cls, directory, name: str = "records directory") -> Records:
        """Reads ``directory/manifest.json``.

        Args:
          directory: str or path. The records directory.
          name: str. What the directory is to the caller, for the messages (e.g. the flag
            ``data_dir``). Defaults to "records directory".

        Raises:
          FileNotFoundError: no such directory, or no manifest in it.
          RecordsError: the directory is empty, or the manifest has another schema version.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{name} {directory!r} does not exist.")
        if not os.listdir(directory):
            raise RecordsError(f"{name} {directory!r} is empty; {CONVERT_HINT}.")
        try:
            manifest = schema.read_manifest(directory)
        except ValueError as e:  # Schema version.
            raise RecordsError(str(e)) from None
        return cls(directory, manifest)

    # ------------------------------------------------------------------ manifest contents

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases every record stores.

        Raises:
          RecordsError: the manifest does not say.
        """
        stored = self.manifest.get("phases")
        if stored is None:
            raise RecordsError(
                f"{os.path.join(self.directory, schema.MANIFEST_NAME)} has no 'phases' entry; "
                "cannot tell which phases the records hold."
            )
        return tuple(stored)

    def check_phases(self, needed: Sequence[str], what: str) -> None:
        """Raises ``RecordsError`` unless the records store every phase in ``needed``.

        Args:
          needed: phase names.
          what: str. Who needs them, for the message (e.g. "Input variant 't2-t0'").
        """
        stored = self.phases
        missing = [p for p in needed if p not in stored]
        if missing:
            raise RecordsError(
                f"{what} needs phases {list(needed)}, but the records in {self.directory!r} "
                f"lack {missing} (they hold {list(stored)})."
            )

    def split_entry(self, split: str) -> dict:
        """The manifest's entry for ``split`` (``{}`` when absent)."""
        return self.manifest.get("splits", {}).get(split) or {}

    def num_exams(self, split: str) -> int:
        return int(self.split_entry(split).get("num_exams", 0))

    def counts(self) -> dict:
        """``{split: number of exams}`` for every split of ``schema.SPLITS``."""
        return {s: self.num_exams(s) for s in schema.SPLITS}

    def exams(self, split: str) -> list | None:
        """The manifest's per-exam entries of ``split`` (``exam_id``, ``patient_id``, ...), or
        None when the manifest has no per-exam list."""
        return self.split_entry(split).get("exams")

    # ------------------------------------------------------------------ files and records

    def shard_paths(self, split: str) -> list[str]:
        """Paths of ``split``'s shard files, in manifest order, each checked to exist.

        Raises:
          RecordsError: the split is unknown or has no shard files.
          FileNotFoundError: a listed shard file is missing.
        """
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise RecordsError(
                f"Split {split!r} is not in {self.directory!r} (manifest has splits "
                f"{sorted(splits)})."
            )
        names = splits[split].get("shards") or []
        if not names:
            raise RecordsError(
                f"Split {split!r} of {self.directory!r} has no shard files (0 exams)."
            )
        paths = [os.path.join(self.directory, name) for name in names]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is listed in the manifest of {self.directory!r} (split {split!r}) "
                    "but does not exist."
                )
        return paths

    def iter_numpy(self, splits: Sequence[str] = schema.SPLITS) -> Iterator[tuple[str, dict]]:
        """Yields ``(split, record)`` for every exam of ``splits`` in manifest shard order,
        decoded by ``schema.decode_example_numpy`` (all stored phases, float32 voxel values).
        Splits without exams are skipped."""
        import tensorflow as tf

        for split in splits:
            if not self.split_entry(split).get("shards"):
                continue
            for path in self.shard_paths(split):
                for raw in tf.data.TFRecordDataset(path):
                    yield split, schema.decode_example_numpy(raw.numpy())

    def first_record(self, split: str) -> dict:
        """The first record of ``split``, decoded (a cheap check that the shards are readable
        and hold what the manifest says).

        Raises:
          RecordsError: the first shard is not a TFRecord file, is empty, or holds a record of
            another schema version.
        """
        import tensorflow as tf

        path = self.shard_paths(split)[0]
        try:
            for raw in tf.data.TFRecordDataset(path).take(1):
                return schema.decode_example_numpy(raw.numpy())
        except tf.errors.OpError as e:
            raise RecordsError(f"{path}: not a readable TFRecord file ({e.message}).") from None
        except ValueError as e:  # decode_example_numpy: schema version.
            raise RecordsError(f"{path}: {e}") from None
        raise RecordsError(f"{path}: the first shard of split {split!r} holds no records.")
