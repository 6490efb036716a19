"""Synthetic nodules with exact masks and labels, and synthetic chest phantoms to put them in.

No annotated nodule data can be downloaded here, so the training set is built: nodules of
every composition, size and margin the detector must know, blended into real lung CT (and
into phantoms for variety) where their truth is known to the voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.network import COMPOSITIONS

SOLID_HU = (-40.0, 80.0)
GROUND_GLASS_HU = (-700.0, -450.0)
MARGINS = ("round", "lobulated", "spiculated")
#: Air inside a nodule (cavities, bubbly lucencies, bronchi) and calcium (always above the
#: 200 HU that calls a nodule calcified).
AIR_HU = (-980.0, -900.0)
CALCIUM_HU = (300.0, 900.0)
#: Appearances real nodules have and plain round/lobulated/spiculated ones lack. The four
#: calcified patterns are benign; a mass is a lesion over 30 mm.
MORPHOLOGIES = (
    "plain",
    "cavitary",
    "bubbly",
    "air-bronchogram",
    "calcified-central",
    "calcified-laminated",
    "calcified-popcorn",
    "calcified-diffuse",
    "perifissural",
    "pleural-tag",
    "large-lobulated",
    "mass",
)
#: How often each is drawn in training: plain ones stay the most common.
MORPHOLOGY_WEIGHTS = (0.40, 0.06, 0.05, 0.05, 0.04, 0.03, 0.03, 0.04, 0.07, 0.06, 0.09, 0.08)
CALCIFIED = frozenset(m for m in MORPHOLOGIES if m.startswith("calcified"))


@dataclass(frozen=True)
class NoduleSpec:
    """What a synthetic nodule is: the truth its labels are made from."""

    diameter_mm: float
    composition: str
    margin: str
    solid_fraction: float  # of the diameter, for part-solid nodules
    solid_hu: float
    ground_glass_hu: float
    seed: int
    morphology: str = "plain"

    @property
    def calcified(self) -> bool:
        return self.morphology in CALCIFIED

    @property
    def malignancy_probability(self) -> float:
        """A Brock-model-like risk from size, type and margin (Brock's published direction of
        each effect; its coefficients re-scaled): the label the malignancy head learns here."""
        logit = -4.2 + 0.16 * self.diameter_mm
        logit += {"solid": 0.0, "part-solid": 0.9, "ground-glass": -0.6}[self.composition]
        logit += {"round": -0.4, "lobulated": 0.3, "spiculated": 1.2}[self.margin]
        return float(1.0 / (1.0 + np.exp(-logit)))


def random_spec(
    rng: np.random.Generator,
    min_mm: float = 3.0,
    max_mm: float = 30.0,
    morphology: str | None = None,
) -> NoduleSpec:
    """Sizes log-uniform (small nodules are the common and the hard ones); a morphology drawn
    by :data:`MORPHOLOGY_WEIGHTS` unless one is asked for, with the size and composition it
    takes (cavities and calcium in solid nodules of 8 mm or more, masses 30-70 mm)."""
    morphology = morphology or str(rng.choice(MORPHOLOGIES, p=MORPHOLOGY_WEIGHTS))
    diameter = float(np.exp(rng.uniform(np.log(min_mm), np.log(max_mm))))
    composition = str(rng.choice(COMPOSITIONS, p=[0.6, 0.2, 0.2]))
    margin = str(rng.choice(MARGINS, p=[0.5, 0.3, 0.2]))
    if composition != "solid" and diameter < 5.0:
        diameter = float(rng.uniform(5.0, max(6.0, max_mm)))
    if (
        morphology in ("cavitary", "bubbly", "air-bronchogram", "pleural-tag")
        or morphology in CALCIFIED
    ):
        composition = "solid" if morphology != "air-bronchogram" else composition
        diameter = max(diameter, float(rng.uniform(8.0, 20.0)))
    if morphology == "pleural-tag":
        margin = "spiculated"
    if morphology == "perifissural":
        composition, margin, diameter = "solid", "round", float(rng.uniform(4.0, 10.0))
    if morphology == "large-lobulated":
        composition, margin, diameter = "solid", "lobulated", float(rng.uniform(15.0, 30.0))
    if morphology == "mass":
        composition, margin, diameter = "solid", "lobulated", float(rng.uniform(30.0, 70.0))
    return NoduleSpec(
        diameter_mm=diameter,
        composition=composition,
        margin=margin,
        solid_fraction=float(rng.uniform(0.25, 0.6)),
        solid_hu=float(rng.uniform(*SOLID_HU)),
        ground_glass_hu=float(rng.uniform(*GROUND_GLASS_HU)),
        seed=int(rng.integers(2**31)),
        morphology=morphology,
    )


def _radial_field(spec: NoduleSpec, grid_mm: np.ndarray) -> np.ndarray:
    """Signed distance-like field: < 0 inside. ``grid_mm`` is (3, ...) offsets from the centre."""
    rng = np.random.default_rng(spec.seed)
    r = np.sqrt((grid_mm**2).sum(axis=0)) + 1e-6
    unit = grid_mm / r
    radius = spec.diameter_mm / 2.0
    # Slight ellipsoid: real nodules are rarely perfect spheres. Perifissural nodules are
    # flat (lentiform or triangular in section), lying along their fissure.
    axes = rng.uniform(0.85, 1.15, size=3)
    if spec.morphology == "perifissural":
        axes[int(rng.integers(3))] *= rng.uniform(0.3, 0.45)
    axes /= np.cbrt(np.prod(axes))
    radius_dir = radius / np.sqrt(
        np.maximum(((unit / axes[:, None, None, None]) ** 2).sum(axis=0), 1e-12)
    )
    if spec.margin in ("lobulated", "spiculated"):
        lobes = rng.normal(size=(4, 3))
        lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
        for lobe in lobes:
            cos = np.tensordot(lobe, unit, axes=1)
            radius_dir *= 1.0 + 0.12 * np.clip(cos, 0, None) ** 4
    field = r - radius_dir
    if spec.margin == "spiculated":
        n_spikes = int(rng.integers(6, 14))
        spikes = rng.normal(size=(n_spikes, 3))
        spikes /= np.linalg.norm(spikes, axis=1, keepdims=True)
        for n, spike in enumerate(spikes):
            along = np.tensordot(spike, grid_mm, axes=1)
            across = np.sqrt(np.maximum(r**2 - along**2, 0))
            # A pleural tag: one strand running on, far beyond the others, towards the pleura.
            tag = spec.morphology == "pleural-tag" and n == 0
            length = radius * rng.uniform(0.5, 1.0) if not tag else rng.uniform(10.0, 20.0)
            width = 0.6 * (1.0 - np.clip((along - radius) / length, 0, 1))
            inside_spike = (along > 0) & (along < radius + length) & (across < width)
            field = np.where(inside_spike, np.minimum(field, across - width), field)
    return field


def _inner(
    spec: NoduleSpec, grid_mm: np.ndarray, inside: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """What a morphology puts inside the nodule: (HU there, where), drawn within ``inside``
    (the nodule shrunk by its wall) so that air never breaks through the margin."""
    rng = np.random.default_rng(spec.seed + 2)
    radius = spec.diameter_mm / 2.0
    r = np.sqrt((grid_mm**2).sum(axis=0))
    where = np.zeros(r.shape, dtype=bool)
    value = np.zeros(r.shape, dtype=np.float32)

    def ball(centre: np.ndarray, size: float) -> np.ndarray:
        return np.sqrt(((grid_mm - centre[:, None, None, None]) ** 2).sum(axis=0)) < size

    def offset(scale: float) -> np.ndarray:
        return rng.normal(size=3) * radius * scale

    if spec.morphology == "cavitary":
        where = ball(offset(0.12), radius * rng.uniform(0.35, 0.6)) & inside
        value[:] = rng.uniform(*AIR_HU)
    elif spec.morphology == "bubbly":
        for _ in range(int(rng.integers(3, 8))):
            where |= ball(offset(0.3), rng.uniform(1.0, 2.5)) & inside
        value[:] = rng.uniform(*AIR_HU)
    elif spec.morphology == "air-bronchogram":
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        along = np.tensordot(direction, grid_mm, axes=1)
        across = np.sqrt(np.maximum(r**2 - along**2, 0))
        where = (across < rng.uniform(0.8, 1.3)) & inside
        value[:] = rng.uniform(*AIR_HU)
    elif spec.morphology == "calcified-central":
        where = ball(offset(0.05), radius * rng.uniform(0.3, 0.5)) & inside
        value[:] = rng.uniform(*CALCIUM_HU)
    elif spec.morphology == "calcified-laminated":
        for fraction in (0.25, 0.5, 0.75):
            where |= (np.abs(r - radius * fraction) < 0.6) & inside
        value[:] = rng.uniform(*CALCIUM_HU)
    elif spec.morphology == "calcified-popcorn":
        for _ in range(int(rng.integers(3, 7))):
            where |= ball(offset(0.35), rng.uniform(1.2, 2.5)) & inside
        value[:] = rng.uniform(*CALCIUM_HU)
    elif spec.morphology == "calcified-diffuse":
        where = inside.copy()
        value[:] = rng.uniform(*CALCIUM_HU)
    elif spec.morphology == "mass":
        # Large tumours are often necrotic in the middle: lower attenuation, not air.
        where = ball(offset(0.1), radius * rng.uniform(0.2, 0.45)) & inside
        value[:] = rng.uniform(-10.0, 20.0)
    return value, where


def render_nodule(
    spec: NoduleSpec, shape: tuple[int, int, int], spacing_kji: np.ndarray, centre_kji: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Opacity (0..1, soft border) and HU value per voxel of a box, the truth mask, and
    where the value replaces the lung outright (air and calcium inside a nodule) rather than
    being blended with it.

    The mask is the opacity above one half, so the labels match what a reader would outline.
    """
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre_kji, spacing_kji, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    field = _radial_field(spec, grid)
    opacity = 1.0 / (1.0 + np.exp(field / 0.35))
    value = np.full(shape, spec.solid_hu, dtype=np.float32)
    if spec.composition == "ground-glass":
        value[:] = spec.ground_glass_hu
    elif spec.composition == "part-solid":
        core = np.sqrt((grid**2).sum(axis=0)) < spec.diameter_mm * spec.solid_fraction / 2.0
        value = np.where(core, spec.solid_hu, spec.ground_glass_hu).astype(np.float32)
        value = ndimage.gaussian_filter(value, 0.6)
    if spec.composition != "solid":
        # Ground glass is not uniform: vessels and lung remain partly visible through it.
        rng = np.random.default_rng(spec.seed + 1)
        texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
        value += (60.0 * texture / (texture.std() + 1e-6)).astype(np.float32)
    wall = min(3.0, spec.diameter_mm / 5.0)
    inner_value, replace = _inner(spec, grid, field < -wall)
    value = np.where(replace, inner_value, value).astype(np.float32)
    return opacity.astype(np.float32), value, opacity > 0.5, replace


def insert_nodule(
    image: np.ndarray,
    spec: NoduleSpec,
    centre_kji: np.ndarray,
    spacing_kji: np.ndarray,
    rng: np.random.Generator,
    slice_blur_mm: float = 0.0,
) -> np.ndarray:
    """Blend a nodule into ``image`` (HU, modified in place); return its mask on that grid.

    Each voxel takes the higher of lung and nodule, so ground glass leaves the vessels it
    covers visible, as real ground-glass opacities do. ``slice_blur_mm`` smears the nodule
    along the slice axis as thick reconstructions do; the mask stays the sharp truth. Noise
    like the scan's own is added on the nodule so that it looks no smoother than its
    surroundings.
    """
    reach = spec.diameter_mm * 1.2 + 4.0 + (20.0 if spec.morphology == "pleural-tag" else 0.0)
    half = np.ceil(reach / spacing_kji).astype(int)
    lo = np.maximum(np.floor(centre_kji).astype(int) - half, 0)
    hi = np.minimum(np.floor(centre_kji).astype(int) + half + 1, image.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    opacity, value, mask, replace = render_nodule(spec, shape, spacing_kji, centre_kji - lo)  # type: ignore[arg-type]
    if slice_blur_mm > 0:
        opacity = ndimage.gaussian_filter1d(opacity, slice_blur_mm / spacing_kji[0], axis=0)
    local = image[box]
    blended = np.where(replace, value, np.maximum(local, value))
    noise = rng.normal(0.0, 12.0, size=shape).astype(np.float32) * opacity
    image[box] = local * (1.0 - opacity) + blended * opacity + noise
    full = np.zeros(image.shape, dtype=bool)
    full[box] = mask
    return full


def chest_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (200, 240, 280),
    spacing_mm: float = 1.25,
) -> np.ndarray:
    """A synthetic chest in HU: body, two lungs, branching vessels and noise.

    Vessels are the main false positive a detector meets, so the phantom is mostly vessels.
    """
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cj, ci = shape[1] / 2, shape[2] / 2
    image = np.full(shape, -1000.0, dtype=np.float32)
    body = ((j - cj) / (0.46 * shape[1])) ** 2 + ((i - ci) / (0.48 * shape[2])) ** 2 <= 1.0
    image[np.broadcast_to(body, shape)] = 40.0
    for side in (-1, 1):
        lung = (
            ((j - cj) / (0.33 * shape[1])) ** 2
            + ((i - ci - side * 0.22 * shape[2]) / (0.17 * shape[2])) ** 2
            + ((k - shape[0] / 2) / (0.55 * shape[0])) ** 2
        ) <= 1.0
        image[lung] = -860.0
    vessels = np.zeros(shape, dtype=bool)
    lung_voxels = np.argwhere(image < -500)
    for _ in range(int(rng.integers(120, 200))):
        start = lung_voxels[rng.integers(len(lung_voxels))].astype(float)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(10, 60) / spacing_mm
        radius = rng.uniform(0.5, 3.0) / spacing_mm
        for t in np.linspace(0, length, int(length) + 1):
            p = np.round(start + t * direction).astype(int)
            r = max(1, round(radius * (1 - 0.5 * t / length)))
            lo, hi = np.maximum(p - r, 0), np.minimum(p + r + 1, shape)
            vessels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    image[vessels & (image < -500)] = rng.uniform(0, 60)
    image = ndimage.gaussian_filter(image, 0.7)
    image += rng.normal(0, 20, size=shape).astype(np.float32)
    return image.astype(np.float32)
