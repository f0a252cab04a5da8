"""Where flagfiles are found: ``--flagfile=t2sub.flags`` (a bare name) from any directory."""

import os

import pytest
from absl import flags as absl_flags

from mri_keras import flags as flags_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def _parse(argv):
    """Flag values after parsing ``argv`` as ``mri_keras.train`` does."""
    return flags_lib.parse_in_process("mri_keras.train", flags_lib.define_flags, argv)


def _error(argv):
    with pytest.raises(absl_flags.CantOpenFlagFileError) as info:
        flags_lib.expand_flagfiles(["prog", *argv])
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_bare_name_is_found_in_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fv = _parse(["--flagfile=t2sub.flags", "--data_dir=d", "--model_dir=m", "--epochs=3"])
    # t2sub.flags sets the input and includes configs/base.flags (the paper's recipe).
    assert (fv.input, fv.width, fv.crop, fv.learning_rate) == ("t2sub", 64, "0.875", 1e-5)
    assert fv.epochs == 3  # Later flags still win.
    # The separate-argument form too, and several flagfiles layered in order.
    argv = flags_lib.expand_flagfiles(
        ["prog", "--flagfile", "t1sub.flags", "--flagfile=demo.flags", "--input=t3"]
    )
    fv = _parse(argv[1:])
    assert (fv.input, fv.width, fv.epochs) == ("t3", 16, 20)


def test_a_file_in_the_working_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t2sub.flags").write_text("# mine\n--input=t0\n--width=8\n")
    fv = _parse(["--flagfile=t2sub.flags"])
    assert (fv.input, fv.width) == ("t0", 8)


def test_a_nested_bare_name_falls_back_to_configs(tmp_path, monkeypatch):
    # A user's own flagfile elsewhere layering over a paper flagfile by its bare name.
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "run.flags").write_text("--flagfile=t3sub.flags\n--epochs=2\n")
    monkeypatch.chdir(work)
    fv = _parse([f"--flagfile={tmp_path / 'mine' / 'run.flags'}"])
    assert (fv.input, fv.width, fv.epochs) == ("t3sub", 64, 2)
    # Next to the including file (or a parent of it) still comes first.
    (tmp_path / "t3sub.flags").write_text("--input=t1\n")
    fv = _parse([f"--flagfile={tmp_path / 'mine' / 'run.flags'}"])
    assert (fv.input, fv.width) == ("t1", 64)


def test_a_flagfile_found_nowhere_is_one_line_naming_it_and_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _error(["--flagfile=t2sub.flagz"])
    assert message.startswith("Unable to open flagfile t2sub.flagz: not found"), message
    assert str(tmp_path) in message and CONFIGS in message, message
    # A path with a directory part is only looked for where it points.
    message = _error(["--flagfile=sub/t2sub.flags"])
    assert "Unable to open flagfile sub/t2sub.flags" in message and CONFIGS not in message
    # Nested: names the including file.
    (tmp_path / "run.flags").write_text("--flagfile=nothing.flags\n")
    message = _error(["--flagfile=run.flags"])
    assert "nothing.flags" in message and "run.flags (which includes it)" in message
    assert CONFIGS in message
    # As the command line reports it.
    with pytest.raises(SystemExit) as info:
        _parse(["--flagfile=t2sub.flagz"])
    assert str(info.value.code).startswith(
        "mri_keras.train: error: Unable to open flagfile t2sub.flagz: not found (looked in the "
        f"working directory {tmp_path}, then the project's configs {CONFIGS})"
    ), info.value.code
