"""What every result object shares: the device's identity and the series each lands in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from highdicom import UID
from pydicom.dataset import Dataset

from dicom_node import __version__

MANUFACTURER = "Res-MTNet DICOM node (open source)"
MODEL_NAME = "Res-MTNet lung nodule CAD"
DEVICE_SERIAL = "0"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class OutputSeries:
    """A new series in the source study; numbered high so that viewers list it after the CT."""

    description: str
    number: int
    series_instance_uid: str

    @classmethod
    def new(cls, description: str, number: int) -> OutputSeries:
        return cls(description, number, str(UID()))


SOFTWARE_VERSIONS = __version__


def check_source(
    what: str, slices: Sequence[Dataset], findings: Sequence[object], tracking_uids: Sequence[str]
) -> None:
    """What every writer refuses at construction: no source, unpaired tracking UIDs, or a
    source that mixes frames of reference (coordinates would mean two things at once)."""
    if not slices:
        raise ValueError(f"{what} needs the source CT slices; none were given")
    if len(tracking_uids) != len(findings):
        raise ValueError(f"{len(findings)} findings but {len(tracking_uids)} tracking UIDs")
    frames = {str(ds.FrameOfReferenceUID) for ds in slices}
    if len(frames) != 1:
        raise ValueError(f"source slices span {len(frames)} frames of reference")
