"""Index writes that arrive together share one transaction: one commit, one fsync.

With SQLite (WAL, synchronous=FULL) a commit waits for an fsync of the log, and commits are
taken one at a time: with several associations sending at once, each receiver queued behind
the others' fsyncs (measured, four associations: the index step took 3.9 ms median and 7.6 ms
mean for 0.8 ms of CPU; SQLite's busy handler waits in sleeps of 1 to 100 ms). Here the first
writer to arrive commits; whoever arrives meanwhile queues, and the next of them commits for
all of the queue at once. If one of them fails (a refused instance), the batch is rolled back
and each is run again in a transaction of its own, so the failure takes nothing of the others
with it; each gets its own result or error only once its commit is durable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy import Connection, Engine

T = TypeVar("T")


class _Work(Generic[T]):
    def __init__(self, work: Callable[[Connection], T]) -> None:
        self.work = work
        self.result: T | None = None
        self.error: Exception | None = None
        self.committed = False
        self.taken = False  # in a batch that a committing thread holds
        self.finished = False  # committed and flushed, or failed

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        if not self.committed:  # the committing thread was interrupted
            raise RuntimeError("the shared index transaction did not complete")
        return self.result  # type: ignore[return-value]


class GroupCommit:
    """Runs work on the database in transactions shared with whatever is queued alongside.

    With ``flush`` (see :func:`storage.database.flushed_later`) a commit is made durable after
    it, while the next batch already commits; nobody hears of a commit before its flush."""

    def __init__(self, engine: Engine, flush: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.flush = flush
        self._changed = threading.Condition()
        self._queued: list[_Work[object]] = []
        self._committing = False

    def run(self, work: Callable[[Connection], T]) -> T:
        """``work``'s result once the transaction it ran in is committed and durable; its
        exception if it raised one (its changes rolled back) or if the commit failed."""
        item = _Work(work)
        with self._changed:
            self._queued.append(item)  # type: ignore[arg-type]
            while not item.finished and (item.taken or self._committing):
                self._changed.wait()
            if item.finished:  # committed by another thread's transaction
                return item.outcome()
            batch, self._queued = self._queued, []
            for taken in batch:
                taken.taken = True
            self._committing = True
        try:
            try:
                self._commit(batch)
            finally:
                with self._changed:  # the next batch may commit while this one flushes
                    self._committing = False
                    self._changed.notify_all()
            if any(done.committed for done in batch):
                self._flush(batch)
        finally:
            with self._changed:
                for done in batch:
                    done.finished = True
                self._changed.notify_all()
        return item.outcome()

    def _flush(self, batch: list[_Work[object]]) -> None:
        try:
            self.flush()
        except OSError as exc:  # committed, but not known to be on disk: not acknowledged
            for done in batch:
                if done.committed:
                    done.committed, done.error = False, exc

    def _commit(self, batch: list[_Work[object]]) -> None:
        """All of the batch in one transaction; if anything of it fails, each one again in a
        transaction of its own, so that only the failing one fails (failures are rare: a
        savepoint per write would cost every write two more statements)."""
        if len(batch) > 1:
            try:
                with self.engine.begin() as connection:
                    results = [item.work(connection) for item in batch]
            except Exception:  # rolled back whole: find which one, one at a time
                pass
            else:
                for item, result in zip(batch, results, strict=True):
                    item.result, item.committed = result, True
                return
        for item in batch:
            try:
                with self.engine.begin() as connection:
                    item.result = item.work(connection)
                item.committed = True
            except Exception as exc:  # handed to its caller's thread
                item.error = exc
