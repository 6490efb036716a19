"""LIDC-IDRI XML annotations: the radiologists' nodule reads, in patient coordinates.

A site holding the full LIDC-IDRI can train and evaluate with the same commands as on the
two shared cases; this reader is what makes that possible.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.volume import Volume

NS = {"l": "http://www.nih.gov"}
#: Reads of different radiologists closer than this are the same nodule (LIDC convention).
GROUPING_MM = 10.0


@dataclass(frozen=True)
class NoduleRead:
    """One radiologist's outline of one nodule (>= 3 mm reads carry contours and scores)."""

    reader: int
    center_mm: tuple[float, float, float]
    diameter_mm: float | None
    characteristics: dict[str, int]


@dataclass(frozen=True)
class AnnotatedNodule:
    """Reads grouped across radiologists: the consensus used as reference."""

    reads: tuple[NoduleRead, ...]

    @property
    def center_mm(self) -> np.ndarray:
        return np.mean([r.center_mm for r in self.reads], axis=0)

    @property
    def readers(self) -> int:
        return len({r.reader for r in self.reads})

    @property
    def diameter_mm(self) -> float | None:
        sizes = [r.diameter_mm for r in self.reads if r.diameter_mm is not None]
        return float(np.mean(sizes)) if sizes else None

    def scores(self, name: str) -> list[int]:
        return [r.characteristics[name] for r in self.reads if name in r.characteristics]


def _text(element: ET.Element, path: str) -> str:
    found = element.find(path, NS)
    if found is None or found.text is None:
        raise ValueError(f"LIDC XML: <{path}> missing")
    return found.text.strip()


def read_lidc_xml(path: Path, volume: Volume) -> list[AnnotatedNodule]:
    """Nodules marked by any reader, >= 3 mm reads only (smaller ones carry no outline)."""
    root = ET.parse(path).getroot()
    reads: list[NoduleRead] = []
    for reader, session in enumerate(root.findall("l:readingSession", NS)):
        for nodule in session.findall("l:unblindedReadNodule", NS):
            chars = nodule.find("l:characteristics", NS)
            if chars is None or len(chars) == 0:
                continue
            characteristics = {c.tag.split("}")[1]: int(c.text) for c in chars if c.text}
            points, best = [], (0.0, 0.0)
            for roi in nodule.findall("l:roi", NS):
                z = float(_text(roi, "l:imageZposition"))
                xy = np.array(
                    [
                        [float(_text(e, "l:xCoord")), float(_text(e, "l:yCoord"))]
                        for e in roi.findall("l:edgeMap", NS)
                    ]
                )
                if xy.size == 0:
                    continue
                k = float(volume.world_to_index(np.array([*volume.origin[:2], z]))[2])
                world = volume.index_to_world(np.column_stack([xy, np.full(len(xy), k)]))
                points.append(world)
                best = max(best, _axes_mm(world[:, :2]))
            if not points:
                continue
            centre = np.concatenate(points).mean(axis=0)
            reads.append(
                NoduleRead(
                    reader,
                    (float(centre[0]), float(centre[1]), float(centre[2])),
                    float(np.mean(best)) if best[0] > 0 else None,
                    characteristics,
                )
            )
    return _group(reads)


def _axes_mm(points: np.ndarray) -> tuple[float, float]:
    if len(points) < 2:
        return (0.0, 0.0)
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    a, b = np.unravel_index(np.argmax(d), d.shape)
    u = (points[b] - points[a]) / max(d[a, b], 1e-9)
    across = points @ np.array([-u[1], u[0]])
    return float(d[a, b]), float(across.max() - across.min())


def _group(reads: list[NoduleRead]) -> list[AnnotatedNodule]:
    groups: list[list[NoduleRead]] = []
    for read in reads:
        for group in groups:
            centre = np.mean([r.center_mm for r in group], axis=0)
            if np.linalg.norm(centre - read.center_mm) < GROUPING_MM:
                group.append(read)
                break
        else:
            groups.append([read])
    return [AnnotatedNodule(tuple(g)) for g in groups]
