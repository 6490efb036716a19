#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then lint, type-check and test.
# This is the README's test command and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# DICOM peers the tests check against: dciodvfy (dicom3tools) and dsrdump/storescu (dcmtk).
if ! command -v dciodvfy >/dev/null || ! command -v dsrdump >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dicom3tools dcmtk
fi

# torch first, pinned: pip takes this version from the machine's wheel cache where it lies
# on disk (a CPU build on the CI machine); elsewhere it downloads the platform's default build.
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
