"""What the engine hands to the writers: one record per nodule, in patient coordinates."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Voxels at least this dense are calcium (what a nodule "calcified" means in HU).
CALCIUM_HU = 200.0
#: A nodule is reported calcified (benign pattern: Lung-RADS 1) only when the calcification
#: head says so and at least this share of its voxels is calcium: both, because calling a
#: cancer benign is the costly error.
CALCIFIED_PROBABILITY = 0.5
CALCIFIED_MIN_PERCENT = 10.0
#: A lesion this much of which is calcium is diffusely calcified (a benign pattern) whatever
#: the head says: none of the 712 non-calcified nodules of lidc-nodules reaches 37 % inside
#: the readers' masks. Without it a contrast-filled vessel (83 % calcium) read as a solid
#: Lung-RADS 4B nodule, the category that sends a patient to PET or biopsy.
DENSE_CALCIUM_PERCENT = 60.0
#: A lesion whose longest axial diameter exceeds this is a mass, not a nodule (Fleischner
#: glossary: a nodule measures up to 3 cm).
MASS_LONG_AXIS_MM = 30.0


def benign_calcification(probability: float | None, calcium_percent: float) -> bool:
    """A benign calcification: the head and the voxels agree (see CALCIFIED_*), or the
    voxels are calcium nearly throughout (DENSE_CALCIUM_PERCENT)."""
    if calcium_percent >= DENSE_CALCIUM_PERCENT:
        return True
    return (
        probability is not None
        and probability >= CALCIFIED_PROBABILITY
        and calcium_percent >= CALCIFIED_MIN_PERCENT
    )


@dataclass(frozen=True)
class ModelInfo:
    """Provenance that goes into every result: which algorithm, which weights."""

    name: str
    version: str
    weights_sha256: str


@dataclass(frozen=True)
class FindingSummary:
    """A finding as it is reported (``findings.json``) and kept in the index: numbers rounded
    to what they mean, no voxels. Reading a stored one back gives the same record."""

    id: int
    center_mm: tuple[float, float, float]
    diameter_mm: float
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    laterality: str | None
    composition: str
    malignancy_probability: float
    lung_rads: str
    score: float
    #: "nodule" or "mass"; records written before masses were told apart hold nodules.
    finding: str = "nodule"
    #: Share of the nodule's voxels at calcium density (%), and the calcification head's
    #: probability (None for weights without that head, and for older records).
    calcified_volume_percent: float = 0.0
    calcification_probability: float | None = None
    #: Mean diameter of the part at solid density (Lung-RADS' solid component, what the
    #: part-solid rules read); 0 in records written before it was kept.
    solid_part_mm: float = 0.0

    @property
    def calcified(self) -> bool:
        return benign_calcification(self.calcification_probability, self.calcified_volume_percent)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "center_mm": list(self.center_mm)}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> FindingSummary:
        x, y, z = (float(c) for c in entry["center_mm"])
        return cls(**{**entry, "center_mm": (x, y, z)})


@dataclass(frozen=True)
class NoduleFinding:
    """A detected nodule. Index coordinates refer to the source volume's (i, j, k) grid.

    ``mask`` is the nodule's voxels in a box of the source grid whose first voxel is
    ``mask_origin_kji``; the SEG and the measurements are made from the same voxels.
    """

    id: int
    score: float
    center_mm: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    composition: str
    malignancy_probability: float
    lung_rads: str
    axial_slice: int
    long_axis_ij: tuple[tuple[float, float], tuple[float, float]]
    short_axis_ij: tuple[tuple[float, float], tuple[float, float]]
    mask: np.ndarray = field(repr=False)
    mask_origin_kji: tuple[int, int, int] = (0, 0, 0)
    laterality: str | None = None  # "left" or "right" lung, when the lungs could be told apart
    calcified_volume_percent: float = 0.0
    calcification_probability: float | None = None
    solid_part_mm: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.malignancy_probability <= 1.0:
            raise ValueError(f"malignancy probability {self.malignancy_probability} not in [0, 1]")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score {self.score} not in [0, 1]")

    @property
    def diameter_mm(self) -> float:
        """Lung-RADS mean diameter: the average of long and short axis."""
        return (self.long_axis_mm + self.short_axis_mm) / 2.0

    @property
    def calcified(self) -> bool:
        return benign_calcification(self.calcification_probability, self.calcified_volume_percent)

    @property
    def kind(self) -> str:
        """ "mass" beyond :data:`MASS_LONG_AXIS_MM`, else "nodule"."""
        return "mass" if self.long_axis_mm > MASS_LONG_AXIS_MM else "nodule"

    @property
    def label(self) -> str:
        """The name shared by the SR tracking identifier, the SEG segment and the key image."""
        return f"{self.kind.capitalize()} {self.id}"

    def axial_mask(self, k: int, rows: int, columns: int) -> np.ndarray:
        """The mask on source slice ``k``, as a full-size (rows, columns) image."""
        out = np.zeros((rows, columns), dtype=bool)
        k0, j0, i0 = self.mask_origin_kji
        if k0 <= k < k0 + self.mask.shape[0]:
            _, dj, di = self.mask.shape
            out[j0 : j0 + dj, i0 : i0 + di] = self.mask[k - k0]
        return out

    def summary(self) -> FindingSummary:
        x, y, z = (round(c, 2) for c in self.center_mm)
        return FindingSummary(
            id=self.id,
            center_mm=(x, y, z),
            diameter_mm=round(self.diameter_mm, 1),
            long_axis_mm=round(self.long_axis_mm, 1),
            short_axis_mm=round(self.short_axis_mm, 1),
            volume_mm3=round(self.volume_mm3),
            mean_hu=round(self.mean_hu, 1),
            laterality=self.laterality,
            composition=self.composition,
            malignancy_probability=round(self.malignancy_probability, 3),
            lung_rads=self.lung_rads,
            score=round(self.score, 4),
            finding=self.kind,
            calcified_volume_percent=round(self.calcified_volume_percent, 1),
            calcification_probability=None
            if self.calcification_probability is None
            else round(self.calcification_probability, 3),
            solid_part_mm=round(self.solid_part_mm, 1),
        )

    def to_json(self) -> dict[str, object]:
        """This finding's entry in ``findings.json``."""
        return self.summary().to_json()
