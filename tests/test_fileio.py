"""tfrecords_tools.fileio: an atomic write leaves the old file or the new one, nothing else."""

import os
import sys

import pytest

from tfrecords_tools import fileio


def test_text_round_trip_replaces_existing_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old\n")
    text = "exam,reason\r\nE1,ünïcode ✓\n"
    fileio.atomic_write_text(str(path), text)
    assert path.read_bytes() == text.encode("utf-8")  # No newline translation.
    assert os.listdir(tmp_path) == ["manifest.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_bytes_round_trip_new_file(tmp_path, durable):
    path = tmp_path / "a.bin"
    fileio.atomic_write_bytes(str(path), b"\x00\x01\xff", durable=durable)
    assert path.read_bytes() == b"\x00\x01\xff"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_relative_path_in_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fileio.atomic_write_text("x.txt", "x")
    assert (tmp_path / "x.txt").read_text() == "x"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_new_file_gets_the_mode_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        fileio.atomic_write_text(str(tmp_path / "m.csv"), "x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.csv").stat().st_mode & 0o777 == 0o640


def test_private_file_is_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        fileio.atomic_write_text(str(tmp_path / "id_map.csv"), "x", private=True)
    finally:
        os.umask(old)
    assert (tmp_path / "id_map.csv").stat().st_mode & 0o777 == 0o600


class _Boom(Exception):
    pass


def _raise(*args, **kwargs):
    raise _Boom


@pytest.mark.parametrize(
    "target, durable",
    [
        ("write", False),  # The data cannot be written (e.g. disk full).
        ("fsync", True),
        ("replace", False),
        ("interrupt", False),  # Ctrl-C at the rename: the temporary file still goes.
    ],
)
def test_failed_write_leaves_existing_file_and_no_temp_file(tmp_path, monkeypatch, target, durable):
    path = tmp_path / "failures.csv"
    path.write_text("old contents\n")
    data = b"new contents\n"
    if target == "write":
        data = object()  # f.write raises after the temporary file was created.
        expected = TypeError
    elif target == "fsync":
        monkeypatch.setattr(os, "fsync", _raise)
        expected = _Boom
    elif target == "replace":
        monkeypatch.setattr(os, "replace", _raise)
        expected = _Boom
    else:

        def interrupt(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", interrupt)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        fileio.atomic_write_bytes(str(path), data, durable=durable)
    assert path.read_text() == "old contents\n"
    assert os.listdir(tmp_path) == ["failures.csv"]


def test_unencodable_text_writes_nothing(tmp_path):
    with pytest.raises(UnicodeEncodeError):
        fileio.atomic_write_text(str(tmp_path / "t.txt"), "lone surrogate \ud800")
    assert os.listdir(tmp_path) == []


def test_durable_syncs_file_before_rename_and_directory_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or replace(a, b))
    fileio.atomic_write_text(str(tmp_path / "d.json"), "{}", durable=True)
    assert events[:2] == ["fsync", "replace"]
    if sys.platform.startswith("linux"):
        assert events[2:] == ["fsync"]  # The directory (not possible everywhere).
    events.clear()
    fileio.atomic_write_text(str(tmp_path / "d.json"), "{}")
    assert events == ["replace"]
