"""Fuzzing the receive path below pynetdicom: whatever bytes a C-STORE carries, the receiver
answers with a DIMSE status (stored, or refused with a reason) and leaves nothing half-done.

Bounded (300 examples, about a second) so it runs in CI; ``FUZZ_EXAMPLES=5000`` searches longer; each input it ever broke on is kept as an
``@example`` below, so the regression stays tested even when the search wanders elsewhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.config import SecuritySettings
from dicom_node.dimse import StoreStatus
from dicom_node.receive.ingest import InstanceRefused, Receiver, file_meta_header
from storage.database import open_database
from storage.files import FileStore, FreeSpace
from storage.models import Instance
from tests.adversarial import body
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom

SPEC = SeriesSpec(slices=1, rows=8, columns=8)
SLICE = ct_datasets(SPEC, phantom(SPEC, None))[0]
HEADER = file_meta_header(
    str(SLICE.SOPClassUID), str(SLICE.SOPInstanceUID), ExplicitVRLittleEndian, "FUZZ"
)
VALID = body(SLICE)
REFUSALS = {
    StoreStatus.OUT_OF_RESOURCES,
    StoreStatus.MISSING_ATTRIBUTE,
    StoreStatus.CANNOT_UNDERSTAND,
    # An edit inside the Patient ID (or another identity) after the valid instance was stored:
    # the same UIDs now claim another patient, which the node refuses as a duplicate.
    StoreStatus.DUPLICATE_INSTANCE,
}
#: Where the Patient ID's value starts, to pin the identity conflict the search once found.
PATIENT_ID_AT = VALID.index(str(SLICE.PatientID).encode())

#: One edit of the valid data set: (offset, bytes removed, bytes inserted).
edits = st.tuples(
    st.integers(0, len(VALID)),
    st.integers(0, 64),
    st.binary(max_size=16) | st.sampled_from([b"\xff\xff\xff\xff", b"\xfe\xff\x00\xe0", b"SQ"]),
)


def _mutate(data: bytes, changes: list[tuple[int, int, bytes]]) -> bytes:
    for at, removed, inserted in changes:
        at = min(at, len(data))
        data = data[:at] + inserted + data[at + removed :]
    return data


def test_any_bytes_get_a_status_and_leave_nothing_half_done() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        db = open_database(f"sqlite:///{root / 'node.db'}")
        store = FileStore(root / "store")
        limits = SecuritySettings()
        receiver = Receiver(
            store, db, limits.max_instances_per_series, FreeSpace(store.root, 0), 1 << 20
        )

        @settings(
            max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(changes=st.lists(edits, min_size=1, max_size=4), cut=st.integers(0, 64))
        # A length rewritten to "undefined" inside an element, and a cut inside a header.
        @example(changes=[(len(VALID) - 130, 4, b"\xff\xff\xff\xff")], cut=0)
        @example(changes=[(0, 0, b"")], cut=len(VALID) - 3)
        # The valid instance stored, then the same UIDs under another Patient ID.
        @example(changes=[(0, 0, b"")], cut=0)
        @example(changes=[(PATIENT_ID_AT, 1, b"Q")], cut=0)
        def check(changes: list[tuple[int, int, bytes]], cut: int) -> None:
            mutated = _mutate(VALID, changes)
            mutated = mutated[: max(0, len(mutated) - cut)]
            try:
                receiver.ingest(HEADER + mutated, "FUZZ", "127.0.0.1", str(SLICE.SOPInstanceUID))
            except InstanceRefused as refused:
                assert refused.status in REFUSALS, refused

        check()
        receiver.close()  # refused instances' writes end, then are dropped
        with db() as session:
            indexed = list(session.scalars(select(Instance)))
        stored = [p for p in (root / "store").rglob("*.dcm")]
        leftovers = [p for p in (root / "store").rglob(".*.tmp") if p.parent.name != ".spare"]
        assert len(indexed) == len(stored) <= 1  # one SOP Instance UID: stored once at most
        assert not leftovers, f"temporary files of refused instances left: {leftovers}"
        db.kw["bind"].dispose()
