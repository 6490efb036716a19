"""The job queue on SQLite and PostgreSQL: claims, leases, backoff, dead letters."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from storage import queue
from storage.database import open_database
from storage.models import Job, Patient, Series, Study, utcnow
from storage.states import JobKind, JobState


@pytest.fixture
def db(database_url: str) -> Iterator[sessionmaker[Session]]:
    factory = open_database(database_url)
    yield factory
    factory.kw["bind"].dispose()


def _series(db: sessionmaker[Session], uid: str = "1.2.3") -> int:
    with db.begin() as session:
        patient = Patient(patient_id=uid, issuer="", name="")
        session.add(patient)
        session.flush()
        study = Study(study_uid=uid + ".0", patient_id=patient.id)
        session.add(study)
        session.flush()
        series = Series(series_uid=uid, study_id=study.id)
        session.add(series)
        session.flush()
        return series.id


def _expire_lease(db: sessionmaker[Session], job_id: int) -> None:
    with db.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires=utcnow() - timedelta(seconds=1))
        )


def test_a_job_is_claimed_once_and_completed(db: sessionmaker[Session]) -> None:
    series_id = _series(db)
    with db.begin() as session:
        queue.enqueue(session, JobKind.ANALYZE, series_id, series_version=3, max_attempts=3)
    with db.begin() as session:
        first = queue.claim(session, JobKind.ANALYZE, "w1", 60)
    with db.begin() as session:
        second = queue.claim(session, JobKind.ANALYZE, "w2", 60)
    assert first is not None and first.series_version == 3 and first.attempts == 1
    assert second is None
    with db.begin() as session:
        assert queue.complete(session, first)
        assert queue.counts(session) == {("analyze", "done"): 1}


def test_enqueue_refreshes_the_waiting_job_instead_of_adding_one(db: sessionmaker[Session]) -> None:
    series_id = _series(db)
    with db.begin() as session:
        a = queue.enqueue(session, JobKind.ANALYZE, series_id, series_version=1, max_attempts=3)
        b = queue.enqueue(session, JobKind.ANALYZE, series_id, series_version=5, max_attempts=3)
    assert a == b
    with db.begin() as session:
        job = queue.claim(session, JobKind.ANALYZE, "w", 60)
    assert job is not None and job.series_version == 5
    with db.begin() as session:  # while one runs, a new version queues a second analysis
        c = queue.enqueue(session, JobKind.ANALYZE, series_id, series_version=6, max_attempts=3)
    assert c != a


def test_concurrent_claimers_never_share_a_job(db: sessionmaker[Session]) -> None:
    ids = [_series(db, f"1.2.{n}") for n in range(1, 21)]
    with db.begin() as session:
        for series_id in ids:
            queue.enqueue(session, JobKind.ANALYZE, series_id, max_attempts=3)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            with db.begin() as session:
                job = queue.claim(session, JobKind.ANALYZE, name, 60)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == len(ids)


def test_an_expired_lease_returns_the_job_and_the_old_worker_cannot_settle_it(
    db: sessionmaker[Session],
) -> None:
    series_id = _series(db)
    with db.begin() as session:
        queue.enqueue(session, JobKind.ANALYZE, series_id, max_attempts=3)
    with db.begin() as session:
        dead = queue.claim(session, JobKind.ANALYZE, "dead-worker", 60)
    assert dead is not None
    _expire_lease(db, dead.id)
    with db.begin() as session:
        again = queue.claim(session, JobKind.ANALYZE, "new-worker", 60)
    assert again is not None and again.id == dead.id and again.attempts == 2
    with db.begin() as session:
        assert not queue.complete(session, dead)
        assert queue.complete(session, again)


def test_failures_back_off_then_dead_letter_with_the_reason(db: sessionmaker[Session]) -> None:
    series_id = _series(db)
    backoff = queue.Backoff(base_seconds=60, max_seconds=600, jitter=0.0)
    with db.begin() as session:
        queue.enqueue(session, JobKind.DELIVER, series_id, destination="pacs", max_attempts=2)
    with db.begin() as session:
        job = queue.claim(session, JobKind.DELIVER, "s", 60)
        assert job is not None
        assert queue.fail(session, job, "association rejected", backoff) == JobState.QUEUED
    with db.begin() as session:  # not due yet: backoff
        assert queue.claim(session, JobKind.DELIVER, "s", 60) is None
        session.execute(update(Job).values(run_after=utcnow()))
    with db.begin() as session:
        job = queue.claim(session, JobKind.DELIVER, "s", 60)
        assert job is not None and job.attempts == 2
        assert queue.fail(session, job, "association rejected", backoff) == JobState.FAILED
    with db.begin() as session:
        (dead,) = queue.recent(session, state=JobState.FAILED)
        assert dead.last_error == "association rejected"
        assert queue.retry(session, dead.id)
    with db.begin() as session:
        revived = queue.claim(session, JobKind.DELIVER, "s", 60)
    assert revived is not None and revived.attempts == 1


def test_reap_dead_letters_a_job_whose_worker_died_on_every_attempt(
    db: sessionmaker[Session],
) -> None:
    series_id = _series(db)
    with db.begin() as session:
        queue.enqueue(session, JobKind.ANALYZE, series_id, max_attempts=1)
    with db.begin() as session:
        job = queue.claim(session, JobKind.ANALYZE, "w", 60)
    assert job is not None
    _expire_lease(db, job.id)
    with db.begin() as session:
        assert queue.claim(session, JobKind.ANALYZE, "w2", 60) is None
        assert queue.reap(session) == 1
        assert queue.counts(session) == {("analyze", "failed"): 1}


def test_hand_back_does_not_count_an_attempt(db: sessionmaker[Session]) -> None:
    series_id = _series(db)
    with db.begin() as session:
        queue.enqueue(session, JobKind.ANALYZE, series_id, max_attempts=3)
    with db.begin() as session:
        job = queue.claim(session, JobKind.ANALYZE, "w", 60)
        assert job is not None
        queue.hand_back(session, job)
    with db.begin() as session:
        again = queue.claim(session, JobKind.ANALYZE, "w", 60)
    assert again is not None and again.attempts == 1


def test_backoff_doubles_up_to_its_cap_with_bounded_jitter() -> None:
    backoff = queue.Backoff(base_seconds=5, max_seconds=60, jitter=0.2)
    rng = random.Random(0)
    delays = [backoff.delay(n, rng) for n in range(1, 8)]
    nominal = [5, 10, 20, 40, 60, 60, 60]
    assert all(0.8 * d <= got <= 1.2 * d for got, d in zip(delays, nominal, strict=True))
    assert len({round(backoff.delay(3, rng), 6) for _ in range(5)}) > 1


def test_only_a_job_that_has_not_started_can_be_withdrawn(db: sessionmaker[Session]) -> None:
    waiting, running = _series(db, "1.2.7"), _series(db, "1.2.8")
    with db.begin() as session:
        queue.enqueue(session, JobKind.ANALYZE, running, max_attempts=3)
    with db.begin() as session:
        assert queue.claim(session, JobKind.ANALYZE, "w", 60) is not None
        queue.enqueue(session, JobKind.ANALYZE, waiting, max_attempts=3)
    with db.begin() as session:
        assert queue.cancel_waiting(session, JobKind.ANALYZE, waiting, "superseded")
        assert not queue.cancel_waiting(session, JobKind.ANALYZE, running, "superseded")
        assert queue.counts(session) == {
            (JobKind.ANALYZE, "cancelled"): 1,
            (JobKind.ANALYZE, "running"): 1,
        }
        (cancelled,) = queue.recent(session, state=JobState.CANCELLED)
        assert cancelled.last_error == "superseded"
        assert queue.retry(session, cancelled.id)


def test_a_running_job_says_its_stage_and_only_its_holder_may_change_it(
    db: sessionmaker[Session],
) -> None:
    series_id = _series(db)
    with db.begin() as session:
        queue.enqueue(session, JobKind.ANALYZE, series_id, max_attempts=3)
    with db.begin() as session:
        job = queue.claim(session, JobKind.ANALYZE, "w1", 60)
    assert job is not None
    with db.begin() as session:
        queue.set_stage(session, job, "detecting nodules")
        queue.set_stage(session, replace(job, worker="someone-else"), "writing")
    with db() as session:
        assert session.get_one(Job, job.id).stage == "detecting nodules"
    with db.begin() as session:
        assert queue.complete(session, job)
    with db() as session:
        assert session.get_one(Job, job.id).stage == ""
