"""The converter's bulk file I/O: synced before it is renamed, and kept out of the page cache.

Records are written once and read much later (an archive's records rarely fit in memory), so
keeping them cached only grows the page cache, and every page the kernel has to find for a fresh
write costs far more than reusing one just released (measured in BENCHMARKS.md, "Ingest": 0.23 s
against 0.02 s of system time per 100 MB on the development VM). Small files that must replace
another in one step go through ``fileio`` instead.
"""

from __future__ import annotations

import os
import shutil

# Copies go in pieces of this size; each piece is released from the page cache once written
# back (one piece later), so a copy keeps reusing a few pages instead of growing the cache by the
# whole file (see release).
COPY_CHUNK = 32 << 20


def release(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drops a file range from the page cache; starts writing it back if it is dirty.

    On Linux the advice starts writeback of dirty pages without waiting and drops the clean
    ones, so calling it once after a write and once more a little later frees the pages for the
    next write. Advice only: a no-op where unsupported.

    Args:
      fd: int. An open file descriptor.
      offset: int. Start of the range in bytes. Defaults to 0.
      length: int. Length of the range in bytes; 0 means to the end of the file. Defaults to 0.
    """
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def sync(fd: int) -> None:
    """Waits until the file's data is on the disk (``fdatasync`` where the OS has it)."""
    os.fdatasync(fd) if hasattr(os, "fdatasync") else os.fsync(fd)


def release_file(path: str) -> None:
    """``release`` of the whole file at ``path``: starts its write-back without waiting."""
    fd = os.open(path, os.O_RDONLY)
    try:
        release(fd)
    finally:
        os.close(fd)


def sync_release_rename(tmp: str, path: str) -> None:
    """Syncs ``tmp``, drops it from the page cache and renames it to ``path``.

    The data is on the disk before the rename, so even after a power loss ``path`` never names
    a file that was not completely written.
    """
    fd = os.open(tmp, os.O_RDONLY)
    try:
        sync(fd)
        release(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def append_file(src, dst) -> None:
    """Appends all of ``src`` to ``dst``, piece by piece, releasing both from the page cache.

    The copy runs in the kernel (``os.copy_file_range``) where the OS offers it, and with plain
    reads and writes from wherever that stops (no ``copy_file_range``, or it fails, e.g. across
    file systems on old kernels).

    Args:
      src: binary file object open for reading (copied from its start).
      dst: binary file object open for writing, positioned at its end.
    """
    dst.flush()
    sfd, dfd = src.fileno(), dst.fileno()
    size = os.fstat(sfd).st_size
    offset = 0
    previous = None
    while offset < size and hasattr(os, "copy_file_range"):
        start = os.lseek(dfd, 0, os.SEEK_CUR)
        try:
            n = os.copy_file_range(sfd, dfd, min(COPY_CHUNK, size - offset))
        except OSError:
            break
        if n == 0:
            break
        release(sfd, offset, n)
        release(dfd, start, n)  # Starts the write-back of this piece...
        if previous is not None:
            release(dfd, *previous)  # ...and drops the one before, written back by now.
        previous = (start, n)
        offset += n
    if offset < size:
        src.seek(offset)
        shutil.copyfileobj(src, dst, 16 << 20)
