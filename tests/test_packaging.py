"""A wheel (what a non-editable ``pip install .`` installs) holds every module and the
flagfiles, and ``--flagfile=t2sub.flags`` / ``tune.flags`` resolve from the installed copy."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "mri_keras", "tfrecords_tools", "configs")


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _source_files(top):
    """Paths of the files a wheel must hold for the package directory ``top``."""
    out = set()
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(root, REPO)
        out.update(os.path.join(rel, f).replace(os.sep, "/") for f in files if f.endswith(".py"))
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="64")
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"  # A copy: building writes build/ and *.egg-info next to setup.cfg.
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy(path, src / name)
    # Offline: the build runs with this interpreter's setuptools, no index.
    pip_wheel = "-m pip wheel . --no-deps --no-build-isolation --no-index -q -w".split()
    _run([sys.executable, *pip_wheel, str(base / "dist")], cwd=src)
    (path,) = (base / "dist").glob("mri_keras-*.whl")
    return path


def test_the_wheel_holds_every_module_and_the_flagfiles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = (_source_files("mri_keras") | _source_files("tfrecords_tools")) - names
    assert not missing, f"not in the wheel (a sub-package missing from setup.cfg?): {missing}"
    configs = {f for f in os.listdir(os.path.join(REPO, "configs")) if not f.startswith(".")}
    assert {f"mri_keras/configs/{f}" for f in configs} <= names
    assert not any(n.startswith("configs/") for n in names)  # Not a top-level package.


def test_flagfiles_resolve_from_the_installed_package(wheel, tmp_path):
    site = tmp_path / "site"
    pip_install = "-m pip install --no-deps --no-index -q --target".split()
    _run([sys.executable, *pip_install, str(site), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed copy comes first on the path; the checkout is not on it.
    env = dict(os.environ, PYTHONPATH=str(site))
    script = textwrap.dedent(
        """
        import json
        import mri_keras
        from mri_keras import flags, tune
        print(json.dumps({
            "package": mri_keras.__file__,
            "configs": flags._configs_dirs(),
            "t2sub": flags.expand_flagfiles(["p", "--flagfile=t2sub.flags"]),
            "tune": flags.expand_flagfiles(["p", "--flagfile=tune.flags"]),
            "space": tune._search_space_path("configs/tune_space.json"),
        }))
        """
    )
    proc = _run([sys.executable, "-c", script], cwd=elsewhere, env=env)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = os.path.join(str(site), "mri_keras")
    assert got["package"].startswith(installed), got["package"]
    assert got["configs"] == [os.path.join(installed, "configs")]
    assert "--input=t2sub" in got["t2sub"] and "--width=64" in got["t2sub"]  # base.flags too
    assert "--tuner=hyperband" in got["tune"] and "--input=t2sub" in got["tune"]
    assert got["space"] == os.path.join(installed, "configs", "tune_space.json")
    # The command itself: the flagfile resolves, then the missing records stop it.
    missing = tmp_path / "no_records"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mri_keras.train",
            "--flagfile=t2sub.flags",
            f"--data_dir={missing}",
            f"--model_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
        env=env,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mri_keras.train: error: data_dir '{missing}' does not exist."
    ), proc.stderr[-2000:]
