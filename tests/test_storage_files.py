"""The file store: durable, deduplicated by SOP Instance UID, owner-only, path-safe."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import storage.files as files_module
from storage.files import FileStore, InvalidUID

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_store_writes_the_file_durably_named_by_uid(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    stored = store.store(STUDY, SERIES, SOP, b"DICM payload")
    assert stored.path == tmp_path / "store" / STUDY / SERIES / f"{SOP}.dcm"
    assert stored.path.read_bytes() == b"DICM payload"
    assert stored.size == len(b"DICM payload")
    assert not stored.already_present
    assert list(stored.path.parent.glob(".*.tmp")) == []


def test_same_instance_twice_is_stored_once(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    first = store.store(STUDY, SERIES, SOP, b"first")
    again = store.store(STUDY, SERIES, SOP, b"second")
    assert again.already_present and again.path == first.path
    assert first.path.read_bytes() == b"first" and again.size == first.size


def test_files_and_folders_are_owner_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    stored = store.store(STUDY, SERIES, SOP, b"x")
    assert stat.S_IMODE(stored.path.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(stored.path.parent.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize("bad", ["../../etc", "1.2.03", "", "1..2", "1.2.3a", "1" * 65])
def test_invalid_uid_cannot_become_a_path(tmp_path: Path, bad: str) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(InvalidUID, match="is not a valid DICOM UID"):
        store.store(STUDY, bad, SOP, b"x")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_stale_temporaries_are_removed_but_not_fresh_ones(tmp_path: Path) -> None:
    """Old ones are a crash's leftovers; fresh ones may be another process's writes."""
    store = FileStore(tmp_path)
    folder = tmp_path / STUDY / SERIES
    folder.mkdir(parents=True)
    stale, fresh = folder / f".{SOP}.dcm.123.tmp", folder / f".{SOP}.dcm.456.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert store.remove_stale_temporaries() == 1
    assert list(folder.iterdir()) == [fresh]


def test_spare_files_are_used_and_never_left_as_instances(tmp_path: Path) -> None:
    store = FileStore(tmp_path, spares=4)
    spare_dir = tmp_path / ".spare" / f"{socket.gethostname()}.{os.getpid()}"
    deadline = 50
    while len(list(spare_dir.iterdir())) < 4 and deadline:
        deadline -= 1
        threading.Event().wait(0.05)
    ready = set(spare_dir.iterdir())
    stored = [store.store(STUDY, SERIES, f"{SOP}.{n}", b"x" * n) for n in range(1, 7)]
    assert [s.path.read_bytes() for s in stored] == [b"x" * n for n in range(1, 7)]
    assert not ready & set(spare_dir.iterdir())  # the first four came from the spares
    assert store.remove_stale_temporaries() == 0  # live spares are not stale
    assert sorted(p.name for p in (tmp_path / STUDY / SERIES).iterdir()) == sorted(
        f"{SOP}.{n}.dcm" for n in range(1, 7)
    )


def test_spares_are_not_made_while_instances_arrive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node started while a PACS sends: creating spare files (0.7 ms of CPU each on a
    small VM) must wait for a pause, not compete with the transfer for the first seconds.
    It once began at the start, before the first instance was taken, and made 143 of them
    on a busy machine while instances arrived. The pause is lengthened here so that a slow
    fsync on a busy machine is not one."""
    monkeypatch.setattr(files_module, "SPARE_IDLE_SECONDS", 3.0)
    store = FileStore(tmp_path, spares=1000)
    time.sleep(0.2)  # the first instance a moment after the start: no pause yet
    arriving_until = time.monotonic() + 1.0
    while time.monotonic() < arriving_until:
        store.discard(store.write_temporary(b"slice"))
        time.sleep(0.01)
    spare_dir = tmp_path / ".spare" / f"{socket.gethostname()}.{os.getpid()}"
    assert not any(spare_dir.iterdir())
    _spares_ready(spare_dir, 1000, seconds=30.0)  # and once they pause, the pool fills


def _spares_ready(folder: Path, count: int, seconds: float = 5.0) -> set[Path]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready = set(folder.glob("*.tmp")) if folder.exists() else set()
        if len(ready) >= count:
            return ready
        threading.Event().wait(0.05)
    raise AssertionError(f"{count} spares never appeared in {folder}")


def test_another_process_on_the_same_store_leaves_this_ones_spares(tmp_path: Path) -> None:
    """A receiving process or a worker starting on the same storage once removed the spares
    another process was writing into: its instance was refused (0xA700)."""
    host = socket.gethostname()
    gone = tmp_path / ".spare" / f"{host}.{2**22 + 12345}"  # above Linux's pid_max default
    gone.mkdir(parents=True)
    (gone / ".left.tmp").touch()
    (tmp_path / ".spare" / ".older-layout.tmp").touch()
    FileStore(tmp_path, spares=4)
    ours = _spares_ready(tmp_path / ".spare" / f"{host}.{os.getpid()}", 4)
    assert not gone.exists() and not (tmp_path / ".spare" / ".older-layout.tmp").exists()
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from storage.files import FileStore; "
            "FileStore(Path(sys.argv[1]), spares=2); time.sleep(1)",
            str(tmp_path),
        ],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    assert other.returncode == 0
    assert all(path.exists() for path in ours)
