"""Loads a script of scripts/bench/ as a module, for the tests of its functions."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
    """``scripts/bench/<name>.py`` as a module (its ``main`` not run)."""
    path = os.path.join(REPO, "scripts", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
