"""Ingest rate of the node against DCMTK storescp, Orthanc and pynetdicom's storescp.

Usage: python bench/ingest_bench.py [--slices 300] [--repeat 3] [--concurrent 1,4,8]
                                    [--receivers 2] [--settle 2]

One synthetic CT (512 x 512, 16 bit, explicit VR little endian) is sent by DCMTK's storescu
over one association on loopback to each receiver in turn, in the same run, so the ratios hold
on a noisy machine, and split over each number of simultaneous associations of ``--concurrent``
(a fresh receiver for each). The node runs with its durable store and index (SQLite WAL,
fsync) and no workers, as ``dicom-node serve`` with ``node.receivers`` set to ``--receivers``.
TCP_NODELAY=1 is set for every DCMTK program (storescu, storescp, Orthanc), which otherwise
stall on Nagle's algorithm. Each receiver gets ``--settle`` seconds after it first answers
C-ECHO before the CT is sent, as a PACS sends to a receiver that has been running: a node
process that began accepting a moment ago has not yet made its spare files (it makes them
in the first pause, so a transfer that starts at once creates a file per instance), and
``--settle 0`` measures that first burst. Prints markdown rows for bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.peers import DCMTK_ENV, NodeProcess, Orthanc, free_port, node_config, wait_for


def write_ct(folder: Path, slices: int) -> list[Path]:
    """A 512 x 512 x ``slices`` CT at 1.25 mm; noise, so that nothing compresses on the way."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    paths = []
    for n in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = "Bench^Ingest", "BENCH1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, n + 1
        ds.SeriesDescription, ds.ImageType = "Bench 1.25", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-250.0, -250.0, -400.0 + 1.25 * n]
        ds.PixelSpacing, ds.SliceThickness = [0.98, 0.98], 1.25
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = rng.integers(0, 2000, (512, 512), dtype=np.int16).tobytes()
        path = folder / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, called: str, groups: list[list[Path]]) -> float:
    """Seconds for all groups, each over its own simultaneous storescu association.

    The page cache is flushed first: what the previous receiver left unwritten would otherwise
    be written back during this one's run and slow whichever receiver fsyncs."""
    os.sync()
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, group)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(
                f"storescu to {called} failed ({proc.returncode}): {err.decode()[-500:]}"
            )
    return time.perf_counter() - started


def _echo(port: int, called: str) -> bool:
    return (
        subprocess.run(
            ["echoscu", "-aec", called, "127.0.0.1", str(port)],
            env=DCMTK_ENV,
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


@contextmanager
def _receiving_process(command: list[str], port: int, name: str) -> Iterator[tuple[int, str]]:
    proc = subprocess.Popen(
        command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(lambda: _echo(port, "STORESCP"), 30, name)
    try:
        yield port, "STORESCP"
    finally:
        proc.terminate()
        proc.wait()


def dcmtk_storescp(work: Path) -> AbstractContextManager[tuple[int, str]]:
    port, out = free_port(), work / "storescp"
    out.mkdir(parents=True)
    command = ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)]
    return _receiving_process(command, port, "storescp")


def pynetdicom_storescp(work: Path) -> AbstractContextManager[tuple[int, str]]:
    port, out = free_port(), work / "pynetdicom"
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out), "-q"]
    return _receiving_process(command, port, "pynetdicom storescp")


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[int, str]]:
    pacs = Orthanc(work / "orthanc", check_called_aet=False).start()
    try:
        yield pacs.dicom_port, "ORTHANC"
    finally:
        pacs.stop()


def this_node(receivers: int) -> Callable[[Path], AbstractContextManager[tuple[int, str]]]:
    @contextmanager
    def start(work: Path) -> Iterator[tuple[int, str]]:
        port = free_port()
        config = node_config(
            work / "node",
            port,
            node={"receivers": receivers},
            workers={"count": 0},
            completion={"quiet_seconds": 3600},
        )
        node = NodeProcess(config).start(port)
        try:
            yield port, "RESMTNET"
        finally:
            node.stop()

    return start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--concurrent", default="1,4,8", help="simultaneous associations, comma-separated"
    )
    parser.add_argument("--receivers", type=int, default=2, help="the node's node.receivers")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds between a receiver's start and the send"
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrent.split(",")]
    node = f"this node, {args.receivers} receiving process(es) (fsync'd files + SQLite WAL index)"
    orthanc_name = "Orthanc 1.10 (files + SQLite index)"
    receivers: dict[str, Callable[[Path], AbstractContextManager[tuple[int, str]]]] = {
        "DCMTK storescp (raw files, no index)": dcmtk_storescp,
        orthanc_name: orthanc,
        "pynetdicom storescp app (files)": pynetdicom_storescp,
        node: this_node(args.receivers),
    }
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install dcmtk orthanc", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ct"
        files = write_ct(data, args.slices)
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"{platform.node()}, {os.cpu_count()} CPUs; {len(files)} slices, {mb:.0f} MB\n")
        header = " | ".join(f"{n} association(s): instances/s, median (each round)" for n in levels)
        print(f"| receiver | {header} |")
        print("|---" * (len(levels) + 1) + "|")
        # Receivers take turns within each round, so that a slow spell of this shared machine
        # (its disk above all) weighs on all of them alike; ratios are taken round by round.
        rates = {(name, n): [] for name in receivers for n in levels}
        for run in range(args.repeat):
            for number, (name, receiver) in enumerate(receivers.items()):
                for n in levels:
                    with receiver(Path(tmp) / f"r{number}-{run}-{n}") as (port, called):
                        time.sleep(args.settle)
                        split = [files[k::n] for k in range(n)]
                        rates[name, n].append(len(files) / send(port, called, split))
        for name in receivers:
            cells = " | ".join(
                f"{statistics.median(rates[name, n]):.0f} "
                f"({', '.join(f'{r:.0f}' for r in rates[name, n])})"
                for n in levels
            )
            print(f"| {name} | {cells} |")
        for n in levels:
            ratios = [a / b for a, b in zip(rates[node, n], rates[orthanc_name, n], strict=True)]
            print(
                f"\n{n} association(s): this node / Orthanc, round by round: "
                f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f},"
                f" spread {min(ratios):.2f}-{max(ratios):.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
