"""Commands print only their own output: TensorFlow's start-up logs stay off stderr unless
asked for (``MRI_KERAS_TF_LOG=1`` or ``-v``), and real errors still reach the user."""

import ast
import os
import subprocess
import sys

import pytest
import train_fixtures

from tfrecords_tools import quiet_tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines TensorFlow 2.21 prints on its own (see tfrecords_tools/quiet_tf.py for their sources).
CHATTER = (
    "absl::InitializeLog",
    "cudart_stub.cc",
    "cpu_feature_guard.cc",
    "oneDNN custom operations",
    "cuda_platform.cc",
    "tf_record_dataset_op.cc",
    "I0000 ",
    "W0000 ",
    "E0000 ",
)


def _command(args, cwd, pythonpath=REPO, **env):
    base = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet_tf.ENV_VAR)
    }
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=dict(base, PYTHONPATH=pythonpath, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _chatter(text):
    return [line for line in text.splitlines() if any(c in line for c in CHATTER)]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("quiet") / "records")
    train_fixtures.write_records(path, {"train": 2, "val": 2})
    return path


def test_commands_print_only_their_own_output(tmp_path):
    # --help imports TensorFlow (the training flags' definitions need it).
    proc = _command(["mri_keras.train", "--help"], tmp_path)
    assert "--data_dir" in proc.stdout and proc.stderr == "", proc.stderr
    # A bare flagfile name, then missing records: the error alone, on one line.
    missing = tmp_path / "no_records"
    proc = _command(
        [
            "mri_keras.train",
            "--flagfile=t2sub.flags",
            f"--data_dir={missing}",
            f"--model_dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"mri_keras.train: error: data_dir '{missing}' does not exist.\n"


@pytest.mark.slow
def test_a_training_run_prints_only_its_own_output(records, tmp_path):
    # One epoch of a tiny model: tf.data, the training loop, checkpoints and the export all
    # log from C++ at run time (TFRecordDataset, GeneratorDataset, ...), none of it shown.
    argv = [f"--data_dir={records}", f"--model_dir={tmp_path / 'run'}", "--epochs=1"]
    proc = _command(
        ["mri_keras.train", *argv, *train_fixtures.TINY_FLAGS, "--noprogress"], tmp_path
    )
    assert proc.returncode == 0 and "Finished 1 epoch" in proc.stdout, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_tensorflow_logs_come_back_when_asked(tmp_path):
    missing = tmp_path / "no_records"
    argv = ["mri_keras.train", f"--data_dir={missing}", f"--model_dir={tmp_path / 'run'}"]
    proc = _command(argv, tmp_path, MRI_KERAS_TF_LOG="1")
    assert proc.returncode == 1
    assert _chatter(proc.stderr), proc.stderr
    assert (
        proc.stderr.splitlines()[-1]
        == f"mri_keras.train: error: data_dir '{missing}' does not exist."
    )


@pytest.mark.parametrize(
    "argv, environ, expected",
    [
        ([], {}, False),
        (["--data_dir=d"], {"MRI_KERAS_TF_LOG": "0"}, False),
        ([], {"MRI_KERAS_TF_LOG": "1"}, True),
        (["-v", "0"], {}, True),
        (["-v=1"], {}, True),
        (["--verbosity=0"], {}, True),
        (["--verbosity", "-1"], {}, False),
        (["--v=2", "--verbosity=-1"], {}, False),  # The last one counts, as in absl.
        (["--", "--verbosity=1"], {}, False),  # After "--": not a flag.
        (["--vmodule=x", "--verbose"], {}, False),
    ],
)
def test_what_asks_for_tensorflow_logs(argv, environ, expected):
    assert quiet_tf.logs_requested(["prog", *argv], environ) is expected


def test_importing_an_entry_point_changes_nothing():
    # Under pytest (or a notebook calling train.run) no command runs: no hook, no settings.
    import mri_keras.train  # noqa: F401

    assert not quiet_tf._run_as_command()
    assert not any(isinstance(f, quiet_tf._QuietTensorFlowImport) for f in sys.meta_path)


def _fake_tensorflow(tmp_path, body):
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os\nos.write(2, b'fake C++ start-up line\\n')\n" + body
    )
    return f"{tmp_path / 'fake'}{os.pathsep}{REPO}"


_TRAIN_RUN = ["mri_keras.train", "--data_dir=no_records", "--model_dir=no_run"]


def test_a_failing_tensorflow_import_is_shown_with_its_log(tmp_path):
    path = _fake_tensorflow(tmp_path, "raise ImportError('libcudnn.so.9: cannot open')\n")
    # --help needs no TensorFlow; a run imports it before anything else.
    proc = _command(_TRAIN_RUN, tmp_path, pythonpath=path)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert "fake C++ start-up line" in lines, proc.stderr
    assert lines[-1] == "ImportError: libcudnn.so.9: cannot open", proc.stderr
    assert lines.index("fake C++ start-up line") < lines.index("Traceback (most recent call last):")


def test_a_crash_inside_the_tensorflow_import_says_where(tmp_path):
    path = _fake_tensorflow(tmp_path, "os.abort()\n")
    proc = _command(_TRAIN_RUN, tmp_path, pythonpath=path)
    assert proc.returncode != 0
    assert "Fatal Python error: Aborted" in proc.stderr, proc.stderr
    assert os.path.join("fake", "tensorflow", "__init__.py") in proc.stderr, proc.stderr


def _entry_points():
    for package in ("mri_keras", "tfrecords_tools"):
        for name in sorted(os.listdir(os.path.join(REPO, package))):
            path = os.path.join(REPO, package, name)
            if name.endswith(".py"):
                with open(path) as f:
                    tree = ast.parse(f.read())
                if any(_is_main_guard(node) for node in tree.body):
                    yield f"{package}/{name}", tree


def _is_main_guard(node):
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def test_every_entry_point_imports_the_quiet_start_first():
    found = dict(_entry_points())
    assert {"mri_keras/train.py", "tfrecords_tools/convert.py"} <= set(found)
    for path, tree in found.items():
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        imports = [
            n for n in imports if not (isinstance(n, ast.ImportFrom) and n.module == "__future__")
        ]
        first = imports[0]
        assert isinstance(first, ast.ImportFrom) and (first.module, first.names[0].name) == (
            "tfrecords_tools",
            "quiet_tf",
        ), f"{path}: the first import must be `from tfrecords_tools import quiet_tf`"
