"""tfrecords_tools.durable_io: shard copies with and without copy_file_range, synced renames."""

import os

import numpy as np
import pytest

from tfrecords_tools import durable_io


def _data(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _append(tmp_path, head, data):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    # Not mode "ab": copy_file_range refuses a file opened with O_APPEND (EBADF).
    with open(src, "rb") as s, open(dst, "wb") as d:
        d.write(head)
        durable_io.append_file(s, d)
    return dst.read_bytes()


@pytest.mark.parametrize("size", [0, 1, 1000, 4097])
def test_append_file_in_pieces(tmp_path, monkeypatch, size):
    monkeypatch.setattr(durable_io, "COPY_CHUNK", 1000)  # Several pieces.
    data = _data(size)
    assert _append(tmp_path, b"head", data) == b"head" + data


def test_append_file_to_a_file_opened_for_append(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = _data(3000)
    src.write_bytes(data)
    dst.write_bytes(b"head")
    with open(src, "rb") as s, open(dst, "ab") as d:
        durable_io.append_file(s, d)
    assert dst.read_bytes() == b"head" + data


def test_append_file_without_copy_file_range(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "copy_file_range", raising=False)  # macOS, Windows, old Pythons.
    data = _data(5000)
    assert _append(tmp_path, b"head", data) == b"head" + data


def test_append_file_finishes_with_plain_copy_when_copy_file_range_fails(tmp_path, monkeypatch):
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no os.copy_file_range here")
    monkeypatch.setattr(durable_io, "COPY_CHUNK", 1000)
    real, calls = os.copy_file_range, []

    def fails_after_two_pieces(src, dst, count, *args):
        calls.append(count)
        if len(calls) > 2:
            raise OSError(18, "Invalid cross-device link")  # EXDEV on old kernels.
        return real(src, dst, count, *args)

    monkeypatch.setattr(os, "copy_file_range", fails_after_two_pieces)
    data = _data(4500)
    assert _append(tmp_path, b"head", data) == b"head" + data
    assert len(calls) == 3


def test_sync_release_rename(tmp_path):
    tmp, path = tmp_path / "x.tmp", tmp_path / "x"
    tmp.write_bytes(b"record")
    path.write_bytes(b"old")
    durable_io.sync_release_rename(str(tmp), str(path))
    assert path.read_bytes() == b"record" and not tmp.exists()


def test_release_is_advice_only(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    durable_io.release_file(str(path))
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    durable_io.release_file(str(path))
    assert path.read_bytes() == b"abc"
