from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LUNGNODE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(path: str) -> Path:
    full = SHARED_DATA / path
    if not full.exists():
        pytest.skip(f"shared test data not found at {full} (set LUNGNODE_SHARED_DATA)")
    return full


@pytest.fixture(scope="session")
def lidc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both shared LIDC cases, unpacked once per test session."""
    root = tmp_path_factory.mktemp("lidc")
    for case in ("LIDC-IDRI-0001", "LIDC-IDRI-0002"):
        with tarfile.open(shared(f"lidc/{case}.tar.xz")) as archive:
            archive.extractall(root, filter="data")
    return root


@pytest.fixture
def nodule_series(tmp_path: Path) -> tuple[Path, SeriesSpec, tuple[float, float, float]]:
    """A small synthetic CT on disk with a 12 mm solid nodule in the right lung."""
    spec = SeriesSpec()
    centre = (-40.0, 10.0, -90.0)
    files = write_series(tmp_path / "ct", ct_datasets(spec, phantom(spec, centre)))
    return files[0].parent, spec, centre
