"""The converter as an Apache Beam pipeline (``python -m tfrecords_tools.beam_convert``).

Same inputs, settings and outputs as ``convert_lib.convert``, and the same functions for every
step that decides an output byte, so both converters write identical shards, manifest (but
for the paths in its ``flags``), failures.csv, id map and failure details. Beam runs the
per-exam and per-shard work wherever the runner puts it (the local DirectRunner, or unchanged on
Dataflow, Flink or Spark):

=====================  ==================================================================
transform              work
=====================  ==================================================================
``Exams``              one task per labelled exam (folder, pseudonym, labels, phase map),
                       reshuffled so the runner spreads them over its workers
``Convert``            per exam, in parallel: the cache entry if an earlier run left one,
                       else ``convert_lib.read_exam`` (read, reorient, encode; the local
                       converter's function) and the record written to ``OUTPUT/.work/``
                       (``record_cache`` layout). Failures go to a tagged output, never
                       raise: one bad exam never fails the pipeline.
``Plan``               one small global step over the exams' metadata:
                       ``convert_lib.plan`` (patient split, then shards by size)
``Shards``             per shard, in parallel: the cached records concatenated under a
                       temporary name, then renamed (``beam_files.write_shard``)
``Report``             once, after every shard: ``convert_lib.publish`` (failures.csv,
                       manifest, stale shards removed, id map and failure details, cache
                       pruned or dropped)
=====================  ==================================================================

The split needs every converted exam's patient (a global step), and shards are cut by record
size, so planning comes after reading, as in the local converter; the records themselves stay
in the cache files and never travel through the runner's shuffle, only their metadata does.

Reruns over the same output directory resume: every exam whose cache entry is complete is taken
from it (its entry is only written once the record is complete), a killed run's temporary files
are removed, and shards are rewritten from the cache with the same bytes. Shards only ever
appear complete (temporary name, then rename), and the manifest is replaced after them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys

import apache_beam as beam
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from tfrecords_tools import (
    beam_files,
    convert_lib,
    convert_report,
    dicom_reader,
    labels_csv,
    memory,
    pseudonym,
    record_cache,
    schema,
)

_COUNTERS = ("converted", "resumed", "failed")


def unknown_options(args: list) -> list:
    """The arguments in ``args`` that no Beam pipeline option knows (misspelt flags)."""
    options = PipelineOptions(args)
    known = options.get_all_options(retain_unknown_options=False)
    every = options.get_all_options(retain_unknown_options=True)
    unknown = set(every) - set(known)
    return [a for a in args if a.lstrip("-").split("=", 1)[0].replace("-", "_") in unknown]


def pipeline(args: list) -> beam.Pipeline:
    """A pipeline with Beam's options from ``args``.

    With the DirectRunner (the default), the pipeline runs on its Python engine, the
    FnApiRunner: Beam's DirectRunner would otherwise first try Prism, a binary it downloads from
    GitHub at run time (``--runner=PrismRunner`` still picks it). Several DirectRunner workers
    run as processes unless a running mode is given (threads share one interpreter, and reading
    DICOM is Python work).
    """
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        # Workers would log every connection they make at INFO, and Beam's own WARNINGs.
        args = list(args) + ["--default_sdk_harness_log_level=ERROR"]
    options = PipelineOptions(args)
    direct = options.view_as(DirectOptions)
    if direct.direct_num_workers != 1 and not any(
        a.startswith("--direct_running_mode") for a in args
    ):
        direct.direct_running_mode = "multi_processing"
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "direct", "SwitchingDirectRunner"):
        return beam.Pipeline(runner=_direct_runner(options), options=options)
    return beam.Pipeline(options=options)


def _direct_runner(options: PipelineOptions):
    """The FnApiRunner as Beam's DirectRunner makes it (with the options its workers need)."""
    try:
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle
    except ImportError:  # Another Beam layout: its DirectRunner then.
        return None
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))


class _ConvertExam(beam.DoFn):
    """One exam: its cache entry if complete, else read, encoded and cached."""

    def __init__(self, config: convert_lib.ConvertConfig, key: bytes):
        self.config, self.key = config, key

    def setup(self):
        memory.tune_malloc()
        self.options = dicom_reader.ReaderOptions(max_obliquity_deg=self.config.max_obliquity_deg)
        self.fingerprint = pseudonym.Pseudonymizer(self.key).fingerprint()
        self.work_dir = beam_files.join(self.config.output_dir, record_cache.WORK_DIR)
        self.counters = {n: Metrics.counter("convert", f"exams_{n}") for n in _COUNTERS}

    def process(self, task):
        exam, exam_id, labels, overrides = task
        exam_dir = beam_files.join(self.config.dicom_root, *exam.split("/"))
        files = beam_files.exam_files(exam_dir)
        ckey = record_cache.cache_key(
            exam,
            exam_dir,
            labels,
            overrides,
            self.fingerprint,
            self.options,
            files=files,
            crop_to_body=self.config.crop_to_body,
            phases=self.config.phases,
        )
        meta = beam_files.load_meta(self.work_dir, ckey)
        if meta is not None:
            self.counters["resumed"].inc()
            yield dict(meta, exam=exam, cache_key=ckey)
            return
        with beam_files.local_exam(exam_dir, files) as local_dir:
            done = convert_lib.read_exam(
                exam,
                local_dir,
                exam_id,
                labels,
                overrides,
                self.key,
                self.options,
                crop_to_body=self.config.crop_to_body,
                phases=self.config.phases,
            )
        if done.record is None:
            failure = dict(done.meta)
            if local_dir != exam_dir:  # Name the exam's own folder, not the local copy.
                failure["detail"] = failure["detail"].replace(local_dir, exam_dir)
            self.counters["failed"].inc()
            yield beam.pvalue.TaggedOutput("failed", failure)
            return
        meta = beam_files.put_record(self.work_dir, ckey, done.record, done.meta)
        self.counters["converted"].inc()
        yield dict(meta, exam=exam, cache_key=ckey)


def _shard_jobs(plans: dict, work_dir: str):
    """(shard name, cached record paths in order) of every planned shard."""
    for split_plan in plans.values():
        for name, group in split_plan.shards:
            yield name, [record_cache.cache_paths(work_dir, m["cache_key"])[0] for m in group]


def _write_shard(name, paths, output_dir=""):
    return beam_files.write_shard(output_dir, name, paths)


def _plan(_, config, rows, good):
    return convert_lib.plan(config, rows, good)


def _publish(_, config, rows, exam_ids, plans, good, failed, written):
    convert_lib.publish(
        config,
        rows,
        exam_ids,
        plans,
        good,
        sorted(failed, key=lambda r: r["exam_id"]),
        set(written),
        {m["cache_key"] for m in good},
        beam_files.output_files(config.output_dir),
    )


def build(p: beam.Pipeline, config: convert_lib.ConvertConfig, rows, exam_ids, overrides, key):
    """Adds the conversion's transforms to the pipeline ``p`` (see the module docstring).

    Args:
      p: beam.Pipeline.
      config: ConvertConfig.
      rows: list of labels_csv rows, in CSV order.
      exam_ids: dict exam folder -> exam pseudonym.
      overrides: dict exam folder -> phase map entries.
      key: bytes. The pseudonym key.
    """
    work_dir = beam_files.join(config.output_dir, record_cache.WORK_DIR)
    tasks = [(r.exam, exam_ids[r.exam], r.labels, overrides.get(r.exam)) for r in rows]
    results = (
        p
        | "Exams" >> beam.Create(tasks)
        | "Spread" >> beam.Reshuffle()
        | "Convert" >> beam.ParDo(_ConvertExam(config, key)).with_outputs("failed", main="good")
    )
    good = results.good | "AllGood" >> beam.combiners.ToList()
    failed = results.failed | "AllFailed" >> beam.combiners.ToList()
    plans = (
        p
        | "PlanStart" >> beam.Create([None])
        | "Plan" >> beam.Map(_plan, config=config, rows=rows, good=beam.pvalue.AsSingleton(good))
    )
    written = (
        plans
        | "ShardJobs" >> beam.FlatMap(_shard_jobs, work_dir=work_dir)
        | "SpreadShards" >> beam.Reshuffle()
        | "Shards" >> beam.MapTuple(_write_shard, output_dir=config.output_dir)
        | "AllShards" >> beam.combiners.ToList()
    )
    _ = (
        p
        | "ReportStart" >> beam.Create([None])
        | "Report"
        >> beam.Map(
            _publish,
            config=config,
            rows=rows,
            exam_ids=exam_ids,
            plans=beam.pvalue.AsSingleton(plans),
            good=beam.pvalue.AsSingleton(good),
            failed=beam.pvalue.AsSingleton(failed),
            written=beam.pvalue.AsSingleton(written),
        )
    )


def _labels(config: convert_lib.ConvertConfig) -> list:
    root = config.dicom_root
    if not beam_files.is_remote(root):
        return labels_csv.read_labels(config.labels, root)
    listing = beam_files.list_tree(root)  # One listing of the archive, in this process.

    def read_head(rel: str) -> bytes:
        try:
            return beam_files.read_bytes(beam_files.join(root, rel), 132)
        except OSError:
            return b""

    return labels_csv.read_labels(config.labels, root, labels_csv.ListedTree(listing, read_head))


def _check_paths(config: convert_lib.ConvertConfig) -> None:
    out_dir, id_map = config.output_dir, config.id_map_file()
    if beam_files.is_inside(id_map, out_dir):
        raise ValueError(
            f"--id_map={id_map} is inside --output_dir={out_dir}; the map from "
            "pseudonyms to exam folders must be kept outside the records directory."
        )
    if beam_files.is_inside(out_dir, config.dicom_root):
        raise ValueError(f"--output_dir={out_dir} must not be inside --dicom_root.")
    if beam_files.is_remote(out_dir) and not beam_files.is_remote(id_map):
        raise ValueError(
            f"--id_map={id_map} is a local path but --output_dir={out_dir} is not: the "
            "pipeline's workers write the id map and failure details, so give them a private "
            "location they can write too (e.g. --id_map=gs://private-bucket/records/id_map.csv)."
        )


def convert(config: convert_lib.ConvertConfig, beam_args: list, stream=None):
    """Runs the conversion as a Beam pipeline and waits for it.

    Args:
      config: ConvertConfig (``num_workers`` and ``progress`` are not used: the runner decides).
      beam_args: list of str. Beam pipeline options (``--runner=...`` and the runner's own).
      stream: where the summary goes. Defaults to sys.stderr.

    Returns:
      convert_lib.ConvertResult.

    Raises:
      labels_csv.InputError: the inputs do not match (nothing is read or written then).
      ValueError: bad settings (key or id map inside the output directory, ...).
    """
    stream = stream or sys.stderr
    _check_paths(config)
    rows = _labels(config)
    overrides = (
        labels_csv.read_phase_map(config.phase_map, [r.exam for r in rows])
        if config.phase_map
        else {}
    )
    out_dir = config.output_dir
    if not beam_files.is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    key = beam_files.load_key(config.key_file(), out_dir)
    pseudo = pseudonym.Pseudonymizer(key)
    exam_ids = {r.exam: pseudo.exam(r.exam) for r in rows}
    if len(set(exam_ids.values())) != len(exam_ids):
        raise RuntimeError("pseudonym collision between two exam folders; use another key")
    beam_files.remove_unpublished(beam_files.join(out_dir, record_cache.WORK_DIR))

    p = pipeline(beam_args)
    build(p, config, rows, exam_ids, overrides, key)
    result = p.run()
    state = result.wait_until_finish()  # Also with --no_wait_until_finish: outputs come last.
    if state != PipelineState.DONE:
        raise RuntimeError(f"the conversion pipeline ended in state {state}")
    return _result(config, len(rows), _counters(result).get("resumed", 0), stream)


def _counters(result) -> dict:
    out = {}
    for c in result.metrics().query(MetricsFilter().with_namespace("convert"))["counters"]:
        name = c.key.metric.name.removeprefix("exams_")
        value = c.committed if c.committed is not None else c.attempted
        out[name] = out.get(name, 0) + (value or 0)
    return out


def _result(config, num_labelled: int, num_cached: int, stream):
    """The run's result, read back from the outputs it wrote."""
    out_dir = config.output_dir
    manifest = json.loads(
        beam_files.read_bytes(beam_files.join(out_dir, schema.MANIFEST_NAME)).decode()
    )
    text = beam_files.read_bytes(beam_files.join(out_dir, schema.FAILURES_NAME)).decode()
    failures = [(r["exam"], r["reason"]) for r in csv.DictReader(io.StringIO(text))]
    result = convert_lib.ConvertResult(
        num_labelled, manifest["num_exams"], failures, num_cached, manifest
    )
    convert_report.print_summary(result, out_dir, config.id_map_file(), stream)
    return result
