"""``dicom-node analyze``: series on disk -> findings -> SR, SEG, key images and findings.json."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from highdicom import UID
from pydicom.dataset import Dataset

from dicom_node import __version__
from dicom_node.cases import unpacked
from dicom_node.config import load_config
from dicom_node.series import CTSeries, read_series
from dicom_node.writers.common import OutputSeries, SourceFrames
from dicom_node.writers.key_images import NoduleKeyImages
from dicom_node.writers.seg import NoduleSegmentation
from dicom_node.writers.sr import NoduleReport
from inference.detector import NoduleDetector
from inference.findings import ModelInfo, NoduleFinding

log = logging.getLogger(__name__)

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
    summary = (
        f"Res-MTNet nodules ({len(findings)} found)"
        if findings
        else "Res-MTNet nodules (none found)"
    )
    sr = NoduleReport(
        series.slices,
        findings,
        tracking,
        model,
        _output_series("sr", summary, SR_SERIES, amends),
        seg,
        replaces=amends.previous_sr if amends else None,
        frames=frames,
    ).build()
    keys = NoduleKeyImages(
        series.slices,
        series.volume.array,
        findings,
        _output_series("key_images", "Res-MTNet key images", KEY_SERIES, amends),
        frames,
    ).build()
    return ResultObjects(sr, seg, list(keys), tracking)


def write_atomically(ds: Dataset, path: Path) -> None:
    """Temporary file, fsync, rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def analyze_paths(
    paths: list[Path], out: Path, weights: Path, device: str, config: Path | None
) -> int:
    """Analyze every series under ``paths`` (folders, files, .tar.xz archives).

    Exit status: 0 all analyzed; 1 some series rejected or files unreadable; 3 nothing analyzed.
    """
    rules = load_config(config).eligibility
    started = time.perf_counter()
    with unpacked(paths) as folders:
        series_list, rejected, unreadable = read_series(folders, rules)
    read_s = time.perf_counter() - started
    for bad in unreadable:
        print(f"skipped {bad.path}: {bad.reason}")
    if not series_list and not rejected:
        print("no DICOM series found")
        return 3
    detector = NoduleDetector.from_weights(weights, device) if series_list else None
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, object]] = []
    for uid, reason in rejected.items():
        print(f"series {uid}: rejected: {reason}")
        records.append({"series_instance_uid": uid, "status": "rejected", "reason": reason})
    for series in series_list:
        assert detector is not None
        try:
            records.append(_analyze_one(series, detector, out, read_s / max(len(series_list), 1)))
        except Exception as exc:  # one series' failure must not cost the others their results
            log.debug("series %s failed", series.series_instance_uid, exc_info=True)
            reason = (
                f"internal error while analyzing ({exc.__class__.__name__}: {exc}); see the log"
            )
            print(f"series {series.series_instance_uid}: failed: {reason}")
            records.append(
                {
                    "series_instance_uid": series.series_instance_uid,
                    "status": "failed",
                    "reason": reason,
                }
            )
    model = detector.info if detector else None
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "software": {"name": "dicom-node", "version": __version__},
        "not_for_diagnostic_use": True,
        "model": model.__dict__ if model else None,
        "series": records,
        "unreadable_files": [{"path": str(b.path), "reason": b.reason} for b in unreadable],
    }
    (out / "findings.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"findings: {out / 'findings.json'}")
    analyzed = sum(r["status"] == "analyzed" for r in records)
    if analyzed == 0:
        return 3
    return 1 if analyzed < len(records) or unreadable else 0


def _analyze_one(
    series: CTSeries, detector: NoduleDetector, out: Path, read_s: float
) -> dict[str, object]:
    result = detector.detect(series.volume)
    started = time.perf_counter()
    objects = build_results(series, result.findings, detector.info)
    folder = out / series.series_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    names = ["SR.dcm"] + (["SEG.dcm"] if objects.seg is not None else [])
    names += [f"KEY_{n:03d}.dcm" for n in range(1, len(objects.key_images) + 1)]
    for name, ds in zip(names, objects.all(), strict=True):
        write_atomically(ds, folder / name)
        files.append(str(folder / name))
    timings = {
        "read": round(read_s, 3),
        **result.timings_s,
        "write": round(time.perf_counter() - started, 3),
    }
    _print_table(series, result.findings, folder)
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "status": "analyzed",
        "model": detector.info.__dict__,
        "timings_s": timings,
        "candidates": result.candidates,
        "findings": [f.to_json() for f in result.findings],
        "files": files,
    }


def _print_table(series: CTSeries, findings: list[NoduleFinding], folder: Path) -> None:
    print(f"series {series.series_instance_uid}: {len(findings)} nodule(s) -> {folder}")
    if not findings:
        return
    print(
        f"  {'id':>3} {'score':>5} {'diam mm':>7} {'vol mm3':>8} {'composition':<12} {'malig':>5} {'L-RADS':<6} centre (LPS mm)"
    )
    for f in findings:
        centre = ", ".join(f"{c:.1f}" for c in f.center_mm)
        print(
            f"  {f.id:>3} {f.score:>5.2f} {f.diameter_mm:>7.1f} {f.volume_mm3:>8.0f} {f.composition:<12} "
            f"{f.malignancy_probability:>5.2f} {f.lung_rads:<6} ({centre})"
        )
