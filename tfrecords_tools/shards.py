"""The converter's shards: cached one-record files concatenated into ``split-SSSSS-of-NNNNN``.

Each split's exams go into shards in pseudonym order, so the same exams always give the same
shard bytes. A shard is written under a temporary name (``.<shard>.tmp``) and renamed when
complete; shards of an earlier run that this one did not write, and temporary files a killed run
left, are removed after the new manifest is in place (``remove_stale``).
"""

from __future__ import annotations

import dataclasses
import os
import re

from tfrecords_tools import durable_io, fileio, schema

_SHARD_RE = re.compile(
    "(" + "|".join(map(re.escape, schema.SPLITS)) + r")-\d{5}-of-\d{5}\.tfrecord"
)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """One split's exams and their shards.

    Attributes:
      metas: list of dict. The split's exam metadata (``record_cache`` entries), in shard order.
      shards: list of (shard file name, [exam metas]).
    """

    metas: list
    shards: list

    @property
    def names(self) -> list:
        return [name for name, _ in self.shards]


def plan_shards(split: str, metas: list, shard_bytes: int) -> list:
    """Groups a split's exams (in order) into shards of about ``shard_bytes``.

    Returns:
      list of (shard file name, [exam metas]).
    """
    groups: list = []
    size = 0
    for meta in metas:
        if not groups or (size + meta["bytes"] > shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(meta)
        size += meta["bytes"]
    return [
        (schema.SHARD_PATTERN.format(split=split, index=i, count=len(groups)), group)
        for i, group in enumerate(groups)
    ]


def plan_splits(metas: list, split_of: dict, shard_bytes: int) -> dict:
    """Plans every split's shards.

    Args:
      metas: list of dict. Metadata of the converted exams.
      split_of: dict. Patient pseudonym -> split.
      shard_bytes: int. Target shard size.

    Returns:
      dict split -> SplitPlan, for every split in ``schema.SPLITS``.
    """
    plans = {}
    for split in schema.SPLITS:
        ordered = sorted(
            (m for m in metas if split_of[m["patient_id"]] == split), key=lambda m: m["exam_id"]
        )
        plans[split] = SplitPlan(ordered, plan_shards(split, ordered, shard_bytes))
    return plans


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard to assemble (picklable: jobs run in the conversion's worker pool).

    Attributes:
      output_dir: str. The records directory.
      name: str. The shard's file name.
      paths: list of str. The cached one-record files, in order.
      move_first: bool. The cache is dropped after this run (every exam converted), so the
        first record's cache file may be renamed into the shard and the others removed.
    """

    output_dir: str
    name: str
    paths: list
    move_first: bool


def assemble(job: ShardJob) -> str:
    """Concatenates cached one-record files into one shard (temporary name, then rename).

    With ``job.move_first`` the first record's cache file is renamed into the shard, only the
    others are copied, and their cache files are removed once the shard is complete; a run
    killed during assembly then converts those exams again.

    Returns:
      The shard's file name.
    """
    output_dir, name, paths = job.output_dir, job.name, job.paths
    tmp = os.path.join(output_dir, f".{name}.tmp")
    if job.move_first and len(paths) > 1:
        # A partial shard left under the temporary name by a kill is removed by the next run.
        os.replace(paths[0], tmp)
        with open(tmp, "ab") as out:
            for path in paths[1:]:
                with open(path, "rb") as src:
                    durable_io.append_file(src, out)
            durable_io.sync(out.fileno())
            durable_io.release(out.fileno())
        os.replace(tmp, os.path.join(output_dir, name))
        for path in paths[1:]:  # The cache goes anyway; dropping it here runs in parallel.
            os.unlink(path)
        return name
    if len(paths) == 1:
        # One record (exams of half the shard size or more): the cached file already is the
        # shard; a hard link shares it without copying (the cache name is removed later).
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.link(paths[0], tmp)
            os.replace(tmp, os.path.join(output_dir, name))
            return name
        except OSError:
            pass  # No hard links here (another file system): copy instead.
    with open(tmp, "wb") as out:
        for path in paths:
            with open(path, "rb") as src:
                durable_io.append_file(src, out)
        durable_io.sync(out.fileno())
        durable_io.release(out.fileno())
    os.replace(tmp, os.path.join(output_dir, name))
    return name


def write_shards(output_dir: str, plans: dict, record_path: dict, move_first: bool, pool) -> set:
    """Assembles every planned shard; each is independent, so they run in parallel.

    Args:
      output_dir: str. The records directory.
      plans: dict split -> SplitPlan.
      record_path: dict. Exam pseudonym -> its cached record file.
      move_first: bool. See ``ShardJob``.
      pool: multiprocessing pool or None (assemble in this process).

    Returns:
      set of the shard file names written.
    """
    jobs = [
        ShardJob(output_dir, name, [record_path[m["exam_id"]] for m in group], move_first)
        for plan in plans.values()
        for name, group in plan.shards
    ]
    mapper = pool.imap_unordered if pool is not None and len(jobs) > 1 else map
    return set(mapper(assemble, jobs))


def is_stale(name: str, written: set) -> bool:
    """A file of the records directory that a run which wrote ``written`` removes at its end:
    a shard it did not write, or a temporary file of an interrupted run."""
    stale_shard = name not in written and _SHARD_RE.fullmatch(name)
    temp = name.startswith(".") and name.endswith(".tmp") or name.startswith(fileio.TEMP_PREFIX)
    return bool(stale_shard or temp)


def remove_stale(output_dir: str, written: set) -> None:
    """Removes shards not in ``written`` and the temporary files of an interrupted run."""
    for name in os.listdir(output_dir):
        if is_stale(name, written):
            os.unlink(os.path.join(output_dir, name))
