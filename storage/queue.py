"""The job queue, in the database: every statement that reads or writes ``jobs`` lives here.

A job is claimed by one conditional UPDATE ... RETURNING, so two workers never hold the same
job; on PostgreSQL the candidate row is picked with ``FOR UPDATE SKIP LOCKED`` so claimers on
several machines do not queue behind each other (SQLite serialises writers anyway). A claim
carries a lease: a worker that dies stops renewing it, and the job returns to the queue when
it expires. Failures are retried with exponential backoff and jitter until ``max_attempts``;
then the job is dead-lettered (state ``failed``) with its reason, until an operator retries it.

Functions take the caller's session so that a job's outcome commits in the same transaction
as the work it records (results, deliveries): either both happen or neither does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from storage.models import Job, utcnow

Kind = Literal["analyze", "deliver"]
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
#: Withdrawn before it ran: its work is no longer wanted (a better series came).
CANCELLED = "cancelled"


class HandedBack(Exception):
    """Raised by a job's runner when the node is stopping: the job goes back to the queue
    untouched (:func:`hand_back`), its attempt uncounted."""


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    series_id: int
    destination: str
    attempts: int
    max_attempts: int
    series_version: int
    worker: str


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1: base * 2^(n-1), capped, times 1 +- jitter (so that many
    deliveries failing together do not retry together)."""

    base_seconds: float = 5.0
    max_seconds: float = 900.0
    jitter: float = 0.2

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        raw = min(self.max_seconds, self.base_seconds * 2 ** max(attempts - 1, 0))
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return raw * (1.0 + spread)


def enqueue(
    session: Session,
    kind: Kind,
    series_id: int,
    *,
    destination: str = "",
    series_version: int = 0,
    max_attempts: int = 3,
    priority: int = 0,
) -> int:
    """Queue a job, or refresh the one already waiting for the same series and destination
    (a series that keeps receiving slices is analyzed once, at its newest version)."""
    waiting = session.execute(
        select(Job.id)
        .where(
            Job.kind == kind,
            Job.series_id == series_id,
            Job.destination == destination,
            Job.state == QUEUED,
        )
        .limit(1)
    ).scalar_one_or_none()
    now = utcnow()
    if waiting is not None:
        session.execute(
            update(Job)
            .where(Job.id == waiting)
            .values(
                series_version=case(
                    (Job.series_version < series_version, series_version),
                    else_=Job.series_version,
                ),
                priority=case((Job.priority < priority, priority), else_=Job.priority),
                updated=now,
            )
        )
        return int(waiting)
    job = Job(
        kind=kind,
        series_id=series_id,
        destination=destination,
        series_version=series_version,
        max_attempts=max_attempts,
        priority=priority,
        run_after=now,
        created=now,
        updated=now,
    )
    session.add(job)
    session.flush()
    return job.id


def claim(session: Session, kind: Kind, worker: str, lease_seconds: float) -> ClaimedJob | None:
    """Take the most urgent ready job of ``kind``: queued and due, or running on an expired
    lease (its worker died) with attempts left."""
    now = utcnow()
    ready = or_(
        and_(Job.state == QUEUED, Job.run_after <= now),
        and_(Job.state == RUNNING, Job.lease_expires < now, Job.attempts < Job.max_attempts),
    )
    pick = (
        select(Job.id)
        .where(Job.kind == kind, ready)
        .order_by(Job.priority.desc(), Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = session.execute(
        update(Job)
        .where(Job.id == pick)
        .values(
            state=RUNNING,
            stage="claimed",
            attempts=Job.attempts + 1,
            lease_expires=now + timedelta(seconds=lease_seconds),
            worker=worker,
            updated=now,
        )
        .returning(
            Job.id,
            Job.kind,
            Job.series_id,
            Job.destination,
            Job.attempts,
            Job.max_attempts,
            Job.series_version,
        )
    ).one_or_none()
    if row is None:
        return None
    return ClaimedJob(*row, worker=worker)


def _owned(job: ClaimedJob) -> object:
    """Only the worker that holds the lease may settle a job: a worker that lost its lease
    (too slow, thought dead) must not overwrite what the next holder did."""
    return and_(Job.id == job.id, Job.state == RUNNING, Job.worker == job.worker)


def set_stage(session: Session, job: ClaimedJob, stage: str) -> None:
    """Say what the running job does now; ``updated`` then tells how long it has been at it."""
    session.execute(
        update(Job)
        .where(_owned(job))  # type: ignore[arg-type]
        .values(stage=stage[:32], updated=utcnow())
    )


def complete(session: Session, job: ClaimedJob) -> bool:
    result = session.execute(
        update(Job)
        .where(_owned(job))  # type: ignore[arg-type]
        .values(state=DONE, stage="", lease_expires=None, last_error="", updated=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def fail(
    session: Session, job: ClaimedJob, error: str, backoff: Backoff, *, retry: bool = True
) -> str:
    """Record a failed attempt; queue it again after the backoff, or dead-letter it.
    Returns the job's new state."""
    now = utcnow()
    final = not retry or job.attempts >= job.max_attempts
    state = FAILED if final else QUEUED
    session.execute(
        update(Job)
        .where(_owned(job))  # type: ignore[arg-type]
        .values(
            state=state,
            lease_expires=None,
            last_error=error[:4000],
            run_after=now + timedelta(seconds=0 if final else backoff.delay(job.attempts)),
            updated=now,
        )
    )
    return state


def hand_back(session: Session, job: ClaimedJob) -> None:
    """Return a job untouched (the node is stopping): the attempt does not count."""
    session.execute(
        update(Job)
        .where(_owned(job))  # type: ignore[arg-type]
        .values(
            state=QUEUED,
            attempts=Job.attempts - 1,
            lease_expires=None,
            run_after=utcnow(),
            updated=utcnow(),
        )
    )


def reap(session: Session) -> int:
    """Dead-letter jobs whose lease expired on their last attempt (the worker died each time:
    the input may be what kills it). Returns how many."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.state == RUNNING,
            Job.lease_expires < now,
            Job.attempts >= Job.max_attempts,
        )
        .values(
            state=FAILED,
            lease_expires=None,
            last_error="the worker stopped without finishing on every attempt (lease expired)",
            updated=now,
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def cancel_waiting(session: Session, kind: Kind, series_id: int, reason: str) -> bool:
    """Withdraw the series' job of ``kind`` if it has not started; a running one is left to
    finish. Returns whether one was withdrawn."""
    result = session.execute(
        update(Job)
        .where(Job.kind == kind, Job.series_id == series_id, Job.state == QUEUED)
        .values(state=CANCELLED, last_error=reason[:4000], updated=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def retry(session: Session, job_id: int) -> bool:
    """An operator's retry of a failed, cancelled or finished job: queued now, attempts
    counted afresh."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_([FAILED, DONE, CANCELLED]))
        .values(state=QUEUED, attempts=0, run_after=now, last_error="", updated=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def counts(session: Session) -> dict[tuple[str, str], int]:
    """Jobs by (kind, state)."""
    rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
    return {(kind, state): int(n) for kind, state, n in rows}


def delivery_counts(session: Session) -> dict[tuple[str, str], int]:
    """Delivery jobs by (destination, state)."""
    rows = session.execute(
        select(Job.destination, Job.state, func.count())
        .where(Job.kind == "deliver")
        .group_by(Job.destination, Job.state)
    )
    return {(destination, state): int(n) for destination, state, n in rows}


def recent(session: Session, limit: int = 50, state: str | None = None) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        query = query.where(Job.state == state)
    return list(session.scalars(query))
