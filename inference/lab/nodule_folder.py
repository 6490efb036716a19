"""Real nodules as volumes of interest: a folder laid out like ``lidc-nodules`` (``metadata.csv``
naming, per nodule, an HU image and a mask on the same grid, and optionally the radiologists'
ratings), read into :class:`NoduleVOI` records, and split by patient.

Ratings follow LIDC-IDRI: malignancy 1-5, texture 1 (non-solid) .. 5 (solid), calcification 1-5
calcified by pattern and 6 absent, and the other characteristics on their own scales. A column
that is absent, or empty for a row, is ``None``: the reader never invents a label.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.transforms import ThickenSlices
from inference.volume import Volume

REQUIRED_COLUMNS = ("patient_id", "nodule_id", "image_file", "mask_file")
#: LIDC texture -> composition: 1-2 ground-glass, 3-4 part-solid, 5 solid.
TEXTURE_TO_COMPOSITION = {
    1: "ground-glass",
    2: "ground-glass",
    3: "part-solid",
    4: "part-solid",
    5: "solid",
}
#: LIDC calcification rating meaning "no calcification"; 1-5 are calcified patterns.
CALCIFICATION_ABSENT = 6


@dataclass(frozen=True)
class Ratings:
    """The radiologists' consensus ratings of one nodule (each None where not given)."""

    malignancy: int | None = None
    texture: int | None = None
    calcification: int | None = None
    margin: int | None = None
    spiculation: int | None = None
    lobulation: int | None = None
    sphericity: int | None = None
    subtlety: int | None = None
    internal_structure: int | None = None
    diameter_mm: float | None = None

    @property
    def composition(self) -> str | None:
        return TEXTURE_TO_COMPOSITION.get(self.texture) if self.texture else None

    @property
    def calcified(self) -> bool | None:
        if self.calcification is None:
            return None
        return self.calcification != CALCIFICATION_ABSENT

    @property
    def malignant(self) -> bool | None:
        """The literature's binary target: >= 4 malignant, <= 2 benign, 3 left out (None)."""
        if self.malignancy is None or self.malignancy == 3:
            return None
        return self.malignancy >= 4


#: metadata.csv column -> Ratings field.
RATING_COLUMNS = {
    "Malignancy_value": "malignancy",
    "Texture_value": "texture",
    "Calcification_value": "calcification",
    "Margin_value": "margin",
    "Spiculation_value": "spiculation",
    "Lobulation_value": "lobulation",
    "Sphericity_value": "sphericity",
    "Subtlety_value": "subtlety",
    "InternalStructure_value": "internal_structure",
    "diameter_mm": "diameter_mm",
}


@dataclass(frozen=True)
class NoduleVOI:
    """One real nodule: HU voxels and its mask on the same grid, and how readers rated it."""

    patient_id: str
    nodule_id: str
    image: Volume
    mask: np.ndarray  # bool, the image's shape
    ratings: Ratings

    @property
    def key(self) -> str:
        return f"{self.patient_id}/{self.nodule_id}"

    def thickened(self, slice_mm: float) -> NoduleVOI:
        """The nodule as a scan of ``slice_mm`` slices would show it
        (:class:`~inference.transforms.ThickenSlices`), its mask still the readers' truth."""
        image = ThickenSlices(slice_mm)(self.image)
        return self if image is self.image else replace(self, image=image)

    @property
    def centre_mm(self) -> np.ndarray:
        """The mask's centroid in LPS mm: where a detector would place the nodule."""
        kji = np.argwhere(self.mask).mean(axis=0)
        return self.image.index_to_world(kji[::-1])


class NoduleFolderError(ValueError):
    """The folder or one of its files is not what ``metadata.csv`` promises; the message says
    which file, which column or row, and what was expected."""


def _rating(value: str, column: str, where: str) -> int | float | None:
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        raise NoduleFolderError(f"{where}: {column} {value!r} is not a number") from None
    return number if column == "diameter_mm" else round(number)


def read_image(path: Path) -> Volume:
    """A NIfTI (or any SimpleITK-readable) image as a :class:`Volume` in LPS millimetres."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise NoduleFolderError(f"{path}: not a readable image ({detail})") from None
    if image.GetDimension() != 3:
        raise NoduleFolderError(f"{path}: {image.GetDimension()} dimensions, expected 3")
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    x, y, z = (float(v) for v in image.GetOrigin())
    sx, sy, sz = (float(v) for v in image.GetSpacing())
    return Volume(array, (x, y, z), (sx, sy, sz), direction)


def read_nodule_folder(folder: Path) -> list[NoduleVOI]:
    """Every nodule ``folder/metadata.csv`` lists, in the file's order."""
    table = folder / "metadata.csv"
    if not table.is_file():
        raise NoduleFolderError(f"{table}: no such file (a nodule folder needs metadata.csv)")
    with table.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise NoduleFolderError(f"{table}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    nodules = []
    for line, row in enumerate(rows, start=2):
        where = f"{table}, row {line}"
        values = {
            field: _rating(row[column], column, where)
            for column, field in RATING_COLUMNS.items()
            if column in row
        }
        image = read_image(folder / row["image_file"])
        mask_volume = read_image(folder / row["mask_file"])
        if mask_volume.array.shape != image.array.shape:
            raise NoduleFolderError(
                f"{where}: mask {row['mask_file']} has shape {mask_volume.array.shape[::-1]}, "
                f"image {row['image_file']} {image.array.shape[::-1]} (x, y, z)"
            )
        mask = mask_volume.array > 0
        if not mask.any():
            raise NoduleFolderError(f"{where}: mask {row['mask_file']} is empty")
        image = image.with_array(image.array.astype(np.float32))
        nodules.append(
            NoduleVOI(row["patient_id"], row["nodule_id"], image, mask, Ratings(**values))  # type: ignore[arg-type]
        )
    return nodules


@dataclass(frozen=True)
class NoduleSplit:
    """Patients split three ways: ``train`` (the model learns from them), ``calibration``
    (its operating point is chosen on them) and ``validation`` (only ever scored). Each
    patient falls by a hash of (seed, patient ID): the same on any machine and in any input
    order, and never split."""

    seed: int
    validation_fraction: float = 0.2
    calibration_fraction: float = 0.1

    def part(self, patient_id: str) -> str:
        digest = hashlib.sha256(f"{self.seed}:{patient_id}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw < self.validation_fraction:
            return "validation"
        if draw < self.validation_fraction + self.calibration_fraction:
            return "calibration"
        return "train"

    def select(self, nodules: list[NoduleVOI], part: str) -> list[NoduleVOI]:
        return [n for n in nodules if self.part(n.patient_id) == part]
