"""The index database out of reach for a while (PostgreSQL, through a path the test cuts):
stores are refused with Out of Resources while nothing can be committed, and accepted again,
by themselves, once the database is back. Nothing acknowledged is missing from the index."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.dimse import StoreStatus
from storage.models import Instance
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom
from tests.peers import TcpProxy, wait_for


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)
    netloc = f"{host[0]}@127.0.0.1:{port}" if len(host) == 2 else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _store(port: int, ds: pydicom.Dataset) -> tuple[int, str]:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="RESMTNET")
    answer = assoc.send_c_store(ds)
    assoc.release()
    return int(answer.Status), str(answer.get("ErrorComment", ""))


def test_stores_are_refused_while_the_database_is_away_and_resume_after(
    start_node: Any, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy(urlsplit(postgres_url).port or 5432)
    try:
        node = start_node(
            workers={"count": 0},
            storage={"database_url": _through(postgres_url, proxy.port)},
        )
        port = node.config.node.port
        spec = SeriesSpec(slices=3, rows=16, columns=16)
        first, during, after = ct_datasets(spec, phantom(spec, None))
        assert _store(port, first) == (StoreStatus.SUCCESS, "")
        proxy.cut()
        code, comment = _store(port, during)
        assert code == StoreStatus.OUT_OF_RESOURCES and "database unavailable" in comment

        def housekeeping_said_so() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "housekeeping: database unavailable" in r.message]

        # The background loops say so in one line each time, without a traceback.
        said = wait_for(housekeeping_said_so, 30, "the housekeeping loop's log line")
        assert all(r.exc_info is None for r in said)
        proxy.restore()
        wait_for(
            lambda: _store(port, during)[0] == StoreStatus.SUCCESS, 30, "stores accepted again"
        )
        assert _store(port, after) == (StoreStatus.SUCCESS, "")
        with node.db() as session:
            indexed = {i.sop_uid for i in session.scalars(select(Instance))}
        assert indexed == {str(ds.SOPInstanceUID) for ds in (first, during, after)}
    finally:
        proxy.close()
