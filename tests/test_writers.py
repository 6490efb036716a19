"""The DICOM result objects: valid (dciodvfy), readable (highdicom, dsrdump), cross-referenced,
and registered to the CT (the SEG's nodule lies where the SR says it is)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.analyze import write_atomically
from dicom_node.pipeline.results import Amendment, ResultObjects, build_results, count_findings
from dicom_node.pipeline.series import CTSeries, read_series
from dicom_node.writers.common import OutputSeries
from dicom_node.writers.seg import NoduleSegmentation
from inference.detector import finding_from_mask
from inference.findings import ModelInfo, NoduleFinding
from tests.conftest import shared
from tests.dicom_factory import multiframe_ct

MODEL = ModelInfo("Res-MTNet", "test", "0" * 64)


def _sphere_finding(
    series: CTSeries, centre_mm: tuple[float, float, float], diameter: float, number: int = 1
) -> NoduleFinding:
    volume = series.volume
    k, j, i = np.indices(volume.array.shape)
    world = volume.index_to_world(np.stack([i, j, k], axis=-1).reshape(-1, 3)).reshape(*k.shape, 3)
    mask = np.linalg.norm(world - np.array(centre_mm), axis=-1) <= diameter / 2
    # The image holds what the mask outlines: a solid nodule's edge is measured on it.
    volume.array[mask] = np.maximum(volume.array[mask], 30.0)
    lo = np.argwhere(mask).min(axis=0)
    hi = np.argwhere(mask).max(axis=0) + 1
    box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    finding = finding_from_mask(
        volume,
        box,
        (int(lo[0]), int(lo[1]), int(lo[2])),
        score=0.9,
        composition="solid",
        malignancy_probability=0.4,
        midline_x_mm=0.0,  # the factory's phantom is centred on x = 0
    )
    return NoduleFinding(**{**finding.__dict__, "id": number})


@pytest.fixture
def results(nodule_series, tmp_path: Path) -> tuple[CTSeries, list[NoduleFinding], dict[str, Path]]:  # type: ignore[no-untyped-def]
    folder, _, centre = nodule_series
    (series,), _, _ = read_series([folder])
    findings = [
        _sphere_finding(series, centre, 12.0, 1),
        _sphere_finding(series, (35.0, -10.0, -70.0), 7.0, 2),
    ]
    objects = build_results(series, findings, MODEL)
    paths = {}
    for name, ds in [("sr", objects.sr), ("seg", objects.seg), ("key1", objects.key_images[0])]:
        assert ds is not None
        paths[name] = tmp_path / f"{name}.dcm"
        write_atomically(ds, paths[name])
    return series, findings, paths


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return found


@pytest.mark.parametrize("name", ["sr", "seg", "key1"])
def test_objects_pass_dciodvfy_without_errors(results, name: str) -> None:  # type: ignore[no-untyped-def]
    tool = _require("dciodvfy")
    run = subprocess.run([tool, str(results[2][name])], capture_output=True, text=True, check=False)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_sr_renders_with_dsrdump(results) -> None:  # type: ignore[no-untyped-def]
    tool = _require("dsrdump")
    run = subprocess.run([tool, str(results[2]["sr"])], capture_output=True, text=True, check=True)
    text = run.stdout
    assert "Imaging Measurement Report" in text
    assert text.count('"Tracking Identifier")="Nodule 1"') == 3
    assert '(27925004,SCT,"Nodule")' in text
    assert '"Long Axis")' in text
    assert '"Lung Imaging Reporting and Data System category")=(lungrads22-4A,' in text
    # Nodule 1 sits at x = -40 mm (LPS): the patient's right lung.
    assert '"Laterality")=(24028007,SCT,"Right")' in text


def _walk(items, found):  # type: ignore[no-untyped-def]
    for item in items:
        found.append(item)
        _walk(item.get("ContentSequence", []), found)
    return found


def _sr_groups(sr: Dataset) -> dict[str, list[Dataset]]:
    """Measurement groups by tracking identifier, read from the raw content tree."""
    groups: dict[str, list[Dataset]] = {}
    for item in _walk(sr.ContentSequence, []):
        if item.ConceptNameCodeSequence[0].CodeMeaning != "Measurement Group":
            continue
        for child in item.ContentSequence:
            if child.ConceptNameCodeSequence[0].CodeValue == "112039":
                groups.setdefault(child.TextValue, []).append(item)
    return groups


def _seg_centroid_mm(seg: Dataset, segment: int) -> np.ndarray:
    """Centroid of one segment in LPS mm, computed from the SEG's own frame geometry."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    cosines = np.array(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    )
    row_dir, col_dir = cosines[:3], cosines[3:]
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    points = []
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber != segment:
            continue
        origin = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        rows, cols = np.nonzero(frame)
        points.append(
            origin + np.outer(cols * spacing[1], row_dir) + np.outer(rows * spacing[0], col_dir)
        )
    return np.concatenate(points).mean(axis=0)


def test_seg_segments_lie_on_the_sr_centres(results) -> None:  # type: ignore[no-untyped-def]
    _, findings, paths = results
    seg = pydicom.dcmread(paths["seg"])
    sr = pydicom.dcmread(paths["sr"])
    groups = _sr_groups(sr)
    for number, finding in enumerate(findings, start=1):
        points = [
            child.GraphicData
            for group in groups[finding.label]
            for child in group.ContentSequence
            if child.ValueType == "SCOORD3D" and child.GraphicType == "POINT"
        ]
        (centre,) = points
        assert np.linalg.norm(_seg_centroid_mm(seg, number) - np.array(centre, dtype=float)) < 1.0


def test_sr_centre_is_the_true_nodule_centre(results, nodule_series) -> None:  # type: ignore[no-untyped-def]
    _, findings, _ = results
    assert np.linalg.norm(np.subtract(findings[0].center_mm, nodule_series[2])) < 1.0
    assert findings[0].diameter_mm == pytest.approx(12.0, abs=1.5)


def test_cross_references_and_study_placement(results) -> None:  # type: ignore[no-untyped-def]
    series, findings, paths = results
    sr, seg, key = (pydicom.dcmread(paths[n]) for n in ("sr", "seg", "key1"))
    ct = series.slices[0]
    for ds in (sr, seg, key):
        assert ds.StudyInstanceUID == ct.StudyInstanceUID
        assert ds.PatientID == ct.PatientID and ds.PatientName == ct.PatientName
        assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
        assert ds.SeriesDescription.startswith("Res-MTNet")
    assert len({sr.SeriesInstanceUID, seg.SeriesInstanceUID, key.SeriesInstanceUID}) == 3
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    # The SR's tracking UIDs are the SEG's, segment by segment, and the SR cites the SEG.
    groups = _sr_groups(sr)
    for segment, finding in zip(seg.SegmentSequence, findings, strict=True):
        assert segment.SegmentLabel == finding.label
        uids = {
            child.UID
            for group in groups[finding.label]
            for child in group.ContentSequence
            if child.ConceptNameCodeSequence[0].CodeValue == "112040"
        }
        assert uids == {segment.TrackingUID}
    cited = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for ref in s.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in cited and ct.SOPInstanceUID in cited
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID in {
        ds.SOPInstanceUID for ds in series.slices
    }
    assert "NOT FOR DIAGNOSTIC USE" in key.ImageComments


def test_objects_read_back_with_highdicom(results) -> None:  # type: ignore[no-untyped-def]
    _, findings, paths = results
    seg = hd.seg.segread(paths["seg"])
    assert seg.number_of_segments == len(findings)
    sr = hd.sr.srread(paths["sr"])
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [f.label for f in findings]
    diameters = [
        g.get_measurements(name=hd.sr.CodedConcept("81827009", "SCT", "Diameter"))[0].value
        for g in groups
    ]
    assert diameters == [round(f.diameter_mm, 1) for f in findings]


def test_report_without_findings_says_the_scan_was_read(nodule_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (series,), _, _ = read_series([nodule_series[0]])
    objects: ResultObjects = build_results(series, [], MODEL)
    assert objects.seg is None and objects.key_images == []
    path = tmp_path / "sr.dcm"
    write_atomically(objects.sr, path)
    text = subprocess.run(
        [_require("dsrdump"), str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "No nodule detected" in text
    assert "none found" in pydicom.dcmread(path).SeriesDescription


def test_a_count_never_calls_a_mass_a_nodule() -> None:
    assert count_findings(["nodule", "mass", "nodule"]) == "2 nodules, 1 mass"
    assert count_findings(["mass"]) == "1 mass"
    assert count_findings([]) == "none found"


def test_seg_refuses_empty_findings_and_mixed_frames(nodule_series) -> None:  # type: ignore[no-untyped-def]
    (series,), _, _ = read_series([nodule_series[0]])
    out = OutputSeries.new("x", 1)
    with pytest.raises(ValueError, match="at least one nodule"):
        NoduleSegmentation(series.slices, [], [], MODEL, out)
    finding = _sphere_finding(series, nodule_series[2], 10.0)
    mixed = [*series.slices]
    mixed[0] = pydicom.Dataset(mixed[0])
    mixed[0].FrameOfReferenceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="frames of reference"):
        NoduleSegmentation(mixed, [finding], ["1.2.3"], MODEL, out)


def test_finding_rejects_probability_outside_unit_interval(nodule_series) -> None:  # type: ignore[no-untyped-def]
    (series,), _, _ = read_series([nodule_series[0]])
    finding = _sphere_finding(series, nodule_series[2], 10.0)
    with pytest.raises(ValueError, match="not in"):
        NoduleFinding(**{**finding.__dict__, "malignancy_probability": 1.2})


def _coded(group: Dataset) -> dict[str, tuple[str, str]]:
    return {
        child.ConceptNameCodeSequence[0].CodeMeaning.lower(): (
            child.ConceptCodeSequence[0].CodeValue,
            child.ConceptCodeSequence[0].CodingSchemeDesignator,
        )
        for child in group.ContentSequence
        if child.ValueType == "CODE"
    }


def test_nodule_group_coded_like_the_field_writes_it(results) -> None:  # type: ignore[no-untyped-def]
    """highdicom's own lung-nodule example and ours agree on finding, category and site."""
    example = pydicom.dcmread(shared("interop/highdicom/sr_document_with_multiple_groups.dcm"))
    (theirs,) = [
        g
        for groups in _sr_groups(example).values()
        for g in groups
        if _coded(g).get("finding") == ("27925004", "SCT")
    ]
    ours = _sr_groups(pydicom.dcmread(results[2]["sr"]))["Nodule 1"][0]
    for concept in ("finding", "finding category", "finding site"):
        assert _coded(ours)[concept] == _coded(theirs)[concept]
    # Lung-RADS under SNOMED CT's observable; every code value fits CodeValue (16 characters).
    names = {
        child.ConceptNameCodeSequence[0].CodeValue: child
        for child in ours.ContentSequence
        if child.ValueType == "CODE"
    }
    assert "1362105002" in names
    assert all(len(child.ConceptCodeSequence[0].CodeValue) <= 16 for child in names.values())
    assert (
        example.ContentTemplateSequence[0].TemplateIdentifier
        == pydicom.dcmread(results[2]["sr"]).ContentTemplateSequence[0].TemplateIdentifier
        == "1500"
    )


def test_amended_report_keeps_series_and_tracking_and_names_its_predecessor(
    nodule_series, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder, _, centre = nodule_series
    (series,), _, _ = read_series([folder])
    first = build_results(series, [_sphere_finding(series, centre, 12.0, 1)], MODEL)
    moved = (centre[0] + 1.0, centre[1], centre[2])  # the same nodule, measured again
    amends = Amendment(
        first.sr,
        first.series_uids(),
        [(_sphere_finding(series, centre, 12.0).center_mm, first.tracking_uids[0])],
    )
    second = build_results(
        series,
        [
            _sphere_finding(series, moved, 12.0, 1),
            _sphere_finding(series, (35.0, -10.0, -70.0), 7.0, 2),
        ],
        MODEL,
        amends,
    )
    assert second.series_uids() == first.series_uids()
    assert second.tracking_uids[0] == first.tracking_uids[0]
    assert second.tracking_uids[1] != first.tracking_uids[0]
    assert second.sr.SOPInstanceUID != first.sr.SOPInstanceUID
    assert second.sr.InstanceNumber == first.sr.InstanceNumber + 1
    (predecessor,) = second.sr.PredecessorDocumentsSequence
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == first.sr.SOPInstanceUID
    path = tmp_path / "amended_sr.dcm"
    write_atomically(second.sr, path)
    report = subprocess.run(
        [_require("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    assert not [line for line in report.stderr.splitlines() if line.startswith("Error")]


def test_objects_from_a_multiframe_ct_reference_its_frames(nodule_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder, _, centre = nodule_series
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    multiframe_ct(datasets).save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    (series,), _, _ = read_series([tmp_path / "mf.dcm"])
    assert series.frame_numbers is not None
    finding = _sphere_finding(series, centre, 12.0, 1)
    objects = build_results(series, [finding], MODEL)
    for name, ds in objects.by_kind():
        path = tmp_path / f"{name}.dcm"
        write_atomically(ds, path)
        report = subprocess.run(
            [_require("dciodvfy"), str(path)], capture_output=True, text=True, check=False
        )
        assert not [line for line in report.stderr.splitlines() if line.startswith("Error")], name
    frame = series.frame_numbers[finding.axial_slice]
    regions = [
        item
        for item in _walk(objects.sr.ContentSequence, [])
        if item.get("GraphicType") == "POLYLINE"
    ]
    (region,) = regions
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == frame
    (key,) = objects.key_images
    assert key.SourceImageSequence[0].ReferencedFrameNumber == frame
    assert objects.seg is not None
    derived = {
        int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for f in objects.seg.PerFrameFunctionalGroupsSequence
    }
    spanned = {
        series.frame_numbers[k]
        for k in range(
            finding.mask_origin_kji[0], finding.mask_origin_kji[0] + finding.mask.shape[0]
        )
    }
    assert derived <= spanned and frame in derived
    evidence = [
        str(sop.ReferencedSOPInstanceUID)
        for study in objects.sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for sop in series_item.ReferencedSOPSequence
    ]
    assert evidence.count(str(series.multiframe.SOPInstanceUID)) == 1  # once, not per frame


def test_the_outline_is_the_closed_ellipse_of_the_two_axes() -> None:
    from dicom_node.writers.sr import ellipse_outline

    long_axis, short_axis = ((10.0, 20.0), (30.0, 40.0)), ((26.0, 24.0), (14.0, 36.0))
    outline = ellipse_outline(long_axis, short_axis, points=48)
    assert outline.shape == (49, 2) and np.array_equal(outline[0], outline[-1])
    centre = np.array([20.5, 30.5])  # pixel centres at +0.5
    # Its ends along each axis are the axis ends; nothing lies farther than half the long axis.
    assert np.allclose(outline[0], np.array(long_axis[1]) + 0.5)
    assert np.allclose(outline[12], np.array(short_axis[1]) + 0.5)
    assert np.allclose(outline[24], np.array(long_axis[0]) + 0.5)
    radius = np.linalg.norm(np.subtract(*long_axis)) / 2
    assert np.linalg.norm(outline - centre, axis=1).max() <= radius + 1e-9


def test_sr_seg_and_key_images_name_the_same_device(results) -> None:  # type: ignore[no-untyped-def]
    keywords = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber")
    devices = {
        name: tuple(str(pydicom.dcmread(path).get(k, "")) for k in keywords)
        for name, path in results[2].items()
    }
    assert len(set(devices.values())) == 1, devices
    assert devices["sr"][1] == f"{MODEL.name} {MODEL.version}"


def test_a_mass_is_written_as_a_mass_in_sr_seg_and_key_images(
    nodule_series, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder, _, centre = nodule_series
    (series,), _, _ = read_series([folder])
    # A 34 mm solid lesion: over the 30 mm that makes a mass.
    mass = _sphere_finding(series, (centre[0] + 8.0, centre[1], centre[2]), 34.0, 1)
    assert mass.kind == "mass" and mass.label == "Mass 1" and mass.lung_rads == "4B"
    objects = build_results(series, [mass], MODEL)
    assert objects.seg is not None
    paths = {}
    for name, ds in (("sr", objects.sr), ("seg", objects.seg), ("key", objects.key_images[0])):
        paths[name] = tmp_path / f"{name}.dcm"
        write_atomically(ds, paths[name])
        tool = _require("dciodvfy")
        run = subprocess.run([tool, str(paths[name])], capture_output=True, text=True, check=False)
        assert [
            line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")
        ] == []
    report = subprocess.run(
        [_require("dsrdump"), str(paths["sr"])], capture_output=True, text=True, check=True
    ).stdout
    assert '(4147007,SCT,"Mass")' in report and "27925004" not in report
    assert '"Tracking Identifier")="Mass 1"' in report
    assert "(1 mass)" in objects.sr.SeriesDescription
    (segment,) = pydicom.dcmread(paths["seg"]).SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    assert segment.SegmentLabel == "Mass 1"
    key = pydicom.dcmread(paths["key"])
    assert key.ImageComments.startswith("Mass 1.")
    assert mass.summary().to_json()["finding"] == "mass"
