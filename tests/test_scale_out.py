"""Several processes sharing one PostgreSQL database and one storage path, each with its own
roles: a receiver (which also sends) and two workers; one worker is killed mid-analysis. Every
series is analyzed once and its results reach the PACS once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from storage.models import Job, Result, Series
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series
from tests.peers import NodeProcess, Orthanc, free_port, node_config, storescu, wait_for

SERIES = 4


@pytest.mark.slow
def test_one_receiver_two_workers_one_killed_mid_job_every_series_once(
    tmp_path: Path, postgres_url: str
) -> None:
    pacs = Orthanc(tmp_path / "pacs").start()
    port = free_port()
    shared = {
        "storage": {"path": str(tmp_path / "shared-storage"), "database_url": postgres_url},
        "workers": {"count": 1, "device": "cpu", "lease_seconds": 8},
        "completion": {"quiet_seconds": 600},
        "destinations": [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    }
    receiver = NodeProcess(node_config(tmp_path / "receiver", port, **shared))
    workers = [NodeProcess(node_config(tmp_path / f"worker{n}", port, **shared)) for n in (1, 2)]
    db = sessionmaker(create_engine(postgres_url))
    studies = []
    try:
        receiver.start(port, roles="receiver,sender")
        for worker in workers:
            worker.start(None, roles="worker")
        for n in range(SERIES):
            spec = SeriesSpec()
            datasets = ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0)))
            studies.append(str(datasets[0].StudyInstanceUID))
            assert storescu(port, write_series(tmp_path / f"ct{n}", datasets)).returncode == 0

        def running_on_first_worker() -> bool:
            assert workers[0].process is not None
            pid = f":{workers[0].process.pid}/"
            with db() as session:
                jobs = session.scalars(select(Job).where(Job.state == "running"))
                return any(pid in job.worker for job in jobs)

        wait_for(running_on_first_worker, 120, "the first worker analyzing")
        assert workers[0].process is not None
        os.kill(workers[0].process.pid, signal.SIGKILL)
        workers[0].process.wait()
        workers[0].process = None

        def all_delivered() -> bool:
            with db() as session:
                states = [s.state for s in session.scalars(select(Series))]
                deliveries = [
                    j.state for j in session.scalars(select(Job).where(Job.kind == "deliver"))
                ]
            return states == ["analyzed"] * SERIES and deliveries == ["done"] * SERIES

        wait_for(all_delivered, 300, "every series analyzed and delivered", interval=1.0)
        with db() as session:
            results = list(session.scalars(select(Result)))
            analyses = list(session.scalars(select(Job).where(Job.kind == "analyze")))
        assert len(results) == SERIES and all(r.current for r in results)
        assert len({r.series_id for r in results}) == SERIES
        # The killed worker's job went back when its lease expired and ran again elsewhere.
        assert any(job.attempts == 2 for job in analyses)
        for study in studies:
            in_pacs = [
                i
                for i in pacs.instances_of_study(study)
                if pacs.get(f"/instances/{i['ID']}/metadata/SopClassUid").decode()
                == Comprehensive3DSRStorage
            ]
            assert len(in_pacs) == 1, f"study {study}: {len(in_pacs)} SRs in the PACS"
    finally:
        for process in (receiver, *workers):
            if process.process is not None:
                process.stop()
        pacs.stop()
        db.kw["bind"].dispose()
