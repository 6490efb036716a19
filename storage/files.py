"""The instance file store: what the node has acknowledged must survive any crash.

An instance is written to a temporary file in the destination folder, flushed and fsynced,
renamed into place (atomic on POSIX), and the folder fsynced so that the rename itself is on
disk. Only then may the caller acknowledge the C-STORE. Files are named by SOP Instance UID,
so the same instance sent twice lands on the same path and is stored once.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

#: A DICOM UID: dot-separated numeric components, no leading zeros, at most 64 characters
#: (PS3.5 9.1). Anything else could escape the store's folders when used as a path.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


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


class FileStore:
    """Files under ``root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

    Created with owner-only permissions: the files hold patient data.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

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
        self._make_folders(path.parent)
        # pid and thread: two associations may carry the same instance at the same moment.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return StoredFile(path, len(data), already_present=False)

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

    def remove_stale_temporaries(self) -> int:
        """Delete half-written files a crash left behind (never acknowledged); return how many."""
        stale = list(self.root.rglob(".*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
