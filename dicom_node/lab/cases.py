"""Annotated cases for training and evaluation: LIDC-IDRI folders or their .tar.xz archives."""

from __future__ import annotations

import csv
from pathlib import Path

from dicom_node.pipeline.series import read_series, unpacked
from inference.lab.evaluation import Reference
from inference.lab.experiments import Case
from inference.lab.lidc import read_lidc_xml

#: LUNA16's reference standard: nodules marked by at least this many of the four readers.
LUNA_MIN_READERS = 3


def load_cases(paths: list[Path], luna_csv: Path | None = None) -> list[Case]:
    """Every series under ``paths`` that has a LIDC XML beside it, with its references.

    Targets follow LUNA16 (>= 3 of 4 readers); nodules fewer readers marked are excluded
    regions. With ``luna_csv`` (LUNA16's annotations/excluded rows) that file decides the
    FROC's references instead; the radiologists' reads still fill the per-nodule table.
    """
    cases = []
    luna = _read_luna(luna_csv) if luna_csv else {}
    with unpacked(paths) as folders:
        for xml in sorted(p for folder in folders for p in folder.rglob("*.xml")):
            series, rejected, _ = read_series([xml.parent])
            if not series:
                raise ValueError(
                    f"{xml.parent}: no eligible CT series beside the LIDC XML ({rejected})"
                )
            ct = series[0]
            annotated = tuple(
                Reference(
                    tuple(n.center_mm.tolist()),
                    n.diameter_mm or 0.0,
                    composition=_composition(n.scores("texture")),
                    malignant=_malignant(n.scores("malignancy")),
                    excluded=n.readers < LUNA_MIN_READERS,
                    name=f"LIDC nodule ({n.readers} of 4 readers)",
                )
                for n in read_lidc_xml(xml, ct.volume)
            )
            references = tuple(luna.get(ct.series_instance_uid, annotated))
            name = str(ct.slices[0].get("PatientID", "") or xml.parent.name)
            cases.append(Case(name, ct.volume, references, annotated))
    return cases


def _composition(textures: list[int]) -> str | None:
    """LIDC texture (1 non-solid .. 5 solid), averaged over readers, as Lung-RADS composition."""
    if not textures:
        return None
    mean = sum(textures) / len(textures)
    return "ground-glass" if mean < 2.5 else "part-solid" if mean < 4 else "solid"


def _malignant(scores: list[int]) -> bool | None:
    if not scores:
        return None
    mean = sum(scores) / len(scores)
    return True if mean > 3 else False if mean < 3 else None


def _read_luna(path: Path) -> dict[str, list[Reference]]:
    out: dict[str, list[Reference]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            out.setdefault(row["seriesuid"], []).append(
                Reference(
                    (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])),
                    float(row["diameter_mm"]),
                    excluded=row["list"] == "excluded",
                    name=f"LUNA16 {row['list']}",
                )
            )
    return out
