"""The instance file store: what the node has acknowledged must survive any crash.

An instance is written to a temporary file in the destination folder, flushed and fsynced,
renamed into place (atomic on POSIX), and the folder fsynced so that the rename itself is on
disk. Only then may the caller acknowledge the C-STORE. Files are named by SOP Instance UID,
so the same instance sent twice lands on the same path and is stored once.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: A DICOM UID: dot-separated numeric components, no leading zeros, at most 64 characters
#: (PS3.5 9.1). Anything else could escape the store's folders when used as a path.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


log = logging.getLogger(__name__)

#: How long no file must have been wanted before the pool is refilled.
SPARE_IDLE_SECONDS = 0.5


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID; the message names which one."""


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size: int
    already_present: bool  # the same SOP instance was stored before; nothing was rewritten


def check_uid(name: str, value: str) -> str:
    if len(value) > 64 or not UID_PATTERN.match(value):
        raise InvalidUID(f"{name} {value!r} is not a valid DICOM UID (PS3.5 9.1)")
    return value


class FreeSpace:
    """The free space of a file system against a watermark, read at most once a second (a
    CT arrives at hundreds of instances a second). Below it the node refuses new work before a
    write could fail half-way; it says so once, and again when space has returned."""

    def __init__(
        self,
        folder: Path,
        min_free_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self._read_at = -1.0
        self._free = 0
        self._low = False
        self._lock = threading.Lock()

    def free_bytes(self) -> int:
        with self._lock:
            now = self.clock()
            if now - self._read_at >= 1.0:
                stat = os.statvfs(self.folder)
                self._free, self._read_at = stat.f_bavail * stat.f_frsize, now
            return self._free

    def room_for(self, size: int = 0) -> bool:
        room = self.free_bytes() - size >= self.min_free_bytes
        with self._lock:
            if room == self._low:  # a transition: say it once
                self._low = not room
                if room:
                    log.warning("storage free space back above the watermark: accepting again")
                else:
                    log.error(
                        "storage has %d MB free, below its watermark of %d MB "
                        "(storage.min_free_mb): refusing new instances",
                        self._free // 2**20,
                        self.min_free_bytes // 2**20,
                    )
        return room


class FileStore:
    """Files under ``root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

    Created with owner-only permissions: the files hold patient data.

    With ``spares``, a background thread keeps that many empty files ready in ``.spare/``:
    creating an inode costs about as much as writing 512 kB, and a receiver acknowledging a
    CT slice by slice should not wait for it. A spare is renamed into place like any
    temporary file (same file system), so durability is unchanged.
    """

    def __init__(self, root: Path, spares: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._spares: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._spare_wanted = threading.Event()
        # A node may start in the middle of a transfer, its first instance a few ms after
        # this: the refill waits for a first pause from here on, not from the first take.
        self._last_wanted = time.monotonic()
        if spares:
            spare_dir = _own_spare_folder(self.root / ".spare")
            threading.Thread(
                target=self._keep_spares, args=(spare_dir, spares), name="spare-files", daemon=True
            ).start()

    def _keep_spares(self, folder: Path, target: int) -> None:
        """Refill between bursts, not during one (a burst that begins stops a refill):
        creating files takes the file system's journal, which the receiver's fsyncs are
        waiting on, and CPU (0.7 ms a file on a small VM). A taker only notes the time
        (this thread wakes once per burst, not once per instance)."""
        while True:
            while (quiet := time.monotonic() - self._last_wanted) < SPARE_IDLE_SECONDS:
                time.sleep(SPARE_IDLE_SECONDS - quiet)  # still taking spares: a transfer runs
            while self._spares.qsize() < target:
                if time.monotonic() - self._last_wanted < SPARE_IDLE_SECONDS:
                    break  # a transfer began meanwhile (a node started during traffic)
                path = folder / f".{secrets.token_hex(8)}.tmp"
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                except OSError:  # disk full or gone: store() falls back to creating files
                    break
                self._spares.put(path)
            self._spare_wanted.wait()
            self._spare_wanted.clear()

    def _temporary(self) -> Path:
        # Noted even when none is left, so that the refiller waits for the pause.
        self._last_wanted = time.monotonic()
        self._spare_wanted.set()  # wakes the refiller only when it waits for a first take
        try:
            return self._spares.get_nowait()
        except queue.Empty:
            incoming = self.root / ".incoming"
            incoming.mkdir(exist_ok=True, mode=0o700)
            return incoming / f".{secrets.token_hex(8)}.tmp"

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.root
            / check_uid("StudyInstanceUID", study_uid)
            / check_uid("SeriesInstanceUID", series_uid)
            / f"{check_uid('SOPInstanceUID', sop_uid)}.dcm"
        )

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Durably store one encoded instance (DICOM file format bytes)."""
        path = self.path_for(study_uid, series_uid, sop_uid)
        if path.exists():
            return StoredFile(path, path.stat().st_size, already_present=True)
        return self.place(self.write_temporary(data), study_uid, series_uid, sop_uid)

    def write_temporary(self, data: bytes) -> Path:
        """Write and fsync ``data`` to a temporary file, before its final name is known (a
        receiver can write while it still parses the header); :meth:`place` names it."""
        tmp = self._temporary()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def place(
        self,
        tmp: Path,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
    ) -> StoredFile:
        """Rename a durable temporary file into place and make the name durable. An instance
        already stored keeps its first copy; the temporary file is dropped."""
        path = self.path_for(study_uid, series_uid, sop_uid)
        size = tmp.stat().st_size
        if path.exists():
            tmp.unlink(missing_ok=True)
            return StoredFile(path, path.stat().st_size, already_present=True)
        self._make_folders(path.parent)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return StoredFile(path, size, already_present=False)

    def discard(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def _make_folders(self, folder: Path) -> None:
        """Create the study and series folders, each made durable in its parent: a rename
        into a folder whose own entry was lost in a crash would be lost with it."""
        missing = []
        while not folder.exists() and folder != self.root:
            missing.append(folder)
            folder = folder.parent
        for new in reversed(missing):
            new.mkdir(mode=0o700, exist_ok=True)
            _fsync_dir(new.parent)

    def delete(self, paths: list[Path]) -> None:
        """Delete stored files and the folders they leave empty."""
        folders = set()
        for path in paths:
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            for empty in (folder, folder.parent):
                if empty != self.root and empty.is_relative_to(self.root):
                    try:
                        empty.rmdir()
                    except OSError:  # not empty: other series of the study remain
                        break

    def remove_stale_temporaries(self, older_than_seconds: float = 600.0) -> int:
        """Delete half-written files a crash left behind (never acknowledged); return how many.
        Only old ones: other processes sharing the store may be writing theirs right now."""
        cutoff = time.time() - older_than_seconds
        stale = [
            p
            for p in self.root.rglob(".*.tmp")
            if ".spare" not in p.relative_to(self.root).parts and _modified(p) < cutoff
        ]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def _own_spare_folder(spares: Path) -> Path:
    """``spares/<host>.<pid>``: each process keeps its own spares, since processes sharing a
    store (receiving processes, a worker on the same storage) must not take or remove each
    other's. Folders of this host's processes that are gone are emptied and removed."""
    host = socket.gethostname()
    own = spares / f"{host}.{os.getpid()}"
    spares.mkdir(exist_ok=True, mode=0o700)
    for entry in spares.iterdir():
        if not entry.is_dir():  # a spare of the older, shared layout
            entry.unlink(missing_ok=True)
            continue
        name, _, pid = entry.name.rpartition(".")
        if name == host and pid.isdigit() and int(pid) != os.getpid() and not pid_running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
    own.mkdir(exist_ok=True, mode=0o700)
    return own


def pid_running(pid: int) -> bool:
    """Whether a process with this ID runs on this machine: what a process left behind (spare
    files here, leases in :mod:`dicom_node.jobs`) may be taken back once it is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # renamed or removed meanwhile
        return float("inf")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
