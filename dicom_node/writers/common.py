"""What every result object shares: the device's identity and the series each lands in."""

from __future__ import annotations

from dataclasses import dataclass

from highdicom import UID

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
