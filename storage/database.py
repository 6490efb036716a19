"""One database for the index and the queue: SQLite (WAL) on one machine, PostgreSQL for more.

The schema is brought to the newest Alembic revision when the node starts, so an upgrade of
the package upgrades the database in place, and a database from a newer release is refused
rather than misread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import DatabaseError

MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, synchronous: str) -> None:
    # Transactions are begun by the "begin" hook below, not by pysqlite.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers (status, the sender) never block the receiver's commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before it returns, power loss included (see flushed_later).
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_engine(url: str, synchronous: str = "FULL") -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            Path(parsed.database).touch(mode=0o600, exist_ok=True)
        # Explicit BEGIN (see the "begin" hook): pysqlite's own transaction handling would
        # start transactions late and let two claimers read the same queued job.
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", partial(_sqlite_pragmas, synchronous=synchronous))
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)


def flushed_later(engine: Engine) -> tuple[Engine, Callable[[], None]]:
    """An engine on ``engine``'s database whose commits return before they are durable, and
    the flush that makes every commit returned so far durable.

    SQLite (WAL, synchronous=FULL) fsyncs its log inside the database's write lock, so that
    every other writer, of any process, waits out each fsync, in busy-handler sleeps of 1 ms
    and more. Here the commit only writes the log (synchronous=NORMAL) and the flush fsyncs it
    afterwards, outside the lock: commit and flush together promise what FULL promises, and
    the next writer commits while this one's log goes to disk. Whoever commits through this
    engine must flush before telling anyone the commit is done. PostgreSQL flushes its own
    log at commit without holding row locks: its engine is returned as it is.
    """
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return engine, lambda: None
    log_file = f"{engine.url.database}-wal"

    def flush() -> None:
        try:
            fd = os.open(log_file, os.O_RDONLY)
        except FileNotFoundError:  # checkpointed into the database and removed: on disk
            return
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    return open_engine(engine.url.render_as_string(hide_password=False), "NORMAL"), flush


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; refuse a database written by a newer release."""
    config = alembic_config(engine)
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    known = {s.revision for s in ScriptDirectory.from_config(config).walk_revisions()}
    if current is not None and current not in known:
        raise DatabaseError(
            f"database schema revision {current} is newer than this release knows (head {head}); "
            "upgrade dicom-node"
        )
    if current != head:
        command.upgrade(config, "head")


def open_database(url: str) -> sessionmaker[Session]:
    """An engine on ``url`` with the schema migrated, as a session factory."""
    try:
        engine = open_engine(url)
        migrate(engine)
    except DatabaseError:
        raise
    except Exception as exc:  # driver errors differ by backend; all mean "cannot use it"
        safe = make_url(url).render_as_string(hide_password=True)
        # The driver's own message, first line: SQLAlchemy appends SQL and links after it.
        detail = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
        raise DatabaseError(f"database {safe}: cannot be used ({detail})") from exc
    if engine.dialect.name == "sqlite":
        database = make_url(url).database
        if database and database != ":memory:" and Path(database).exists():
            os.chmod(database, 0o600)
    return sessionmaker(engine, expire_on_commit=False)
