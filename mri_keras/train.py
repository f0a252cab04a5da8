"""Trains the Doubly Deep CNN: ``python -m mri_keras.train --flagfile=configs/t2sub.flags``.

Flags: ``mri_keras/flags.py`` (``--help`` lists them). The work is in
``mri_keras.train_lib``; rerunning the same command resumes an interrupted run.
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import sys
from collections.abc import Sequence

from absl import app, logging
from absl import flags as absl_flags

from mri_keras import flags as flags_lib
from tfrecords_tools import memory


def _train(flag_values) -> dict:
    from mri_keras import train_lib  # Deferred: --help stays fast.

    try:
        config = flags_lib.train_config_from_flags(flag_values)
        return train_lib.train(config)
    except ValueError as e:  # Includes train_lib.SetupError: bad input, found before training.
        sys.exit(f"mri_keras.train: error: {e}")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected command-line arguments: {list(argv[1:])}")
    if not absl_flags.FLAGS["verbosity"].present:
        # TensorFlow logs every checkpoint and export at INFO; the progress output says enough.
        logging.set_verbosity(logging.WARNING)
    memory.tune_malloc()  # Reuse freed exam-sized blocks (tfrecords_tools.memory).
    _train(absl_flags.FLAGS)


def run(argv: Sequence[str]) -> dict:
    """Parses ``argv`` (flags and ``--flagfile``s, as on the command line, without the program
    name) into fresh flag values and trains; returns the history (``train_lib.train``).

    For calling the entry point in-process (tests, notebooks): unlike ``main`` it does not
    touch the global ``absl.flags.FLAGS``. Exits (``SystemExit``) on bad flags or bad input,
    with the same message as the command line.
    """
    fv = flags_lib.parse_in_process("mri_keras.train", flags_lib.define_flags, argv)
    return _train(fv)


def entry(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    flags_lib.define_flags()
    absl_flags.adopt_module_key_flags(flags_lib)  # --help lists the training flags.
    try:  # Nested flagfiles resolve from any working directory (flags_lib.expand_flagfiles).
        argv = flags_lib.expand_flagfiles(sys.argv if argv is None else argv)
    except absl_flags.Error as e:
        sys.exit(f"mri_keras.train: error: {e}")
    app.run(main, argv=argv)


if __name__ == "__main__":
    entry()
