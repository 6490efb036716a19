"""The file store: durable, deduplicated by SOP Instance UID, owner-only, path-safe."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

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
    spare_dir = tmp_path / ".spare"
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
