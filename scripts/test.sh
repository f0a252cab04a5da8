#!/usr/bin/env bash
# Creates .venv (if missing) with the python3 on PATH, installs the package with its test
# extras, checks lint and formatting with ruff, and runs pytest. Extra arguments go to
# pytest, e.g. scripts/test.sh -m "not slow".
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
exec .venv/bin/python -m pytest "$@"
