"""Index writes that queue while another commits share the next commit, each on its own."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import IntegrityError

from storage.database import flushed_later, open_engine
from storage.group_commit import GroupCommit
from tests.peers import wait_for


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = open_engine(database_url) if "sqlite" in database_url else create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE written (name VARCHAR(16) UNIQUE NOT NULL)"))
    yield engine
    engine.dispose()


def insert(name: str, gate: threading.Event | None = None) -> Callable[[Connection], str]:
    def work(connection: Connection) -> str:
        if gate is not None:
            assert gate.wait(10)
        connection.execute(text("INSERT INTO written (name) VALUES (:name)"), {"name": name})
        return name

    return work


def names(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.execute(text("SELECT name FROM written")).scalars())


def run_behind_a_slow_commit(
    group: GroupCommit, works: list[Callable[[Connection], str]]
) -> list[Future[str]]:
    """The first work holds its commit open until all the others are queued behind it."""
    gate = threading.Event()
    pool = ThreadPoolExecutor(len(works) + 1)
    first = pool.submit(group.run, insert("first", gate))
    wait_for(lambda: group._committing, 10, "the first commit")
    queued = [pool.submit(group.run, work) for work in works]
    wait_for(lambda: len(group._queued) == len(works), 10, "the others to queue")
    gate.set()
    return [first, *queued]


def test_writes_queued_during_a_commit_share_the_next_one(engine: Engine) -> None:
    commits: list[int] = []
    event.listen(engine, "commit", lambda connection: commits.append(1))
    group = GroupCommit(engine)
    futures = run_behind_a_slow_commit(group, [insert(n) for n in ("a", "b", "c")])
    assert [f.result(10) for f in futures] == ["first", "a", "b", "c"]
    assert len(commits) == 2
    assert names(engine) == ["a", "b", "c", "first"]


def test_a_write_that_fails_takes_nothing_of_the_others_with_it(engine: Engine) -> None:
    group = GroupCommit(engine)
    futures = run_behind_a_slow_commit(group, [insert("a"), insert("first"), insert("c")])
    assert futures[1].result(10) == "a" and futures[3].result(10) == "c"
    with pytest.raises(IntegrityError):
        futures[2].result(10)
    assert names(engine) == ["a", "c", "first"]


def test_a_commit_that_fails_fails_every_write_it_held(engine: Engine) -> None:
    group = GroupCommit(engine)
    failing = threading.Event()

    def refuse(connection: Connection) -> None:
        if failing.is_set():
            raise OSError("disk gone")

    event.listen(engine, "commit", refuse)
    failing.set()
    futures = run_behind_a_slow_commit(group, [insert("a"), insert("b")])
    for future in futures:
        with pytest.raises(OSError, match="disk gone"):
            future.result(10)
    failing.clear()
    assert names(engine) == []


def test_nobody_hears_of_a_commit_before_its_flush(engine: Engine) -> None:
    flushing, flushed = threading.Event(), threading.Event()

    def flush() -> None:
        flushing.set()
        assert flushed.wait(10)

    group = GroupCommit(engine, flush)
    pool = ThreadPoolExecutor(2)
    writing = pool.submit(group.run, insert("a"))
    assert flushing.wait(10)
    # Committed, yet unflushed: its writer still waits, while the next write commits.
    assert names(engine) == ["a"] and not writing.done()
    following = pool.submit(group.run, insert("b"))
    wait_for(lambda: names(engine) == ["a", "b"], 10, "the next commit")
    assert not writing.done() and not following.done()
    flushed.set()
    assert writing.result(10) == "a" and following.result(10) == "b"


def test_a_failed_flush_fails_the_writes_it_should_have_made_durable(engine: Engine) -> None:
    def flush() -> None:
        raise OSError("log device gone")

    group = GroupCommit(engine, flush)
    with pytest.raises(OSError, match="log device gone"):
        group.run(insert("a"))


def test_sqlite_commits_leave_the_log_flush_for_after_the_write_lock(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    deferred, flush = flushed_later(engine)
    if engine.dialect.name != "sqlite":  # PostgreSQL flushes at commit, outside row locks
        assert deferred is engine
        return
    try:
        with engine.connect() as full:
            assert full.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        with deferred.connect() as normal:
            assert normal.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        flushed: list[str] = []
        monkeypatch.setattr(
            os, "fdatasync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        )
        flush()
        assert flushed == [f"{engine.url.database}-wal"]
    finally:
        deferred.dispose()
