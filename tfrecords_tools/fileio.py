"""Atomic file writes: the one helper every writer in the project uses.

A reader (or a run resumed after a kill) sees either the old complete file or the new complete
file at ``path``, never a partial one: the data goes to a temporary file in the same directory
(so the rename stays within one file system) that is then renamed onto ``path``. The temporary
name starts with ``TEMP_PREFIX``; a process killed mid-write leaves such a file behind, and
writers that own a directory (the converter's output directory) remove them on their next run.
"""

from __future__ import annotations

import os
import secrets

TEMP_PREFIX = ".tmp-"

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_temp(directory: str, mode: int) -> tuple[int, str]:
    # Not tempfile.mkstemp: it creates the file with mode 0600, where a plain open() (what this
    # replaces) gives 0666 minus the umask.
    while True:
        tmp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        try:
            return os.open(tmp, _CREATE_FLAGS, mode), tmp
        except FileExistsError:
            continue


def _sync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some file systems refuse fsync on a directory.
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: str, data: bytes, *, durable: bool = False, private: bool = False
) -> None:
    """Replaces the file at ``path`` with ``data`` in one step.

    The new file gets the permissions a plain ``open(path, "wb")`` would give it, or with
    ``private`` owner read/write only (0600), from its creation on.

    Args:
      path: str. File to write; its directory must exist.
      data: bytes. The complete new contents.
      durable: bool. Also survive a power loss: the data is flushed to the disk before the
        rename, and the directory after it. Defaults to False (atomic for readers and for a
        killed process, but the rename may reach the disk before the data).
      private: bool. Readable by the owner only (the pseudonym id map). Defaults to False.

    Raises:
      OSError: the file could not be written; any file at ``path`` is left as it was, and the
        temporary file is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        _sync_dir(directory)


def atomic_write_text(
    path: str, text: str, *, durable: bool = False, private: bool = False
) -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8 (newlines written as given)."""
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable, private=private)
