r"""Converts DICOM breast DCE-MRI exam folders into sharded TFRecords with Apache Beam.

The same flags and outputs as ``python -m tfrecords_tools.convert``; every other ``--flag`` is a
Beam pipeline option (the runner and its settings). Without one, the local DirectRunner:

  python -m tfrecords_tools.beam_convert --dicom_root=ARCHIVE --labels=labels.csv \
      --output_dir=RECORDS [--pseudonym_key_file=KEY] [--id_map=ids.csv] \
      [--phase_map=phases.csv] [--split_ratios=0.6,0.2,0.2] [--seed=0] [--shard_size_mb=200] \
      [--runner=DirectRunner --direct_num_workers=2]

``--dicom_root`` and ``--output_dir`` may be object-storage paths (``gs://...``) where the runner
has that file system; README.md shows a Dataflow and a Flink run.

Exit status: 0 when every labelled exam converted; 1 when some failed (the others are written;
see RECORDS/failures.csv); 2 when the inputs do not match (nothing was written).
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import sys

from absl import app, flags, logging

from tfrecords_tools import beam_lib, convert, labels_csv


def main(argv):
    beam_args = argv[1:]
    stray = [a for a in beam_args if not a.startswith("-")]
    if stray:
        raise app.UsageError(f"Unexpected arguments: {' '.join(stray)}")
    unknown = beam_lib.unknown_options(beam_args)
    if unknown:
        raise app.UsageError(
            f"Neither a converter flag nor a Beam pipeline option: {' '.join(unknown)}"
        )
    if not flags.FLAGS["verbosity"].present:
        # Beam logs its set-up at INFO (runner, workers, state cache); the summary says enough.
        logging.set_verbosity(logging.WARNING)
    try:
        config = convert.config_from_flags(flags.FLAGS)
        result = beam_lib.convert(config, beam_args)
    except (labels_csv.InputError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0 if result.ok else 1


def _parse(argv: list) -> list:
    # The converter's flags here; the rest are Beam's pipeline options (checked in main).
    return flags.FLAGS(argv, known_only=True)


if __name__ == "__main__":
    convert.define_flags(local=False)
    flags.mark_flags_as_required(["dicom_root", "labels", "output_dir"])
    app.run(main, flags_parser=_parse)
