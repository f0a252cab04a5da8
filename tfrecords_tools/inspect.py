r"""Summarises a records directory written by ``tfrecords_tools.convert``.

  python -m tfrecords_tools.inspect RECORDS [--export_npz=DIR] [--png=DIR] [--verify]
      [--splits=train,val,test] [--max_png=0]

``--export_npz`` writes DIR/<exam_id>.npz with t0..t3 (float32, canonical orientation),
labels (4,) and spacing (3,); ``--png`` writes a mid-slice preview (t0, t2, t2-t0) per exam.
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import sys

from absl import app, flags

from tfrecords_tools import inspect_lib, schema


def define_flags() -> None:
    flags.DEFINE_string("export_npz", "", "Write one .npz per exam into this folder.")
    flags.DEFINE_string("png", "", "Write one mid-slice preview PNG per exam into this folder.")
    flags.DEFINE_bool("verify", False, "Read every record and check it against the manifest.")
    flags.DEFINE_list("splits", list(schema.SPLITS), "Splits to export.")
    flags.DEFINE_integer("max_png", 0, "At most this many previews (0 = all).")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("Usage: python -m tfrecords_tools.inspect RECORDS_DIR [flags]")
    FLAGS = flags.FLAGS
    unknown = [s for s in FLAGS.splits if s not in schema.SPLITS]
    if unknown:
        raise app.UsageError(f"--splits: unknown {unknown}; expected some of {schema.SPLITS}")
    records_dir = argv[1]
    try:
        print(inspect_lib.summary(records_dir, verify=FLAGS.verify))
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if FLAGS.export_npz:
        n = inspect_lib.export_npz(records_dir, FLAGS.export_npz, FLAGS.splits)
        print(f"exported {n} exams to {FLAGS.export_npz}")
    if FLAGS.png:
        n = inspect_lib.export_png(records_dir, FLAGS.png, FLAGS.splits, FLAGS.max_png)
        print(f"wrote {n} previews to {FLAGS.png}")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
