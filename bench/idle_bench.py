"""CPU the node takes while associations are open and nothing is sent, against Orthanc.

Usage: python bench/idle_bench.py [--associations 8] [--seconds 4] [--repeat 3]

PACS routers and modalities keep associations open between studies. Each round starts the
node (``dicom-node serve``, one receiving process, no workers) and Orthanc, opens
``--associations`` established associations to each (pynetdicom requestors in this
process), and reads each receiver's CPU time (user + system, /proc) over ``--seconds`` with
none and then with the associations open. Prints markdown rows for bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.peers import NodeProcess, Orthanc, cpu_seconds, free_port, node_config


def share_of_a_core(pid: int, seconds: float) -> float:
    stat = Path(f"/proc/{pid}/stat")
    before = cpu_seconds(stat)
    time.sleep(seconds)
    return (cpu_seconds(stat) - before) / seconds


@contextmanager
def the_node(work: Path) -> Iterator[tuple[int, int, str]]:
    port = free_port()
    config = node_config(
        work / "node", port, workers={"count": 0}, completion={"quiet_seconds": 3600}
    )
    node = NodeProcess(config).start(port)
    assert node.process is not None
    try:
        yield node.process.pid, port, "RESMTNET"
    finally:
        node.stop()


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[int, int, str]]:
    pacs = Orthanc(work / "orthanc", check_called_aet=False).start()
    assert pacs.process is not None
    try:
        yield pacs.process.pid, pacs.dicom_port, "ORTHANC"
    finally:
        pacs.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CTImageStorage)
    receivers = {"Orthanc 1.10": orthanc, "this node, 1 receiving process": the_node}
    shares: dict[tuple[str, bool], list[float]] = {
        (name, open_): [] for name in receivers for open_ in (False, True)
    }
    print(f"{platform.node()}, {os.cpu_count()} CPUs; {args.associations} associations\n")
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeat):
            for name, receiver in receivers.items():
                with receiver(Path(tmp) / f"{name[:4]}-{run}") as (pid, port, called):
                    time.sleep(1.0)  # past its start-up
                    shares[name, False].append(share_of_a_core(pid, args.seconds))
                    held = [
                        ae.associate("127.0.0.1", port, ae_title=called)
                        for _ in range(args.associations)
                    ]
                    if not all(a.is_established for a in held):
                        raise RuntimeError(f"{name} refused an association")
                    time.sleep(1.0)
                    shares[name, True].append(share_of_a_core(pid, args.seconds))
                    for assoc in held:
                        assoc.release()
    print(
        f"| receiver | CPU, no association: % of a core, median (each round) "
        f"| CPU, {args.associations} idle associations open |"
    )
    print("|---|---|---|")
    for name in receivers:
        cells = [
            f"{100 * statistics.median(shares[name, o]):.1f} "
            f"({', '.join(f'{100 * s:.1f}' for s in shares[name, o])})"
            for o in (False, True)
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
