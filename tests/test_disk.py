"""Disk space: a watermark that refuses new work before a write can fail, and retention."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.dimse import StoreStatus
from storage.files import FreeSpace
from storage.models import Instance, Series
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series
from tests.peers import storescu, wait_for

MB = 2**20


def _store_one(port: int, path: Path) -> tuple[int, str]:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="RESMTNET")
    answer = assoc.send_c_store(pydicom.dcmread(path))
    assoc.release()
    return int(answer.Status), str(answer.get("ErrorComment", ""))


def test_below_the_watermark_stores_are_refused_until_space_returns(
    start_node: Any, tmp_path: Path
) -> None:
    """On the real file system: the watermark is set just under today's free space, then a
    file reserving more than the margin pushes the store below it, and is deleted again."""
    free = FreeSpace(tmp_path, 0).free_bytes()
    if free < 1024 * MB:
        pytest.skip("needs 1 GB free on the temporary folder's file system")
    node = start_node(workers={"count": 0}, storage={"min_free_mb": (free - 200 * MB) // MB})
    spec = SeriesSpec(slices=3)
    files = write_series(tmp_path / "ct", ct_datasets(spec, phantom(spec, None)))
    port = node.config.node.port
    assert _store_one(port, files[0])[0] == StoreStatus.SUCCESS
    filler = tmp_path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 400 * MB)
    finally:
        os.close(fd)
    try:
        wait_for(
            lambda: _store_one(port, files[1])[0] == StoreStatus.OUT_OF_RESOURCES, 10, "the refusal"
        )
        assert "free-space watermark" in _store_one(port, files[1])[1]
    finally:
        filler.unlink()
    wait_for(lambda: _store_one(port, files[1])[0] == StoreStatus.SUCCESS, 10, "recovery")
    with node.db() as session:
        assert len(list(session.scalars(select(Instance)))) == 2


def _states(node: Any) -> list[str]:
    with node.db() as session:
        return [s.state for s in session.scalars(select(Series))]


@pytest.mark.slow
def test_images_are_purged_after_delivery_and_age_but_never_before_delivery(
    start_node: Any, tmp_path: Path
) -> None:
    closed_port = 9  # discard: nothing listens, so the delivery stays pending
    retention = {"retention_days": 2 / 86400}  # two seconds
    spec = SeriesSpec()
    files = write_series(tmp_path / "ct", ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0))))

    kept = start_node(
        storage=retention,
        destinations=[{"name": "pacs", "host": "127.0.0.1", "port": closed_port}],
        sender={"backoff_seconds": 60},
    )
    purged = start_node(storage=retention)  # no destination: nothing left to deliver
    for node in (kept, purged):
        assert storescu(node.config.node.port, files).returncode == 0
    images = Path(purged.config.storage.path, "instances")
    # The series is marked purged, then its files are deleted: wait for both.
    wait_for(
        lambda: _states(purged) == ["purged"] and not list(images.rglob("*.dcm")),
        120,
        "the purge after analysis",
    )
    assert list(Path(purged.config.storage.path, "results").rglob("*.dcm")), "results are kept"
    wait_for(lambda: _states(kept) == ["analyzed"], 120, "the analysis")
    time.sleep(3)  # past the retention, several housekeeping rounds
    assert _states(kept) == ["analyzed"]
    assert len(list(Path(kept.config.storage.path, "instances").rglob("*.dcm"))) == len(files)
