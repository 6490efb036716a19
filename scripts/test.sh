#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then lint, type-check and test.
# This is the README's test command and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"

# DICOM peers the tests check against, from Debian's packages: dciodvfy (dicom3tools), the
# modality and checker (dcmtk: storescu, echoscu, dsrdump), and the PACS (orthanc; the tests
# start their own instances with temporary configs, never the system service).
# systemd-analyze checks the shipped unit file. Headless Chromium, driven by playwright-core
# from npm (never a browser download), checks the dashboard as an operator sees it.
if ! command -v dciodvfy >/dev/null || ! command -v dsrdump >/dev/null || ! command -v Orthanc >/dev/null \
  || ! command -v systemd-analyze >/dev/null || ! command -v chromium >/dev/null \
  || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    dicom3tools dcmtk orthanc orthanc-dicomweb systemd chromium
fi
# npm, only where no Node.js is installed yet (a NodeSource build already carries its own npm).
if ! command -v npm >/dev/null; then
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
# OHIF 3.13, the web viewer the results are checked in: its npm package ships the built app
# (dist/); only that is fetched, not its build dependencies.
if [ ! -f tests/browser/ohif/package/dist/index.html ]; then
  mkdir -p tests/browser/ohif
  (cd tests/browser/ohif && npm pack --silent --loglevel=error @ohif/app@3.13.2 >/dev/null \
    && tar xzf ohif-app-3.13.2.tgz && rm ohif-app-3.13.2.tgz)
fi
# PostgreSQL: the storage and queue tests run on it as well as on SQLite. The CI machine runs
# a server on 127.0.0.1:5432 (trust auth, database test); start it if it is installed but down.
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  (command -v service >/dev/null && $sudo service postgresql start) || true
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
