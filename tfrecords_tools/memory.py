"""Process-wide memory settings shared by the converter and the training/evaluation CLIs."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os

# Set to 1 to keep glibc's defaults (for measuring what the tuning buys: scripts/bench/epoch.py).
DISABLE_ENV = "MRI_KERAS_DEFAULT_MALLOC"

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Lets glibc reuse freed memory for the next exam instead of returning it to the OS.

    Every exam allocates blocks above glibc's default mmap threshold (decoded volumes and
    records in the converter; parsed records, preprocessed volumes and activations in
    training, evaluation and prediction). Each would be mapped fresh, page-faulted in and
    unmapped again, which costs more system time than the work itself on a small exam
    (BENCHMARKS.md, "Training: where an epoch goes"). Raising the mmap and trim thresholds
    keeps those pages in the heap for reuse. Call it once, early, in each process (the
    converter's workers call it as their pool initializer); a no-op where glibc's
    ``mallopt`` is unavailable, or when the environment sets ``MRI_KERAS_DEFAULT_MALLOC=1``.
    """
    if os.environ.get(DISABLE_ENV) == "1":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def gc_frozen():
    """Keeps the objects that exist now out of the garbage collector's reach inside the block.

    Use it around forking worker processes: frozen objects are left alone by the workers'
    garbage collector, which otherwise writes to (and so copies) most of the parent's memory
    pages in every worker.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
