r"""Converts DICOM breast DCE-MRI exam folders into sharded TFRecords.

  python -m tfrecords_tools.convert --dicom_root=ARCHIVE --labels=labels.csv \
      --output_dir=RECORDS [--pseudonym_key_file=KEY] [--id_map=ids.csv] \
      [--phase_map=phases.csv] [--split_ratios=0.6,0.2,0.2] [--seed=0] \
      [--shard_size_mb=200] [--num_workers=0]

Exit status: 0 when every labelled exam converted; 1 when some failed (the others are written;
see RECORDS/failures.csv); 2 when the inputs do not match (nothing was written).
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import sys

from absl import app, flags

from tfrecords_tools import convert_lib, labels_csv, memory, schema, splits


def define_flags(local: bool = True) -> None:
    """Defines the converter's flags (once).

    Args:
      local: bool. Also the flags of the local process pool (``--num_workers``,
        ``--progress``); the Beam converter leaves them to the runner's options (Dataflow's
        own ``--num_workers``, ``--direct_num_workers``). Defaults to True.
    """
    flags.DEFINE_string("dicom_root", None, "Folder holding one folder per exam.")
    flags.DEFINE_string(
        "labels",
        None,
        "CSV with columns exam,left_benign,left_malignant,right_benign,right_malignant "
        "(0/1) and optional split (train/val/test); exam = folder path relative to "
        "--dicom_root.",
    )
    flags.DEFINE_string("output_dir", None, "Records directory to write.")
    flags.DEFINE_string(
        "pseudonym_key_file",
        "",
        "Key for the keyed-hash exam/patient pseudonyms; created with a random key when "
        "missing; must be outside --output_dir. Default: <output_dir>_private/pseudonym.key.",
    )
    flags.DEFINE_string(
        "id_map",
        "",
        "Where to write the pseudonym -> exam folder CSV (outside --output_dir). Default: "
        "id_map.csv next to the key file.",
    )
    flags.DEFINE_string(
        "phase_map",
        "",
        "Optional CSV exam,series_instance_uid,phase[,temporal_position] naming the series "
        "(and, in a multi-phase series, the TemporalPositionIdentifier) of t0..t3 for some "
        "exams; replaces the phase heuristics for those exams.",
    )
    flags.DEFINE_string(
        "split_ratios",
        "0.6,0.2,0.2",
        "train,val,test fractions of patients (ignored with a split column).",
    )
    flags.DEFINE_integer("seed", 0, "Seed of the patient-level split.")
    flags.DEFINE_float("shard_size_mb", 200.0, "Target shard size in MiB.")
    flags.DEFINE_float(
        "max_obliquity_deg",
        15.0,
        "Largest tilt of an image axis from a patient axis that is reoriented "
        "without resampling; more oblique exams fail.",
    )
    flags.DEFINE_bool(
        "crop_to_body",
        False,
        "Cut every exam to the body's bounding box (all phases; cols symmetric about the "
        "centre, so labels keep their side): fewer bytes, less CPU to read, fewer FLOPs.",
    )
    flags.DEFINE_list(
        "phases",
        list(schema.PHASES),
        "Phases each record stores (a subset of t0,t1,t2,t3): training reads whole records, so "
        "t0,t2 (what the paper's t2-t0 input reads) halves the bytes of every epoch.",
    )
    if local:
        flags.DEFINE_integer("num_workers", 0, "Worker processes; 0 = all cores.")
        flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def config_from_flags(FLAGS) -> convert_lib.ConvertConfig:
    """Builds the frozen config from parsed flags."""
    return convert_lib.ConvertConfig(
        dicom_root=FLAGS.dicom_root,
        labels=FLAGS.labels,
        output_dir=FLAGS.output_dir,
        pseudonym_key_file=FLAGS.pseudonym_key_file,
        id_map=FLAGS.id_map,
        phase_map=FLAGS.phase_map,
        split_ratios=splits.parse_ratios(FLAGS.split_ratios),
        seed=FLAGS.seed,
        shard_size_mb=FLAGS.shard_size_mb,
        num_workers=FLAGS.num_workers if "num_workers" in FLAGS else 0,
        max_obliquity_deg=FLAGS.max_obliquity_deg,
        crop_to_body=FLAGS.crop_to_body,
        phases=tuple(FLAGS.phases),
        progress=FLAGS.progress if "progress" in FLAGS else False,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    memory.tune_malloc()  # This process converts too when --num_workers=1.
    try:
        config = config_from_flags(flags.FLAGS)
        result = convert_lib.convert(config)
    except (labels_csv.InputError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0 if result.ok else 1


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["dicom_root", "labels", "output_dir"])
    app.run(main)
