"""Several receiving processes on one port (``node.receivers``).

One Python process serialises its associations on the interpreter lock, and PACS routers send
over four or eight associations at once. The node's own process binds the port (a port that is
taken still stops the start with one line) and starts ``node.receivers - 1`` receiving
processes that accept on the same socket: whichever is free takes the next connection. Each
runs the same SCP, store, index and completion on release as the node's own, so every
durability promise holds in each; housekeeping (the quiet-series sweep, retention) stays in the
node's process. They report their counters to it, which serves ``/metrics``, are started again
when one dies, and stop when it stops or dies.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.observe import metrics
from dicom_node.observe.audit import AuditTrail
from dicom_node.observe.logs import LogSettings
from dicom_node.pipeline.completion import SeriesCompletion
from dicom_node.receive.access import AccessPolicy
from dicom_node.receive.handlers import StorageHandlers
from dicom_node.receive.ingest import Receiver
from dicom_node.receive.scp import bind_scp, serve
from dicom_node.receive.transport import ConnectionShares
from dicom_node.tls import server_context
from storage.database import open_database
from storage.files import FileStore, FreeSpace

log = logging.getLogger(__name__)

#: How often a receiving process reports its counters and checks that the node still runs.
REPORT_SECONDS = 1.0
#: A receiving process that dies is started again at most this often (a crash loop logs
#: once per period instead of spinning).
RESTART_SECONDS = 5.0
#: How long the node waits at start for its receiving processes to accept.
START_SECONDS = 60.0
#: How long a stopping process lets its associations finish before aborting them.
DRAIN_SECONDS = 5.0
#: How long a receiving process may take to stop before it is killed.
STOP_SECONDS = 15.0


@dataclass
class ReceivingStore:
    """What one process needs to receive: the instance store, its free-space guard and the
    series completion, over the shared database."""

    db: sessionmaker[Session]
    instances: FileStore
    free_space: FreeSpace
    completion: SeriesCompletion
    audit: AuditTrail

    @classmethod
    def open(cls, config: NodeConfig, db: sessionmaker[Session]) -> ReceivingStore:
        instances = FileStore(Path(config.storage.path) / "instances", spares=512)
        return cls(
            db,
            instances,
            FreeSpace(instances.root, config.storage.min_free_mb * 2**20),
            SeriesCompletion(db, config),
            AuditTrail(db, config.security.audit_syslog),
        )

    def handlers(self, config: NodeConfig) -> StorageHandlers:
        return StorageHandlers(
            Receiver(
                self.instances,
                self.db,
                config.security.max_instances_per_series,
                self.free_space,
                config.security.max_instance_bytes,
            ),
            self.completion,
            config.completion.on_release,
            AccessPolicy(config.security),
            self.audit,
            config.node.max_pdu,
            config.security.max_instance_bytes,
        )


def receive(
    config: NodeConfig,
    listening: socket.socket,
    shares: ConnectionShares,
    counts: multiprocessing.Queue[dict[metrics.CounterKey, float]],
    ready: multiprocessing.Queue[int],
    logs: LogSettings,
    parent: int,
) -> None:
    """A receiving process's life: accept on the node's socket until told to stop (SIGTERM,
    SIGINT) or until the node's process is gone."""
    logs.apply()
    # A signal handler runs between two bytecodes of this thread, inside whatever it was
    # doing, even inside another handler: one that takes a lock (Event.set, logging) waits
    # for ever when a second SIGTERM lands while the first holds it. The node sends one
    # per stop step; a list's append takes no lock.
    signalled: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signalled.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    db = open_database(config.storage.database_url)
    store = ReceivingStore.open(config, db)
    handlers = store.handlers(config)
    tls = config.security.tls
    server = bind_scp(
        config.node,
        handlers,
        server_context(tls) if tls else None,
        listening=listening,
        shares=shares,
    )
    serve(server)
    ready.put(shares.slot)
    reported: dict[metrics.CounterKey, float] = {}

    def report() -> None:
        totals = metrics.forwarded_totals()
        increments = {k: v - reported.get(k, 0.0) for k, v in totals.items()}
        increments = {k: v for k, v in increments.items() if v}
        if increments:
            counts.put(increments)
            reported.update(totals)

    while not signalled:
        time.sleep(REPORT_SECONDS)
        report()
        if os.getppid() != parent:
            log.error("the node's process is gone; this receiving process stops")
            break
    # Killed for taking too long, a process would leave no trace of why: shortly before,
    # where each of its threads stands goes to the log.
    faulthandler.dump_traceback_later(STOP_SECONDS - 1.0)
    server.shutdown()
    server.end_associations(DRAIN_SECONDS)
    report()
    handlers.receiver.close()
    db.kw["bind"].dispose()
    faulthandler.cancel_dump_traceback_later()


@dataclass
class ReceiverProcesses:
    """The node's side: starts the receiving processes, adds their counters to its own,
    starts one again when it dies, and stops them. The node's own process is slot 0 of the
    connection shares, receiving process n slot n."""

    config: NodeConfig
    processes: list[SpawnProcess | None] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # spawn, not fork: the node's process has threads (a fork copies their locks held).
        self._context = multiprocessing.get_context("spawn")
        self._counts: multiprocessing.Queue[dict[metrics.CounterKey, float]] = self._context.Queue()
        self._ready: multiprocessing.Queue[int] = self._context.Queue()
        self._connections = self._context.Array("i", self.config.node.receivers, lock=False)
        self._started: list[float] = []
        self._thread = threading.Thread(target=self._supervise, name="receivers", daemon=True)
        self.listening: socket.socket | None = None

    def shares(self, slot: int) -> ConnectionShares:
        return ConnectionShares(self._connections, slot)

    def start(self, listening: socket.socket) -> None:
        self.listening = listening
        wanted = self.config.node.receivers - 1
        self.processes = [None] * wanted
        self._started = [0.0] * wanted
        for number in range(wanted):
            self._start(number)
        # Started is not yet accepting (imports, the database): say "listening" only then.
        deadline = time.monotonic() + START_SECONDS
        accepting = 0
        while accepting < wanted and time.monotonic() < deadline:
            try:
                self._ready.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            accepting += 1
        self._thread.start()
        if accepting < wanted:
            log.error(
                "%d of %d receiving process(es) not accepting after %.0f s; this process and "
                "the others receive",
                wanted - accepting,
                wanted,
                START_SECONDS,
            )
        log.info("%d receiving process(es) besides this one accept on the port", accepting)

    def _start(self, number: int) -> None:
        process = self._context.Process(
            target=receive,
            args=(
                self.config,
                self.listening,
                self.shares(number + 1),
                self._counts,
                self._ready,
                LogSettings.current(),
                os.getpid(),
            ),
            name=f"dicom-node receiver {number + 1}",
            daemon=False,
        )
        process.start()
        self.processes[number] = process
        self._started[number] = time.monotonic()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            self._add_counts(REPORT_SECONDS)
            for number, process in enumerate(self.processes):
                if process is None or process.is_alive() or self._stopping.is_set():
                    continue
                if time.monotonic() - self._started[number] < RESTART_SECONDS:
                    continue
                log.error(
                    "receiving process %s (pid %s) exited with status %s; starting another",
                    number + 1,
                    process.pid,
                    process.exitcode,
                )
                self._start(number)

    def _add_counts(self, wait: float) -> None:
        try:
            metrics.add_counts(self._counts.get(timeout=wait))
            while True:
                metrics.add_counts(self._counts.get_nowait())
        except queue.Empty:
            pass

    def stop_accepting(self) -> None:
        """SIGTERM to each: it stops accepting, lets its associations finish, reports and
        exits, while this process does the same with its own. None is started again."""
        self._stopping.set()
        for process in self.processes:
            if process is not None and process.is_alive():
                process.terminate()

    def stop(self) -> None:
        self.stop_accepting()
        if self._thread.is_alive():
            self._thread.join()
        self.stop_accepting()  # one the supervisor started as it was being stopped
        deadline = time.monotonic() + STOP_SECONDS
        for process in self.processes:
            if process is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("receiving process (pid %s) did not stop; killed", process.pid)
                process.kill()
                process.join()
        self._add_counts(0.0)
