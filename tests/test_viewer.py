"""The node's results in OHIF, the web viewer radiologists use, from a real PACS: Orthanc
(with its DICOMweb plugin) holds a LIDC CT with a nodule planted in it, the patient's prior
CT (which the node fetches and compares with) and the node's SR, SEG and key images; OHIF
3.13 is served on loopback in front of it; headless Chromium opens the study. Asserted from
what the browser shows; screenshots are kept under out/screenshots."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicom_node.lab.cases import load_cases
from dicom_node.lab.priors import write_series_like
from dicom_node.pipeline.series import read_series
from inference.comparison import Status
from inference.lab.experiments import lung_points_mm, seeded
from inference.lab.priors import make_pair
from tests.peers import (
    REPO,
    Orthanc,
    free_port,
    require,
    run_browser_script,
    storescu,
    wait_for,
)
from tests.viewer import ORTHANC_DICOMWEB, OhifViewer

OHIF_DIST = REPO / "tests" / "browser" / "ohif" / "package" / "dist"
SHOTS = REPO / "out" / "screenshots"


def _coloured(png: Path) -> np.ndarray:
    """Coloured pixels of the viewport: the CT is grey, so colour is what a tool drew on it."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    height, width, _ = rgb.shape
    area = rgb[height // 10 : height * 9 // 10, width // 4 : width * 4 // 5]
    return (area.max(axis=2) - area.min(axis=2)) > 80


def _annotation_pixels(png: Path) -> int:
    return int(_coloured(png).sum())


def _drawn_over(png: Path, plain: Path) -> int:
    """Pixels coloured in ``png`` that are grey in ``plain`` (the same viewport before
    anything was drawn): what was drawn, without the viewport's own coloured controls."""
    return int((_coloured(png) & ~_coloured(plain)).sum())


def _viewport_detail(png: Path) -> float:
    """Spread of grey levels in the viewport area: a blank or black viewport has next to none."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    height, width = pixels.shape
    return float(pixels[height // 10 : height * 9 // 10, width // 4 : width * 9 // 10].std())


def _diameters(sr_path: Path) -> list[float]:
    """The Diameter the SR reports for each nodule, in its order."""
    report = pydicom.dcmread(sr_path)
    return [
        float(item.MeasuredValueSequence[0].NumericValue)
        for group in report.ContentSequence[-1].ContentSequence
        for item in group.ContentSequence
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == "Diameter"
    ]


@pytest.mark.slow
def test_ohif_shows_the_study_with_the_nodes_results(
    start_node: Any, tmp_path: Path, lidc_root: Path
) -> None:
    if not (OHIF_DIST / "index.html").exists():
        if os.environ.get("CI"):
            raise AssertionError(f"{OHIF_DIST} missing: scripts/test.sh fetches OHIF")
        pytest.skip(f"{OHIF_DIST} missing (scripts/test.sh fetches it)")
    # The LIDC case with its ground-glass nodule, and a solid nodule planted in its lungs
    # that grew from 7 to 10 mm since the patient's CT of a year before (the case re-sliced
    # after a rigid move, the planted nodule smaller): the report holds two findings or more
    # whatever the model makes of the rest, so stepping from one SR measurement to the next
    # is seen, and one of them is compared with the prior.
    case = lidc_root / "LIDC-IDRI-0002"
    (lidc,) = load_cases([case])
    (current,), _, _ = read_series([case])
    rng = seeded(1, "viewer pair")
    pair = make_pair(
        current.volume,
        lung_points_mm(current.volume, 2.0, rng),
        lidc.avoid_mm,
        rng,
        plan=((Status.GROWING, 7.0, 10.0),),
    )
    ct_files = write_series_like(current, pair.current, tmp_path / "current")
    prior_files = write_series_like(current, pair.prior, tmp_path / "prior", earlier_by_days=365)
    ct_images = len(ct_files)
    study = str(current.slices[0].StudyInstanceUID)
    port = free_port()
    modalities = {"DicomModalities": {"node": ["RESMTNET", "127.0.0.1", port]}}
    pacs = Orthanc(tmp_path / "pacs", extra={**ORTHANC_DICOMWEB, **modalities}).start()
    viewer = OhifViewer(OHIF_DIST, pacs.http_port).start()
    try:
        # The PACS also holds the patient's CT of a year before: the node fetches it by
        # C-MOVE and its report compares with it.
        assert storescu(pacs.dicom_port, prior_files, called="ORTHANC").returncode == 0
        peer = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        node = start_node(
            node={"port": port},
            priors={"enabled": True, "peers": [peer]},
            destinations=[{"name": "pacs", "ae_title": "ORTHANC", "port": pacs.dicom_port}],
        )
        # The PACS holds the CT and routes it to the node, which sends its results back.
        assert storescu(pacs.dicom_port, ct_files, called="ORTHANC").returncode == 0
        assert storescu(node.config.node.port, ct_files).returncode == 0

        def results_in_pacs() -> bool:
            classes = [
                pacs.get(f"/instances/{i['ID']}/metadata/SopClassUid").decode()
                for i in pacs.instances_of_study(study)
            ]
            return len(classes) >= ct_images + 3 and Comprehensive3DSRStorage in classes

        wait_for(results_in_pacs, 300, "the node's results in Orthanc", interval=2.0)
        # A second, independent consumer: Orthanc's REST API lists every object in the CT's
        # study, and DCMTK's dsrdump renders the SR it holds.
        by_class: dict[str, list[str]] = {}
        for instance in pacs.instances_of_study(study):
            sop_class = pacs.get(f"/instances/{instance['ID']}/metadata/SopClassUid").decode()
            by_class.setdefault(sop_class, []).append(instance["ID"])
        assert len(by_class[CTImageStorage]) == ct_images
        assert {Comprehensive3DSRStorage, SegmentationStorage, SecondaryCaptureImageStorage} <= set(
            by_class
        )
        sr_copy = tmp_path / "sr-from-pacs.dcm"
        sr_copy.write_bytes(pacs.get(f"/instances/{by_class[Comprehensive3DSRStorage][0]}/file"))
        rendered = subprocess.run(
            [require("dsrdump"), str(sr_copy)], capture_output=True, text=True, check=True
        ).stdout
        assert "Imaging Measurement Report" in rendered and '"Diameter"' in rendered
        assert '"Change since prior study")=' in rendered  # compared with the prior
        results = {
            pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID: p
            for p in Path(node.config.storage.path, "results").rglob("*.dcm")
        }
        diameters = _diameters(results[Comprehensive3DSRStorage])
        # What the segmentation panel lists: "Nodule 1", "Mass 2", ... as the SEG names them.
        seg = pydicom.dcmread(results[SegmentationStorage])
        segment_labels = [s.SegmentLabel for s in seg.SegmentSequence]
        assert len(segment_labels) == len(diameters)
        # The slices each segment covers: where OHIF may jump to it.
        covered: dict[int, set[float]] = {}
        for frame in seg.PerFrameFunctionalGroupsSequence:
            number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            z = round(float(frame.PlanePositionSequence[0].ImagePositionPatient[2]), 2)
            covered.setdefault(number, set()).add(z)
        SHOTS.mkdir(parents=True, exist_ok=True)
        report = run_browser_script(
            "ohif.mjs", viewer.url, study, str(ct_images), json.dumps(segment_labels), str(SHOTS)
        )
    finally:
        viewer.stop()
        pacs.stop()
    # The study browser lists the CT and each of the node's objects, by their series.
    browser_text = report["studyBrowser"]
    for shown in ("CT", "SR", "SEG", "Res-MTNet lung findings", "Res-MTNet nodule segmentation",
                  "Res-MTNet key images", str(ct_images)):  # fmt: skip
        assert shown in browser_text, f"{shown!r} not in OHIF's study browser"
    # The key images (opened first) and the CT render: the viewport holds an image.
    assert _viewport_detail(SHOTS / "ohif-opened.png") > 20
    assert f"/{ct_images})" in report["ctViewport"], "the CT's slice counter"
    assert _viewport_detail(SHOTS / "ohif-ct.png") > 20
    # Each nodule of the SR drawn on its slice, outlined, with its labels as OHIF writes them.
    assert len(diameters) >= 2, "the stepping checks need a case with two findings or more"
    for step, diameter in enumerate(diameters):
        labels = " ".join(report["srLabels"][step])
        assert f"Diameter: {diameter:.2f} mm" in labels, (step, labels, report["console"])
    # Colour over the image beyond what the plain CT view shows (its on-screen controls).
    plain = _annotation_pixels(SHOTS / "ohif-ct.png")
    assert _annotation_pixels(SHOTS / "ohif-sr.png") > plain + 300, "no outline drawn"
    assert _annotation_pixels(SHOTS / "ohif-sr-2.png") > plain + 300, "no outline drawn"
    # The SEG loaded and overlaid where OHIF jumps to it (its first frame: a nodule's edge
    # slice, where a sliver of a dozen pixels may be all there is), and each segment
    # overlaid on the slice OHIF jumps to from the segmentation panel: one per nodule.
    drawn = _drawn_over(SHOTS / "ohif-seg.png", SHOTS / "ohif-ct.png")
    assert drawn >= 10, f"no segment overlay ({drawn} px)"
    assert f"/{ct_images})" in report["segViewport"]
    assert all(report["segSlices"]), report["segSlices"]
    # Segments on slices of their own are each jumped to on a slice of their own (two
    # findings may share their central slice).
    apart = all(covered[a].isdisjoint(covered[b]) for a in covered for b in covered if a < b)
    if apart:
        assert len(set(report["segSlices"])) == len(diameters), report["segSlices"]
    # At this zoom (about 2.9 screen pixels per mm) the smallest reported nodule, 4 mm,
    # covers about 100 pixels on its central slice.
    for segment in range(1, len(diameters) + 1):
        overlay = _drawn_over(SHOTS / f"ohif-seg-{segment}.png", SHOTS / "ohif-ct.png")
        assert overlay >= 50, f"segment {segment} not overlaid ({overlay} px)"
