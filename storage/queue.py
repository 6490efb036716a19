"""The job queue, in the database: every statement that reads or writes ``jobs`` lives here.

A job is claimed by one conditional UPDATE ... RETURNING, so two workers never hold the same
job; on PostgreSQL the candidate row is picked with ``FOR UPDATE SKIP LOCKED`` so claimers on
several machines do not queue behind each other (SQLite serialises writers anyway). A claim
carries a lease, which the holder's heartbeat (:func:`heartbeat`) extends while it works, for
as long as the job takes; a worker that dies stops beating, and its job is claimed again
once the lease runs out. Failures are retried with exponential backoff and jitter until
``max_attempts``; then the job is dead-lettered (``failed``) with its reason, until an
operator retries it.

Functions take the caller's session so that a job's outcome commits in the same transaction
as the work it records (results, deliveries): either both happen or neither does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, Select, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from storage.models import Job, utcnow
from storage.states import FINISHED, JobKind, JobState


@dataclass(frozen=True)
class ClaimedJob:
    """A job as its holder knows it; ``worker`` is whose lease it is."""

    id: int
    kind: JobKind
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

    base_seconds: float
    max_seconds: float
    jitter: float = 0.2

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        raw = min(self.max_seconds, self.base_seconds * 2 ** max(attempts - 1, 0))
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return raw * (1.0 + spread)


def enqueue(
    session: Session,
    kind: JobKind,
    series_id: int,
    *,
    max_attempts: int,
    destination: str = "",
    series_version: int = 0,
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
            Job.state == JobState.QUEUED,
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


def claim(session: Session, kind: JobKind, worker: str, lease_seconds: float) -> ClaimedJob | None:
    """Take the most urgent ready job of ``kind``: queued and due, or running on a lease its
    holder stopped renewing (it died) with attempts left."""
    now = utcnow()
    ready = or_(
        and_(Job.state == JobState.QUEUED, Job.run_after <= now),
        and_(
            Job.state == JobState.RUNNING, Job.lease_expires < now, Job.attempts < Job.max_attempts
        ),
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
            state=JobState.RUNNING,
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


def _owned(job: ClaimedJob) -> ColumnElement[bool]:
    """Only the worker that holds the lease may renew or settle a job: a worker that lost its
    lease (its heartbeat stalled past the lease) must not overwrite what the next holder did."""
    return and_(Job.id == job.id, Job.state == JobState.RUNNING, Job.worker == job.worker)


def heartbeat(session: Session, job: ClaimedJob, lease_seconds: float) -> bool:
    """Extend the holder's lease to ``lease_seconds`` from now. Returns False when the job is
    no longer this holder's (taken over after a stall, or settled): its work must stop."""
    result = session.execute(
        update(Job)
        .where(_owned(job))
        .values(lease_expires=utcnow() + timedelta(seconds=lease_seconds))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def set_stage(session: Session, job: ClaimedJob, stage: str) -> None:
    """Say what the running job does now; ``updated`` then tells how long it has been at it."""
    session.execute(update(Job).where(_owned(job)).values(stage=stage[:32], updated=utcnow()))


def complete(session: Session, job: ClaimedJob) -> bool:
    """Mark the job done; False when the lease was lost (the caller's transaction must then
    be rolled back: another holder does the work)."""
    result = session.execute(
        update(Job)
        .where(_owned(job))
        .values(state=JobState.DONE, stage="", lease_expires=None, last_error="", updated=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def fail(
    session: Session, job: ClaimedJob, error: str, backoff: Backoff, *, retry: bool = True
) -> JobState:
    """Record a failed attempt; queue it again after the backoff, or dead-letter it (at once
    when ``retry`` is False: the failure is not one that time cures). Returns the new state."""
    now = utcnow()
    final = not retry or job.attempts >= job.max_attempts
    state = JobState.FAILED if final else JobState.QUEUED
    session.execute(
        update(Job)
        .where(_owned(job))
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
        .where(_owned(job))
        .values(
            state=JobState.QUEUED,
            attempts=Job.attempts - 1,
            lease_expires=None,
            run_after=utcnow(),
            updated=utcnow(),
        )
    )


def lease_holders(session: Session) -> list[str]:
    """The workers that hold a running job's lease now."""
    held = select(Job.worker).where(Job.state == JobState.RUNNING).distinct()
    return [str(worker) for worker in session.scalars(held)]


def expire_leases(session: Session, workers: list[str]) -> int:
    """End the leases of workers known to be dead: their jobs are claimable at once, each
    attempt counted as a crash is. Returns how many."""
    result = session.execute(
        update(Job)
        .where(Job.state == JobState.RUNNING, Job.worker.in_(workers))
        .values(lease_expires=utcnow() - timedelta(seconds=1), updated=utcnow())
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def reap(session: Session) -> int:
    """Dead-letter jobs whose lease expired on their last attempt (the worker died each time:
    the input may be what kills it). Returns how many."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.state == JobState.RUNNING,
            Job.lease_expires < now,
            Job.attempts >= Job.max_attempts,
        )
        .values(
            state=JobState.FAILED,
            lease_expires=None,
            last_error="the worker stopped without finishing on every attempt (lease expired)",
            updated=now,
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def cancel_waiting(session: Session, kind: JobKind, series_id: int, reason: str) -> bool:
    """Withdraw the series' job of ``kind`` if it has not started; a running one is left to
    finish. Returns whether one was withdrawn."""
    result = session.execute(
        update(Job)
        .where(Job.kind == kind, Job.series_id == series_id, Job.state == JobState.QUEUED)
        .values(state=JobState.CANCELLED, last_error=reason[:4000], updated=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def retry(session: Session, job_id: int) -> bool:
    """An operator's retry of a failed, cancelled or finished job: queued now, attempts
    counted afresh."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(FINISHED))
        .values(state=JobState.QUEUED, attempts=0, run_after=now, last_error="", updated=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def series_with_unfinished_delivery() -> Select[int]:
    """Series ids with a delivery still owed (queued, running or dead-lettered): their images
    must stay, for a resend after an operator's retry may need the analysis again."""
    return select(Job.series_id).where(
        Job.kind == JobKind.DELIVER,
        Job.state.in_((JobState.QUEUED, JobState.RUNNING, JobState.FAILED)),
    )


def counts(session: Session) -> dict[tuple[JobKind, JobState], int]:
    """Jobs by (kind, state)."""
    rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
    return {(kind, state): int(n) for kind, state, n in rows}


def delivery_counts(session: Session) -> dict[tuple[str, JobState], int]:
    """Delivery jobs by (destination, state)."""
    rows = session.execute(
        select(Job.destination, Job.state, func.count())
        .where(Job.kind == JobKind.DELIVER)
        .group_by(Job.destination, Job.state)
    )
    return {(destination, state): int(n) for destination, state, n in rows}


def jobs_of_series(session: Session, series_id: int) -> list[Job]:
    """Every job of one series, analyses and deliveries, oldest first."""
    return list(session.scalars(select(Job).where(Job.series_id == series_id).order_by(Job.id)))


def recent(session: Session, limit: int = 50, state: JobState | None = None) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        query = query.where(Job.state == state)
    return list(session.scalars(query))
