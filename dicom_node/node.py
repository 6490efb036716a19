"""``dicom-node serve``: the SCP, the analysis workers, the sender and housekeeping, together.

Stopping (SIGTERM, SIGINT): the SCP stops accepting associations first; workers and the
sender finish the job in hand (or, past the grace period, leave it to its lease) and exit.
Nothing acknowledged is lost: it is on disk and indexed before its C-STORE response.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.deliver.sender import Sender
from dicom_node.jobs import JobRunner, process_identity, take_back_predecessors_jobs
from dicom_node.ops.web import WebServer, build_app
from dicom_node.pipeline.retention import Retention
from dicom_node.pipeline.worker import AnalysisWorker
from dicom_node.receive.processes import (
    DRAIN_SECONDS,
    ReceiverProcesses,
    ReceivingStore,
)
from dicom_node.receive.scp import bind_scp, serve
from dicom_node.receive.transport import GuardedAssociationServer
from dicom_node.tls import server_context
from inference.detector import DEFAULT_WEIGHTS, NoduleDetector
from storage import queue
from storage.database import open_database
from storage.files import FileStore

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
#: How often the main thread looks whether a stop signal came.
SIGNAL_CHECK_SECONDS = 0.2
ERROR_PAUSE_SECONDS = 5.0


class Node:
    def __init__(self, config: NodeConfig, weights: Path = DEFAULT_WEIGHTS) -> None:
        self.config = config
        self.weights = weights
        self.stopping = threading.Event()
        #: Set once the stop's grace period is over: leases of jobs still running are no
        #: longer renewed, so another process takes them over.
        self.abandon = threading.Event()
        self.threads: list[threading.Thread] = []
        self.db: sessionmaker[Session] = open_database(config.storage.database_url)
        store = ReceivingStore.open(config, self.db)
        self.instances = store.instances
        self.results = FileStore(Path(config.storage.path) / "results")
        self.completion = store.completion
        self.retention = Retention(self.db, self.instances, config.storage.retention_days)
        self.audit = store.audit
        self.free_space = store.free_space
        self.models_loaded = False
        self.web: WebServer | None = None
        self.handlers = store.handlers(config)
        self.server: GuardedAssociationServer | None = None
        self.receivers: ReceiverProcesses | None = None

    def start(self) -> None:
        roles = set(self.config.node.roles)
        swept = self.instances.remove_stale_temporaries() + self.results.remove_stale_temporaries()
        if swept:
            log.info("removed %d unacknowledged partial file(s) left by a crash", swept)
        identity = process_identity()
        taken = take_back_predecessors_jobs(self.db, identity)
        if taken:
            log.info("took back %d job(s) a crashed process of this machine left running", taken)
        # The listeners first: a port that is taken stops the start before anything runs.
        if self.config.dashboard.enabled:
            settings = self.config.dashboard
            app = build_app(self.config, self.db, self.free_space, lambda: self.models_loaded)
            self.web = WebServer(app, settings.host, settings.port)
        if "receiver" in roles:
            tls = self.config.security.tls
            if self.config.node.receivers > 1:
                self.receivers = ReceiverProcesses(self.config)
            try:
                self.server = bind_scp(
                    self.config.node,
                    self.handlers,
                    server_context(tls) if tls else None,
                    shares=self.receivers.shares(0) if self.receivers else None,
                )
            except OSError:
                if self.web is not None:
                    self.web.close()
                raise
            if self.receivers is not None:
                # The others first: what arrives meanwhile waits in the backlog for all.
                assert self.server.socket is not None
                self.receivers.start(self.server.socket)
            serve(self.server)
            log.info(
                "listening as %s on %s:%d%s",
                self.config.node.ae_title,
                self.config.node.host,
                self.config.node.port,
                " (DICOM TLS)" if tls else "",
            )
        if self.web is not None:
            self.web.start()
            log.info("dashboard and /metrics on http://%s:%d/", settings.host, settings.port)
        workers = self.config.workers.count if "worker" in roles else 0
        for n in range(workers):
            # Each worker loads the model once and keeps it for every series it analyzes.
            detector = NoduleDetector.from_weights(
                self.weights,
                self.config.workers.device,
                self.config.detection.min_diameter_mm,
            )
            worker = AnalysisWorker(
                self.db, self.config, detector, self.results, self.stopping, self.audit
            )
            runner = JobRunner(self.db, worker, f"{identity}/worker{n}", self.abandon)
            self._spawn(f"worker{n}", runner.run_once)
        self.models_loaded = True
        if "sender" in roles:
            sender = Sender(self.db, self.config, self.stopping, self.audit)
            runner = JobRunner(self.db, sender, f"{identity}/sender", self.abandon)
            self._spawn("sender", runner.run_once)
        self._spawn("housekeeping", self._housekeeping, idle=1.0)
        log.info(
            "roles: %s; %d worker(s), %d destination(s)",
            ", ".join(r for r in ("receiver", "worker", "sender") if r in roles),
            workers,
            len(self.config.destinations),
        )
        if "sender" in roles and not self.config.destinations:
            log.warning(
                "no destinations configured: results stay in %s (config.yaml: destinations)",
                self.results.root,
            )

    def _housekeeping(self) -> bool:
        if "receiver" in self.config.node.roles:  # series complete where they are received
            self.completion.sweep()
        with self.db.begin() as session:
            reaped = queue.reap(session)
        if reaped:
            log.warning("%d job(s) dead-lettered: their worker died on every attempt", reaped)
        self.retention.purge()
        return False

    def _spawn(self, name: str, step: Callable[[], bool], idle: float = POLL_SECONDS) -> None:
        def loop() -> None:
            while not self.stopping.is_set():
                try:
                    busy = step()
                except OperationalError as exc:  # the database is away for a while: one line
                    log.error(
                        "%s: database unavailable (%s); retrying in %.0f s",
                        name,
                        str(exc.orig).strip().splitlines()[0] if exc.orig else exc,
                        ERROR_PAUSE_SECONDS,
                    )
                    self.stopping.wait(ERROR_PAUSE_SECONDS)
                    continue
                except Exception:  # a bug: its traceback, and the loop goes on
                    log.exception(
                        "%s: unexpected error; retrying in %.0f s", name, ERROR_PAUSE_SECONDS
                    )
                    self.stopping.wait(ERROR_PAUSE_SECONDS)
                    continue
                if not busy:
                    self.stopping.wait(idle)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self, grace_seconds: float = 120.0) -> None:
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.server is not None:
            self.server.shutdown()
            if self.receivers is not None:  # they drain their associations while this does
                self.receivers.stop_accepting()
            self.server.end_associations(DRAIN_SECONDS)
            self.server = None
        if self.receivers is not None:
            self.receivers.stop()
            self.receivers = None
        self.stopping.set()
        deadline = time.monotonic() + grace_seconds
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.abandon.set()
        for thread in self.threads:
            if thread.is_alive():
                log.warning(
                    "%s still busy after %.0f s; its job returns to the queue when its lease "
                    "lapses",
                    thread.name,
                    grace_seconds,
                )
        self.handlers.receiver.close()
        self.db.kw["bind"].dispose()

    def run_until_signalled(self) -> None:
        # No lock in a handler (Event.set, logging): a second signal landing inside the
        # first would wait for it for ever (Ctrl-C twice, a service manager's SIGTERMs).
        signalled: list[int] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            signalled.append(signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not signalled and not self.stopping.is_set():
            time.sleep(SIGNAL_CHECK_SECONDS)
        if signalled:
            log.info("%s: stopping", signal.Signals(signalled[0]).name)
        self.stopping.set()
        self.stop()
        log.info("stopped")
