"""What every result object shares: the device's identity and the series each lands in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from highdicom import UID
from pydicom.dataset import Dataset

from dicom_node import __version__
from inference.comparison import NoduleChange
from inference.findings import FindingSummary, ModelInfo, NoduleFinding
from inference.registration import Registration
from inference.volume import Volume

MANUFACTURER = "Res-MTNet DICOM node (open source)"
DEVICE_SERIAL = "0"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


def algorithm_parameters(model: ModelInfo) -> dict[str, str]:
    """Algorithm Identification parameters: the weights a result came from."""
    return {"weights_sha256": model.weights_sha256}


@dataclass(frozen=True)
class Device:
    """General Equipment (PS3.3 C.7.5.1) of every result object: the SR, the SEG and the key
    images name the same device (this node running one model's weights), from here."""

    manufacturer: str
    model_name: str
    software_versions: str
    serial_number: str

    @classmethod
    def running(cls, model: ModelInfo) -> Device:
        return cls(MANUFACTURER, f"{model.name} {model.version}", __version__, DEVICE_SERIAL)

    def describe(self, ds: Dataset) -> None:
        """Set the module on an object whose highdicom class takes only the manufacturer."""
        ds.Manufacturer = self.manufacturer
        ds.ManufacturerModelName = self.model_name
        ds.SoftwareVersions = self.software_versions
        ds.DeviceSerialNumber = self.serial_number


@dataclass(frozen=True)
class TimePoint:
    """Where a reading stands in the patient's history, as every result object says it: a
    baseline (and why there is no comparison), or a follow-up compared with a prior study.

    ``changes[n]`` is what finding n did since the prior; ``prior`` is one instance of the
    prior series, referenced as other evidence (nothing is copied from it); the prior's
    volume and the registration let key images show the same place then and now.
    """

    baseline_reason: str = "no prior study was compared"
    prior: Dataset | None = None
    prior_date: str = ""
    changes: tuple[NoduleChange, ...] = ()
    resolved: tuple[FindingSummary, ...] = ()
    prior_volume: Volume | None = None
    registration: Registration | None = None

    def __post_init__(self) -> None:
        if self.prior is None and (self.changes or self.resolved):
            raise ValueError("changes since a prior study need that prior study")

    @property
    def follow_up(self) -> bool:
        return self.prior is not None

    def change(self, n: int) -> NoduleChange | None:
        return self.changes[n] if self.follow_up else None

    def describe(self, change: NoduleChange | None) -> str:
        return describe_change(change, self.prior_date)


def describe_change(change: NoduleChange | None, prior_date: str) -> str:
    """One line for a caption or a table: "growing since 2025-06-01: 6.0 mm -> +3.0 mm, VDT
    208 d"; "baseline" without a comparison."""
    if change is None:
        return "baseline"
    if change.prior_diameter_mm is None:
        return f"{change.status} since {prior_date}"
    vdt = f", VDT {change.vdt_days:.0f} d" if change.vdt_days is not None else ""
    return (
        f"{change.status} since {prior_date}: {change.prior_diameter_mm:.1f} mm -> "
        f"{change.diameter_change_mm:+.1f} mm{vdt}"
    )


#: A reading compared with nothing (the default of every writer).
NO_PRIOR = TimePoint()


@dataclass(frozen=True)
class OutputSeries:
    """A new series in the source study; numbered high so that viewers list it after the CT."""

    description: str
    number: int
    series_instance_uid: str

    @classmethod
    def new(cls, description: str, number: int) -> OutputSeries:
        return cls(description, number, str(UID()))


@dataclass(frozen=True)
class SourceFrames:
    """A multi-frame CT source: slice k of the series is frame ``numbers[k]`` of ``instance``.
    References to it name the frame (Referenced Frame Number); the SEG derives from it."""

    instance: Dataset
    numbers: tuple[int, ...]

    def of(self, k: int) -> list[int]:
        return [self.numbers[k]]


def distinct_instances(slices: Sequence[Dataset]) -> list[Dataset]:
    """One dataset per SOP instance: the frames of a multi-frame CT share one."""
    return list({str(ds.SOPInstanceUID): ds for ds in slices}.values())


class TrackedFindingsWriter:
    """Base of the SR and SEG writers: the source slices, the findings and their tracking
    UIDs, checked at construction (highdicom's habit) so a bad call fails before any work."""

    #: How the object is named in error messages ("an SR", "a SEG").
    object_name = "a result object"
    #: Whether the object means nothing without findings (a SEG has no empty segment).
    needs_findings = False

    def __init__(
        self,
        slices: Sequence[Dataset],
        findings: Sequence[NoduleFinding],
        tracking_uids: Sequence[str],
        model: ModelInfo,
        series: OutputSeries,
        frames: SourceFrames | None = None,
    ) -> None:
        if not slices:
            raise ValueError(f"{self.object_name} needs the source CT slices; none were given")
        if self.needs_findings and not findings:
            raise ValueError(
                f"{self.object_name} needs at least one nodule; write none when nothing was found"
            )
        if len(tracking_uids) != len(findings):
            raise ValueError(f"{len(findings)} findings but {len(tracking_uids)} tracking UIDs")
        references = {str(ds.FrameOfReferenceUID) for ds in slices}
        if len(references) != 1:
            raise ValueError(f"source slices span {len(references)} frames of reference")
        self.slices = list(slices)
        self.findings = list(findings)
        self.tracking_uids = list(tracking_uids)
        if frames is not None and len(frames.numbers) != len(slices):
            raise ValueError(f"{len(frames.numbers)} frame numbers for {len(slices)} slices")
        self.model = model
        self.series = series
        self.frames = frames
