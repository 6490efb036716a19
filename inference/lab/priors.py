"""Longitudinal pairs with a known truth, built from one real scan.

No real follow-up pair is at hand, so the "prior" is made from the current scan: re-sliced
after a rigid repositioning of the patient (a few degrees, up to 20 mm, another table
height), with fresh noise; then synthetic nodules of known sizes go into both so that some
grow, some shrink, some stay, one is new and one has resolved. The scan's own nodules are in
both, unchanged. Statuses, volume doubling times and where each nodule lies in the other scan
are then exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from inference.comparison import Status, volume_doubling_time_days
from inference.lab.synthesis import NoduleSpec, insert_nodule
from inference.measure import measure
from inference.registration import sitk_image
from inference.volume import Volume, apply_affine

#: (status, prior diameter, current diameter); 0 = absent from that scan. Sizes keep clear
#: of the 1.5 mm growth limit, so a status is never decided by a tenth of a millimetre.
DEFAULT_PLAN: tuple[tuple[Status, float, float], ...] = (
    (Status.GROWING, 6.0, 9.0),
    (Status.GROWING, 8.0, 12.0),
    (Status.SHRINKING, 11.0, 7.0),
    (Status.STABLE, 9.0, 9.0),
    (Status.NEW, 0.0, 7.0),
    (Status.RESOLVED, 9.0, 0.0),
)
#: Nodules are placed at least this far from each other and from the scan's own nodules.
SEPARATION_MM = 35.0


@dataclass(frozen=True)
class PlantedNodule:
    """A nodule of the pair, where it is in each scan and how large its truth mask is."""

    expected: Status
    current_mm: tuple[float, float, float]
    prior_mm: tuple[float, float, float]
    current_volume_mm3: float  # 0 when absent from the current scan
    prior_volume_mm3: float
    current_diameter_mm: float
    prior_diameter_mm: float

    def expected_vdt_days(self, interval_days: int) -> float | None:
        if self.expected is not Status.GROWING:
            return None
        return volume_doubling_time_days(
            self.prior_volume_mm3, self.current_volume_mm3, interval_days
        )


@dataclass(frozen=True)
class ScanPair:
    current: Volume
    prior: Volume
    #: The truth: a current point's place in the prior (4x4, LPS mm).
    current_to_prior: np.ndarray
    nodules: tuple[PlantedNodule, ...]
    interval_days: int


def repositioned(
    volume: Volume, rng: np.random.Generator, noise_hu: float = 15.0
) -> tuple[Volume, np.ndarray]:
    """The scan as if the patient had lain a little differently: the same anatomy moved by a
    random rigid transform and re-sliced on a grid shifted like another table height."""
    image = sitk_image(volume)
    centre = volume.index_to_world(np.array(volume.array.shape[::-1]) / 2.0)
    move = sitk.Euler3DTransform()
    move.SetCenter(tuple(float(c) for c in centre))
    move.SetRotation(*(float(a) for a in np.radians(rng.uniform(-4.0, 4.0, size=3))))
    # Direction and length drawn apart, so every length up to 20 mm is as likely.
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(2.0, 20.0)
    move.SetTranslation(tuple(float(s) for s in shift))
    grid = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    grid.SetSpacing(image.GetSpacing())
    grid.SetDirection(image.GetDirection())
    table = np.array([0.0, rng.uniform(-15.0, 15.0), rng.uniform(-10.0, 10.0)])
    grid.SetOrigin(tuple(float(v) for v in np.asarray(image.GetOrigin()) + table))
    # Resample pulls each prior voxel from the current scan: ``move`` takes prior points to
    # current ones, so the truth (current -> prior) is its inverse.
    moved = sitk.GetArrayFromImage(sitk.Resample(image, grid, move, sitk.sitkLinear, -1024.0))
    moved += rng.normal(0.0, noise_hu, size=moved.shape).astype(np.float32)
    prior = Volume(
        moved.astype(np.float32),
        tuple(float(v) for v in grid.GetOrigin()),  # type: ignore[arg-type]
        volume.spacing,
        volume.direction,
    )
    matrix = np.eye(4)
    forward = np.asarray(move.GetMatrix()).reshape(3, 3)
    offset = np.asarray(move.GetCenter()) + np.asarray(move.GetTranslation()) - forward @ centre
    matrix[:3, :3] = forward
    matrix[:3, 3] = offset
    return prior, np.linalg.inv(matrix)


def make_pair(
    current: Volume,
    lung_points_mm: np.ndarray,
    avoid_mm: np.ndarray,
    rng: np.random.Generator,
    interval_days: int = 365,
    plan: tuple[tuple[Status, float, float], ...] = DEFAULT_PLAN,
) -> ScanPair:
    """A (current, prior) pair from one scan: ``lung_points_mm`` are places in the current
    scan's aerated lung where nodules may go; ``avoid_mm`` the scan's own nodules."""
    prior, current_to_prior = repositioned(current, rng)
    current_image = current.array.astype(np.float32, copy=True)
    prior_image = prior.array.copy()
    chosen: list[np.ndarray] = [*np.asarray(avoid_mm).reshape(-1, 3)]
    planted = []
    for status, before_mm, after_mm in plan:
        point = _free_point(lung_points_mm, chosen, rng)
        there = apply_affine(current_to_prior, point)
        if not _inside(prior, there):
            continue
        chosen.append(point)
        seed = int(rng.integers(1 << 31))
        after = _plant(current_image, current, point, after_mm, seed, rng)
        before = _plant(prior_image, prior, there, before_mm, seed, rng)
        planted.append(
            PlantedNodule(
                status,
                (float(point[0]), float(point[1]), float(point[2])),
                (float(there[0]), float(there[1]), float(there[2])),
                after[0],
                before[0],
                after[1],
                before[1],
            )
        )
    return ScanPair(
        current.with_array(current_image),
        prior.with_array(prior_image),
        current_to_prior,
        tuple(planted),
        interval_days,
    )


def _free_point(
    points: np.ndarray, chosen: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    for _ in range(500):
        point = points[rng.integers(len(points))]
        if (
            not chosen
            or np.min(np.linalg.norm(np.asarray(chosen) - point, axis=1)) >= SEPARATION_MM
        ):
            return point
    raise ValueError("no room left in the lungs for another nodule")


def _inside(volume: Volume, point_mm: np.ndarray, margin: int = 10) -> bool:
    kji = volume.world_to_index(point_mm)[::-1]
    return bool(np.all(kji >= margin) and np.all(kji < np.asarray(volume.array.shape) - margin))


def _plant(
    image: np.ndarray,
    volume: Volume,
    point_mm: np.ndarray,
    diameter_mm: float,
    seed: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Insert a solid round nodule (the same shape seed in both scans) and return its truth
    mask's volume and mean diameter, measured as the engine measures; (0, 0) if none."""
    if diameter_mm <= 0:
        return 0.0, 0.0
    spec = NoduleSpec(diameter_mm, "solid", "round", 1.0, 30.0, -600.0, seed)
    spacing_kji = np.asarray(volume.spacing[::-1])
    mask = insert_nodule(image, spec, volume.world_to_index(point_mm)[::-1], spacing_kji, rng)
    m = measure(mask, image, tuple(spacing_kji))
    return m.volume_mm3, m.diameter_mm
