"""Keeps TensorFlow's start-up logs off a command's stderr (imported first by every command).

Each command-line entry point (``python -m mri_keras.train``, ``tfrecords_tools.convert``, ...)
imports this module on its first import line, before anything imports TensorFlow. A command
then prints only its own output and its own one-line errors. Where each line came from
(measured with TensorFlow 2.21 on a Linux machine without GPU):

- ``WARNING: All log messages before absl::InitializeLog() is called are written to STDERR``
  and ``cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.``,
  twice: static initialisers of ``libtensorflow_framework.so.2`` (loaded by the first TF
  extension module, ``_pywrap_cpu_feature_guard``) and of ``_pywrap_profiler_plugin.so`` (its
  own copy of tsl/absl, loaded by ``tf.profiler``'s API module) log through C++ absl before
  anything initialises it. No setting reaches them (``TF_CPP_MIN_LOG_LEVEL=3`` does not), so
  file descriptor 2 points at a temporary file while the ``tensorflow`` package is imported.
- ``cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU
  instructions ...`` (and, on CPUs where TF turns oneDNN on by default, ``oneDNN custom
  operations are on ...``): TF's C++ INFO logs during that import, captured as well.
  ``TF_ENABLE_ONEDNN_OPTS`` is left alone: it changes the arithmetic, not only the log.
- ``cuda_platform.cc:52] failed call to cuInit`` (an ERROR line at the first device use) and
  tf.data's runtime lines (``tf_record_dataset_op.cc`` buffer size, ``generator_dataset_op.cc``
  memory patch, ``dataset.cc`` "will not be optimized"): TF's C++ logging, which honours
  ``TF_CPP_MIN_LOG_LEVEL``; set to 3 unless the environment already sets it.

TF's and Keras' Python loggers printed nothing at start-up; `mri_keras.train` already lowers
absl's Python log level to WARNING unless ``--verbosity`` is given.

To see TensorFlow's logs again, set ``MRI_KERAS_TF_LOG=1`` in the environment, or give absl's
``-v``/``--verbosity`` on the command line at 0 (INFO) or above: nothing is captured then and
``TF_CPP_MIN_LOG_LEVEL`` is left as it is. If importing TensorFlow raises, the captured text is
written to stderr before the exception propagates. If the process dies inside that import (a
C++ abort), `faulthandler` prints where on the real stderr; ``MRI_KERAS_TF_LOG=1`` then shows
TensorFlow's own message.

Nothing happens when the module is imported other than by a command (``__main__`` is not a
module of this project: pytest, a notebook calling ``mri_keras.train.run``), nor when
TensorFlow is already imported.
"""

from __future__ import annotations

import faulthandler
import importlib.abc
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence

ENV_VAR = "MRI_KERAS_TF_LOG"
_PACKAGES = ("mri_keras", "tfrecords_tools")


def _verbosity(argv: Sequence[str]) -> int | None:
    """absl's ``-v``/``--verbosity`` on the command line (the last one), or None."""
    value = None
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name, sep, text = arg.lstrip("-").partition("=")
        if name not in ("v", "verbosity"):
            continue
        if not sep:
            text = args[i + 1] if i + 1 < len(args) else ""
        try:
            value = int(text)
        except ValueError:
            pass  # absl reports it.
    return value


def logs_requested(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether the user asked for TensorFlow's logs: ``MRI_KERAS_TF_LOG`` set (not 0), or
    ``-v``/``--verbosity`` at 0 (INFO) or above in ``argv``."""
    if environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    level = _verbosity(argv)
    return level is not None and level >= 0


def _run_as_command() -> bool:
    """True while a module of this project runs as ``__main__`` (or as ``__mp_main__`` in a
    child that multiprocessing spawned from one)."""
    for name in ("__main__", "__mp_main__"):
        spec = getattr(sys.modules.get(name), "__spec__", None)
        if spec is not None and spec.name.split(".")[0] in _PACKAGES:
            return True
    return False


def _flush_stderr() -> None:
    if sys.stderr is not None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _call_with_stderr_captured(fn: Callable[[], None]) -> None:
    """Calls ``fn`` with file descriptor 2 on a temporary file; the text reaches the real
    stderr only if ``fn`` raises."""
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:  # No stderr: nothing to keep clean.
        fn()
        return
    faulthandler_was_enabled = faulthandler.is_enabled()
    failed = False
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        faulthandler.enable(file=saved)  # A crash inside fn still says where, on the real fd.
        try:
            fn()
        except Exception:
            failed = True
            raise
        finally:
            _flush_stderr()  # Python warnings written during fn belong to the captured text.
            os.dup2(saved, 2)
            faulthandler.disable()
            if faulthandler_was_enabled and sys.stderr is not None:
                faulthandler.enable()
            os.close(saved)
            if failed:
                log.seek(0)
                data = log.read()
                while data:
                    data = data[os.write(2, data) :]


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` with its start-up logs captured."""

    def __init__(self, finder: _QuietTensorFlowImport, loader: importlib.abc.Loader):
        self._finder = finder
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        # TensorFlow's own code sees its real loader.
        module.__loader__ = module.__spec__.loader = self._loader
        try:
            _call_with_stderr_captured(lambda: self._loader.exec_module(module))
        finally:
            self._finder.uninstall()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Meta path finder that wraps the loader of the first ``import tensorflow``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(self, spec.loader)
                return spec
        return None

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Sets TensorFlow's C++ log level and captures the start-up logs of its first import,
    unless the user asked for them (`logs_requested`) or TensorFlow is already imported."""
    if logs_requested(sys.argv, os.environ):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


if _run_as_command():
    install()
