"""The results of one analysis: the SR, SEG and key images built from the findings, and what
a later re-analysis must carry over to amend them rather than start afresh."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from highdicom import UID
from pydicom.dataset import Dataset

from dicom_node.pipeline.series import CTSeries
from dicom_node.writers.common import NO_PRIOR, OutputSeries, SourceFrames, TimePoint
from dicom_node.writers.key_images import NoduleKeyImages
from dicom_node.writers.seg import NoduleSegmentation
from dicom_node.writers.sr import NoduleReport
from inference.findings import FindingSummary, ModelInfo, NoduleFinding

SR_SERIES, SEG_SERIES, KEY_SERIES = 9701, 9702, 9703


@dataclass
class ResultObjects:
    """The DICOM objects made for one series, in the order they should be sent, with the
    UIDs a later amendment must reuse."""

    sr: Dataset
    seg: Dataset | None
    key_images: list[Dataset] = field(default_factory=list)
    tracking_uids: list[str] = field(default_factory=list)

    def all(self) -> list[Dataset]:
        return [self.sr, *([self.seg] if self.seg is not None else []), *self.key_images]

    def by_kind(self) -> list[tuple[str, Dataset]]:
        """(kind, object) pairs; kind is what a destination's ``objects`` selects."""
        return [
            ("sr", self.sr),
            *([("seg", self.seg)] if self.seg is not None else []),
            *(("key_images", ds) for ds in self.key_images),
        ]

    def series_uids(self) -> dict[str, str]:
        return {kind: str(ds.SeriesInstanceUID) for kind, ds in self.by_kind()}


@dataclass(frozen=True)
class ResultRecord:
    """What the index keeps of one analysis besides its files (``results.findings_json``): the
    findings as reported, each one's tracking UID, the output series a later amendment joins,
    and how the run went. The files themselves are the result's instances in the index."""

    findings: tuple[FindingSummary, ...]
    tracking_uids: tuple[str, ...]
    #: Series Instance UID of the output series, by result kind (sr, seg, key_images).
    output_series: dict[str, str]
    candidates: int
    timings_s: dict[str, float]
    #: SOP Instance UID of the SR this result's SR amends.
    amends: str | None = None
    #: The prior compared with (findings.json's ``prior``: its UIDs, date and registration
    #: residual, or the reason for a baseline reading); each finding's ``change`` when one
    #: was; the prior's nodules no longer seen. Records of a baseline node hold none of it.
    prior: dict[str, object] | None = None
    changes: tuple[dict[str, object], ...] = ()
    resolved: tuple[FindingSummary, ...] = ()

    def __post_init__(self) -> None:
        if len(self.findings) != len(self.tracking_uids):
            raise ValueError(
                f"{len(self.findings)} findings but {len(self.tracking_uids)} tracking UIDs"
            )
        if self.changes and len(self.changes) != len(self.findings):
            raise ValueError(f"{len(self.findings)} findings but {len(self.changes)} changes")

    @classmethod
    def of(
        cls,
        findings: Sequence[NoduleFinding],
        objects: ResultObjects,
        candidates: int,
        timings_s: dict[str, float],
        time_point: TimePoint,
        prior: dict[str, object],
        amends: Amendment | None = None,
    ) -> ResultRecord:
        """The record of an analysis that made ``objects`` from ``findings``."""
        return cls(
            findings=tuple(f.summary() for f in findings),
            tracking_uids=tuple(objects.tracking_uids),
            output_series=objects.series_uids(),
            candidates=candidates,
            timings_s=timings_s,
            amends=str(amends.previous_sr.SOPInstanceUID) if amends else None,
            prior=prior,
            changes=tuple(change.to_json() for change in time_point.changes),
            resolved=time_point.resolved,
        )

    def findings_entry(self) -> dict[str, object]:
        """The findings, prior and resolved nodules as ``findings.json`` has them."""
        entries = [f.to_json() for f in self.findings]
        for entry, change in zip(entries, self.changes, strict=False):
            entry["change"] = change
        return {
            "findings": entries,
            "prior": self.prior,
            "resolved": [f.to_json() for f in self.resolved],
        }

    def to_json(self) -> str:
        return json.dumps(
            {
                "findings": [f.to_json() for f in self.findings],
                "tracking_uids": list(self.tracking_uids),
                "output_series": self.output_series,
                "candidates": self.candidates,
                "timings_s": self.timings_s,
                "amends": self.amends,
                "prior": self.prior,
                "changes": list(self.changes),
                "resolved": [f.to_json() for f in self.resolved],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ResultRecord:
        """Read a stored record (rows written before 0.2 also list their file paths, which
        the result's instances hold: ignored)."""
        data = json.loads(text)
        return cls(
            findings=tuple(FindingSummary.from_json(f) for f in data["findings"]),
            tracking_uids=tuple(data["tracking_uids"]),
            output_series=dict(data["output_series"]),
            candidates=int(data["candidates"]),
            timings_s={k: float(v) for k, v in data["timings_s"].items()},
            amends=data.get("amends"),
            prior=data.get("prior"),
            changes=tuple(data.get("changes", ())),
            resolved=tuple(FindingSummary.from_json(f) for f in data.get("resolved", ())),
        )


@dataclass(frozen=True)
class Amendment:
    """What a re-analysis keeps of the result it replaces, so that viewers and trackers see
    one report evolve: the same output series, the same tracking UID for the same nodule,
    and the earlier SR as the new one's predecessor."""

    previous_sr: Dataset
    series_uids: dict[str, str]
    #: (centre in LPS mm, tracking UID) of each earlier finding.
    tracked: list[tuple[tuple[float, float, float], str]]

    def tracking_uid(self, finding: NoduleFinding) -> str | None:
        """The earlier finding's UID when its centre lies within the new nodule's radius
        (at least 5 mm); a nodule nothing earlier matches gets a new one."""
        reach = max(5.0, finding.diameter_mm / 2)
        best = None
        for centre, uid in self.tracked:
            distance = (
                sum((a - b) ** 2 for a, b in zip(centre, finding.center_mm, strict=True)) ** 0.5
            )
            if distance <= reach and (best is None or distance < best[0]):
                best = (distance, uid)
        return best[1] if best else None


def _output_series(
    kind: str, description: str, number: int, amends: Amendment | None
) -> OutputSeries:
    if amends is not None and kind in amends.series_uids:
        return OutputSeries(description, number, amends.series_uids[kind])
    return OutputSeries.new(description, number)


def build_results(
    series: CTSeries,
    findings: list[NoduleFinding],
    model: ModelInfo,
    amends: Amendment | None = None,
    time_point: TimePoint = NO_PRIOR,
) -> ResultObjects:
    """SR, SEG and key images for one series, cross-referenced by tracking UID."""
    frames = (
        SourceFrames(series.multiframe, series.frame_numbers)
        if series.multiframe is not None and series.frame_numbers is not None
        else None
    )
    tracking: list[str] = []
    for finding in findings:
        earlier = amends.tracking_uid(finding) if amends else None
        tracking.append(earlier if earlier and earlier not in tracking else str(UID()))
    seg = None
    if findings:
        seg = NoduleSegmentation(
            series.slices,
            findings,
            tracking,
            model,
            _output_series("seg", "Res-MTNet nodule segmentation", SEG_SERIES, amends),
            frames,
        ).build()
    summary = f"{model.name} lung findings ({count_findings(f.kind for f in findings)})"
    sr = NoduleReport(
        series.slices,
        findings,
        tracking,
        model,
        _output_series("sr", summary, SR_SERIES, amends),
        seg,
        replaces=amends.previous_sr if amends else None,
        frames=frames,
        time_point=time_point,
    ).build()
    keys = NoduleKeyImages(
        series.slices,
        series.volume,
        findings,
        model,
        _output_series("key_images", "Res-MTNet key images", KEY_SERIES, amends),
        frames,
        time_point,
    ).build()
    return ResultObjects(sr, seg, list(keys), tracking)


PLURALS = {"nodule": "nodules", "mass": "masses"}


def count_findings(kinds: Iterable[str]) -> str:
    """ "none found", "2 nodules", "1 nodule, 1 mass": what a series list shows of the SR, and
    what the log and the series' state say, so that a mass is never counted as a nodule."""
    tally = Counter(kinds)
    counted = [f"{tally[k]} {k if tally[k] == 1 else PLURALS[k]}" for k in PLURALS if tally[k]]
    return ", ".join(counted) or "none found"
