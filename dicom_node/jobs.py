"""Running queued jobs: claim one, keep its lease alive while it runs, record how it ended.

The analysis workers and the sender are one loop around different work (procrastinate's
``Worker``): a :class:`JobHandler` says what a job of its kind does and how its failures are
retried; :class:`JobRunner` claims, beats, runs and settles. Neither holds SQL: the queue's
functions (:mod:`storage.queue`) do.

While a job runs, its :class:`Lease` renews the claim every third of ``lease_seconds``, so a
job may take as long as it needs (a 2000-slice scan on a slow CPU, a PACS that answers in
minutes) and is never handed to a second worker while the first is alive. A worker that dies
stops beating; once the lease runs out, another claims the job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import JobSettings
from dicom_node.observe import metrics
from storage import queue
from storage.files import pid_running
from storage.states import JobKind, JobState

log = logging.getLogger(__name__)


def process_identity() -> str:
    """``host:pid``: the prefix of the names this process's runners hold leases under."""
    return f"{socket.gethostname()}:{os.getpid()}"


def predecessor_is_gone(
    worker: str, identity: str, running: Callable[[int], bool] = pid_running
) -> bool:
    """Whether a lease holder was a process of this machine that is no more: a crashed node
    restarted by systemd. A holder with this very process's ``host:pid`` is a predecessor
    too (a container restarts with the same pid), since this process holds nothing yet."""
    host = identity.partition(":")[0]
    holder, _, rest = worker.partition("/")
    holder_host, _, holder_pid = holder.partition(":")
    if holder_host != host or not holder_pid.isdigit() or not rest:
        return False
    return holder == identity or not running(int(holder_pid))


def take_back_predecessors_jobs(db: sessionmaker[Session], identity: str) -> int:
    """At start, before any runner claims: end the leases this machine's dead processes left,
    so their jobs run again now, not once the leases run out. A holder on another machine,
    or whose pid is alive, keeps its lease (it may be working)."""
    with db.begin() as session:
        gone = [w for w in queue.lease_holders(session) if predecessor_is_gone(w, identity)]
        return queue.expire_leases(session, gone) if gone else 0


class HandedBack(Exception):
    """Raised by a job's work when the node is stopping: the job goes back to the queue
    untouched, its attempt uncounted."""


class LeaseLost(Exception):
    """The job is no longer this worker's (its heartbeats stopped reaching the database for
    longer than the lease, and another worker took it): stop, record nothing."""


class JobFailed(Exception):
    """An expected failure (a peer refused, a file is gone): logged as one line, no traceback.
    ``retry`` False dead-letters the job at once: waiting will not mend it."""

    def __init__(self, reason: str, *, retry: bool = True) -> None:
        super().__init__(reason)
        self.retry = retry


class Lease:
    """The holder's side of a claimed job: a thread renews the lease while the work runs.

    ``abandon`` is the node's: once set (the stop's grace period is over) the lease is no
    longer renewed, so the job returns to the queue when it runs out even if this process
    lives on.
    """

    def __init__(
        self,
        db: sessionmaker[Session],
        job: queue.ClaimedJob,
        seconds: float,
        abandon: threading.Event,
    ) -> None:
        self.db = db
        self.job = job
        self.seconds = seconds
        self.abandon = abandon
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.seconds / 3):
            if self.abandon.is_set():
                return
            try:
                with self.db.begin() as session:
                    held = queue.heartbeat(session, self.job, self.seconds)
            except OperationalError as exc:  # the database is away: beat again; the lease may lapse
                log.warning("job %d: heartbeat failed (%s)", self.job.id, exc.__class__.__name__)
                continue
            if not held:
                self.lost.set()
                return

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another worker has the job now."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job.id} was taken over after its lease lapsed")

    def stage(self, stage: str) -> None:
        """Say what the job does now (the dashboard shows it), after checking it is still ours."""
        self.check()
        with self.db.begin() as session:
            queue.set_stage(session, self.job, stage)


class JobHandler:
    """What one kind of job does; subclasses set ``kind`` and implement :meth:`run`."""

    kind: JobKind

    def __init__(self, settings: JobSettings) -> None:
        self.lease_seconds = settings.lease_seconds
        self.backoff = queue.Backoff(settings.backoff_seconds, settings.max_backoff_seconds)

    def run(self, job: queue.ClaimedJob, lease: Lease) -> None:
        """Do the job and settle it (``queue.complete`` in the transaction that records its
        work), or raise: :class:`HandedBack`, :class:`LeaseLost`, :class:`JobFailed`, or
        anything else for a failure worth a traceback."""
        raise NotImplementedError

    def settle_failure(
        self, session: Session, job: queue.ClaimedJob, state: JobState, reason: str
    ) -> None:
        """Record what a failed attempt means beyond the job, in the same transaction."""

    def finished(self, job: queue.ClaimedJob, outcome: str, reason: str) -> None:
        """After the job's outcome is committed: audit, metrics of the handler's own."""


class JobRunner:
    """Claims and runs the jobs of one handler, one at a time (one per thread of the node)."""

    def __init__(
        self,
        db: sessionmaker[Session],
        handler: JobHandler,
        name: str,
        abandon: threading.Event,
    ) -> None:
        self.db = db
        self.handler = handler
        self.name = name
        self.abandon = abandon

    def run_once(self) -> bool:
        """Run one job if one is ready; return whether there was one."""
        handler = self.handler
        with self.db.begin() as session:
            job = queue.claim(session, handler.kind, self.name, handler.lease_seconds)
        if job is None:
            return False
        what = f"{job.kind} job {job.id} (attempt {job.attempts}/{job.max_attempts})"
        started, outcome, reason = time.monotonic(), "failed", ""
        try:
            with Lease(self.db, job, handler.lease_seconds, self.abandon) as lease:
                handler.run(job, lease)
            outcome = "success"
        except HandedBack:
            outcome = "handed_back"
            with self.db.begin() as session:
                queue.hand_back(session, job)
            log.info("%s handed back: the node is stopping", what)
        except LeaseLost as exc:
            outcome, reason = "lease_lost", str(exc)
            log.warning("%s: %s; its work here is discarded", what, reason)
        except JobFailed as exc:
            reason = str(exc)
            state = self._fail(job, reason, exc.retry)
            log.warning("%s: %s%s", what, reason, _dead_lettered(state))
        except Exception as exc:  # a failure nobody foresaw: its traceback, then the retry policy
            reason = f"{exc.__class__.__name__}: {exc}"
            log.exception("%s failed", what)
            state = self._fail(job, reason, retry=True)
            if state == JobState.FAILED:
                log.warning("%s%s", what, _dead_lettered(state))
        finally:
            metrics.JOB_SECONDS.labels(job.kind, outcome).observe(time.monotonic() - started)
        self.handler.finished(job, outcome, reason)
        return True

    def _fail(self, job: queue.ClaimedJob, reason: str, retry: bool) -> JobState:
        with self.db.begin() as session:
            state = queue.fail(session, job, reason, self.handler.backoff, retry=retry)
            self.handler.settle_failure(session, job, state, reason)
        return state


def _dead_lettered(state: JobState) -> str:
    return " (dead-lettered)" if state == JobState.FAILED else ""
