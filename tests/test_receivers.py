"""Several receiving processes on one port (``node.receivers``): they accept, store and index
as the node's own process does, count into its metrics, are replaced when they die and never
outlive the node."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.node import Node
from dicom_node.observe import metrics
from dicom_node.receive.processes import RESTART_SECONDS, STOP_SECONDS
from storage.models import Instance, Series
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series
from tests.peers import NodeProcess, free_port, node_config, storescu, wait_for


def _series(folder: Path) -> list[Path]:
    spec = SeriesSpec(slices=48)
    return write_series(folder, ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0))))


def _received() -> float:
    return metrics.forwarded_totals().get(("dicom_node_instances_received", ()), 0.0)


def _send_over(port: int, files: list[Path], associations: int) -> list[int]:
    codes: list[int] = [0] * associations

    def one(n: int) -> None:
        codes[n] = storescu(port, files[n::associations]).returncode

    threads = [threading.Thread(target=one, args=(n,)) for n in range(associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_association_limit_is_the_nodes_whichever_process_takes_them(
    start_node: Any,
) -> None:
    """Only one of two processes accepts here: it may hold all of the node's four."""
    node: Node = start_node(node={"receivers": 2, "max_associations": 4}, workers={"count": 0})
    assert node.server is not None
    node.server.shutdown()
    node.server = None
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.config.node.port, ae_title="RESMTNET") for _ in range(5)]
    try:
        assert [a.is_established for a in held] == [True] * 4 + [False]
        assert held[4].is_rejected
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def test_receiving_processes_store_index_and_count_without_the_nodes_own(
    start_node: Any, tmp_path: Path
) -> None:
    node: Node = start_node(
        node={"receivers": 3}, workers={"count": 0}, completion={"quiet_seconds": 600}
    )
    assert node.server is not None and node.receivers is not None
    # The node's own process stops accepting: what arrives now, only the others can take.
    node.server.shutdown()
    node.server = None
    before = _received()
    files = _series(tmp_path / "ct")
    assert _send_over(node.config.node.port, files, 4) == [0, 0, 0, 0]
    with node.db() as session:
        assert len(list(session.scalars(select(Instance)))) == len(files)
        (series,) = session.scalars(select(Series))
        assert series.version == len(files)
    wait_for(lambda: _received() - before == len(files), 10, "the processes' counts")


def test_a_receiving_process_that_dies_is_replaced(start_node: Any, tmp_path: Path) -> None:
    node: Node = start_node(node={"receivers": 2}, workers={"count": 0})
    assert node.receivers is not None and node.server is not None
    (first,) = node.receivers.processes
    assert first is not None and first.pid is not None
    os.kill(first.pid, signal.SIGKILL)

    def replaced() -> bool:
        (now,) = node.receivers.processes if node.receivers else (None,)
        return now is not None and now.pid != first.pid and now.is_alive()

    wait_for(replaced, RESTART_SECONDS + 30, "another receiving process")
    node.server.shutdown()
    node.server = None
    files = _series(tmp_path / "ct")
    assert storescu(node.config.node.port, files).returncode == 0


@pytest.mark.parametrize("end", ["stopped", "killed"])
def test_receiving_processes_end_with_the_node_and_free_the_port(tmp_path: Path, end: str) -> None:
    port = free_port()
    node = NodeProcess(
        node_config(tmp_path / "node", port, node={"receivers": 3}, workers={"count": 0})
    ).start(port)
    assert node.process is not None
    children = _children(node.process.pid)
    assert len(children) >= 2  # the two receiving processes (and spawn's resource tracker)
    if end == "stopped":
        assert node.stop() == 0
    else:  # no SIGTERM reaches them: they notice that the node's process is gone
        node.process.kill()
        node.process.wait()
        node.process = None
    wait_for(lambda: not any(map(_running, children)), 20, "their exit")
    assert _port_free(port)  # a node started again can bind it


def test_idle_associations_do_not_hold_the_node_up_when_it_stops(tmp_path: Path) -> None:
    """pynetdicom's connection threads keep a process alive: a stopping process gives its
    associations a moment, then aborts them, instead of waiting for their timeout."""
    port = free_port()
    config = node_config(
        tmp_path / "node",
        port,
        node={"receivers": 2, "timeout_seconds": 600},
        workers={"count": 0},
    )
    node = NodeProcess(config).start(port)
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    idle = [ae.associate("127.0.0.1", port, ae_title="RESMTNET") for _ in range(4)]
    assert all(assoc.is_established for assoc in idle)
    assert node.process is not None
    started = time.monotonic()
    assert node.stop() == 0
    stopped_in = time.monotonic() - started
    log_text = config.with_name("node.log").read_text()  # where each thread stood, if late
    assert stopped_in < STOP_SECONDS, log_text
    assert "did not stop; killed" not in log_text
    aborted = re.findall(r"aborting (\d+) association\(s\) still open after 5 s", log_text)
    assert sum(map(int, aborted)) == len(idle)  # counted by the processes that held them
    wait_for(lambda: not any(assoc.is_alive() for assoc in idle), 10, "the aborts")
    assert all(assoc.is_aborted for assoc in idle)
