"""Running jobs with live leases, on SQLite and PostgreSQL: a job longer than its lease runs
once, a killed worker's job is taken over, a worker that lost its lease records nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import JobSettings, NodeConfig
from dicom_node.deliver.sender import Sender
from dicom_node.jobs import (
    JobHandler,
    JobRunner,
    Lease,
    predecessor_is_gone,
    process_identity,
    take_back_predecessors_jobs,
)
from storage import queue
from storage.database import open_database
from storage.models import Job, Patient, Series, Study
from storage.states import JobKind, JobState
from tests.conftest import REPO

LEASE_SECONDS = 1.5
#: Only the lease matters to these jobs; they are never retried within a test.
SETTINGS = JobSettings(
    lease_seconds=LEASE_SECONDS, max_attempts=3, backoff_seconds=1, max_backoff_seconds=1
)


@pytest.fixture
def db(database_url: str) -> Iterator[sessionmaker[Session]]:
    factory = open_database(database_url)
    yield factory
    factory.kw["bind"].dispose()


def _queued_job(
    db: sessionmaker[Session],
    max_attempts: int = 3,
    kind: JobKind = JobKind.ANALYZE,
    destination: str = "",
) -> int:
    with db.begin() as session:
        patient = Patient(patient_id="P", issuer="", name="")
        session.add(patient)
        session.flush()
        study = Study(study_uid="1.2.3", patient_id=patient.id)
        session.add(study)
        session.flush()
        series = Series(series_uid="1.2.3.4", study_id=study.id)
        session.add(series)
        session.flush()
        return queue.enqueue(
            session, kind, series.id, max_attempts=max_attempts, destination=destination
        )


def _job(db: sessionmaker[Session], job_id: int) -> Job:
    with db() as session:
        return session.get_one(Job, job_id)


class Slow(JobHandler):
    """Works ``seconds`` (checking its lease now and then), then completes the job."""

    kind = JobKind.ANALYZE

    def __init__(self, db: sessionmaker[Session], seconds: float) -> None:
        super().__init__(SETTINGS)
        self.db = db
        self.seconds = seconds
        self.runs: list[str] = []
        self.started = threading.Event()

    def run(self, job: queue.ClaimedJob, lease: Lease) -> None:
        self.runs.append(job.worker)
        self.started.set()
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            lease.stage("working")
            time.sleep(0.1)
        with self.db.begin() as session:
            assert queue.complete(session, job)


class Stuck(JobHandler):
    """Never finishes on its own: works until ``release`` is set, and settles nothing."""

    kind = JobKind.ANALYZE

    def __init__(self) -> None:
        super().__init__(SETTINGS)
        self.started = threading.Event()
        self.release = threading.Event()

    def run(self, job: queue.ClaimedJob, lease: Lease) -> None:
        self.started.set()
        self.release.wait(30)


def _poll(runner: JobRunner, until: Callable[[], bool], seconds: float) -> int:
    """Call ``runner.run_once`` until ``until()``; how many jobs it ran."""
    ran, deadline = 0, time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        ran += runner.run_once()
        time.sleep(0.05)
    return ran


def _worker_holding(
    job_id: int, database_url: str, lease_seconds: float, *args: str
) -> subprocess.Popen[str]:
    """A worker process (tests/lease_worker.py) once it holds the job's lease."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.lease_worker", database_url, str(lease_seconds), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert worker.stdout is not None
    if worker.stdout.readline().strip() != f"claimed {job_id}":
        worker.kill()
        raise AssertionError(f"the worker process did not claim job {job_id}")
    return worker


def test_a_job_longer_than_its_lease_runs_once_and_finishes(db: sessionmaker[Session]) -> None:
    job_id = _queued_job(db)
    slow = Slow(db, seconds=4 * LEASE_SECONDS)
    first = JobRunner(db, slow, "first", threading.Event())
    worker = threading.Thread(target=first.run_once)
    worker.start()
    assert slow.started.wait(10)
    # A second worker polls the whole time the first one works, four leases long.
    other = Slow(db, seconds=0)
    second = JobRunner(db, other, "second", threading.Event())
    ran = _poll(second, lambda: not worker.is_alive(), 30)
    worker.join()
    job = _job(db, job_id)
    assert (ran, other.runs) == (0, [])
    assert slow.runs == ["first"]
    assert (job.state, job.attempts, job.worker) == (JobState.DONE, 1, "first")


def test_a_killed_workers_job_is_taken_over_once_its_lease_lapses(
    db: sessionmaker[Session], database_url: str
) -> None:
    job_id = _queued_job(db)
    doomed = _worker_holding(job_id, database_url, LEASE_SECONDS)
    try:
        time.sleep(2 * LEASE_SECONDS)  # alive and beating: the job stays its own
        assert _job(db, job_id).worker == "doomed-worker"
        rescuer = Slow(db, seconds=0)
        assert not JobRunner(db, rescuer, "rescuer", threading.Event()).run_once()
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        killed_at = time.monotonic()
        ran = _poll(
            JobRunner(db, rescuer, "rescuer", threading.Event()),
            lambda: bool(rescuer.runs),
            10 * LEASE_SECONDS,
        )
    finally:
        doomed.kill()
        doomed.wait()
    job = _job(db, job_id)
    assert ran == 1 and rescuer.runs == ["rescuer"]
    assert time.monotonic() - killed_at <= 10 * LEASE_SECONDS
    assert (job.state, job.attempts, job.worker) == (JobState.DONE, 2, "rescuer")


def test_a_restarted_node_takes_back_its_dead_predecessors_jobs_at_once(
    db: sessionmaker[Session], database_url: str
) -> None:
    job_id = _queued_job(db)
    crashed = _worker_holding(job_id, database_url, 600, "--as-node")
    try:
        identity = process_identity()
        assert take_back_predecessors_jobs(db, identity) == 0  # alive: its lease holds
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(10)
        assert take_back_predecessors_jobs(db, identity) == 1
    finally:
        crashed.kill()
        crashed.wait()
    rescuer = Slow(db, seconds=0)
    assert JobRunner(db, rescuer, f"{identity}/worker0", threading.Event()).run_once() == 1
    assert (_job(db, job_id).state, _job(db, job_id).attempts) == (JobState.DONE, 2)


def test_only_this_machines_dead_processes_count_as_predecessors() -> None:
    alive = {100}.__contains__
    me = "ct-node:200"
    assert predecessor_is_gone("ct-node:300/worker0", me, alive)
    assert predecessor_is_gone("ct-node:200/sender", me, alive)  # a pid reused after a crash
    assert not predecessor_is_gone("ct-node:100/worker1", me, alive)
    assert not predecessor_is_gone("other-host:300/worker0", me, alive)
    assert not predecessor_is_gone("doomed-worker", me, alive)


def test_a_worker_whose_lease_was_taken_over_records_nothing(db: sessionmaker[Session]) -> None:
    job_id = _queued_job(db)
    slow = Slow(db, seconds=4 * LEASE_SECONDS)
    runner = JobRunner(db, slow, "stalled", threading.Event())
    worker = threading.Thread(target=runner.run_once)
    worker.start()
    assert slow.started.wait(10)
    with db.begin() as session:  # as if its heartbeats had stalled and another took the job
        session.execute(update(Job).where(Job.id == job_id).values(worker="successor"))
    worker.join(30)
    job = _job(db, job_id)
    assert (job.state, job.worker, job.last_error) == (JobState.RUNNING, "successor", "")


def test_after_the_stop_grace_period_a_lease_is_no_longer_renewed(
    db: sessionmaker[Session],
) -> None:
    job_id = _queued_job(db)
    abandon = threading.Event()
    stuck = Stuck()
    worker = threading.Thread(target=JobRunner(db, stuck, "stuck", abandon).run_once)
    worker.start()
    try:
        assert stuck.started.wait(10)
        abandon.set()  # the node's stop gave up waiting for this worker
        rescuer = Slow(db, seconds=0)
        runner = JobRunner(db, rescuer, "rescuer", threading.Event())
        ran = _poll(runner, lambda: bool(rescuer.runs), 10 * LEASE_SECONDS)
    finally:
        stuck.release.set()
        worker.join()
    assert ran == 1 and _job(db, job_id).worker == "rescuer"


def test_a_delivery_to_a_destination_no_longer_configured_is_dead_lettered_at_once(
    db: sessionmaker[Session],
) -> None:
    job_id = _queued_job(db, max_attempts=8, kind=JobKind.DELIVER, destination="old-pacs")
    sender = Sender(db, NodeConfig(), threading.Event())
    assert JobRunner(db, sender, "sender", threading.Event()).run_once()
    job = _job(db, job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert job.last_error == "destination 'old-pacs' is no longer in the configuration"
