#!/usr/bin/env bash
# Creates .venv (if missing) with the python3 on PATH, installs the package with its test
# extras, checks lint and formatting with ruff, and runs pytest. Extra arguments go to
# pytest, e.g. scripts/test.sh -m "not slow".
# Tests run in parallel (pytest-xdist, one test file per worker at a time): TEST_WORKERS
# processes, by default one per CPU up to 4 (each holds a TensorFlow process and its
# subprocesses: ~2 GB); TEST_WORKERS=0 runs them one after another in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,dicom-codecs,distributed-tuning,beam]"
# Lint and format check first (configured in pyproject.toml): a failure fails CI.
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
WORKERS="${TEST_WORKERS:-$(.venv/bin/python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
exec .venv/bin/python -m pytest -n "$WORKERS" --dist loadfile "$@"
