"""Measurements on shapes of known size, and the Lung-RADS table."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference.findings import DENSE_CALCIUM_PERCENT, NoduleFinding
from inference.lungrads import lung_rads_category
from inference.measure import axial_axes, half_maximum_edge, measure, measured_voxels


def _ellipsoid(
    radii_mm: tuple[float, float, float], spacing_kji: tuple[float, float, float], shape: int = 64
):
    k, j, i = np.ogrid[:shape, :shape, :shape]
    c = shape / 2
    return (
        ((k - c) * spacing_kji[0] / radii_mm[0]) ** 2
        + ((j - c) * spacing_kji[1] / radii_mm[1]) ** 2
        + ((i - c) * spacing_kji[2] / radii_mm[2]) ** 2
    ) <= 1.0


@pytest.mark.parametrize("diameter", [6.0, 10.0, 23.0])
def test_sphere_of_known_size(diameter: float) -> None:
    spacing = (0.7, 0.7, 0.7)
    mask = _ellipsoid((diameter / 2,) * 3, spacing)
    hu = np.where(mask, 35.0, -850.0)
    m = measure(mask, hu, spacing)
    pixel = spacing[1]
    assert m.long_axis_mm == pytest.approx(diameter, abs=pixel)
    assert m.short_axis_mm == pytest.approx(diameter, abs=pixel)
    assert m.diameter_mm == pytest.approx(diameter, abs=pixel)
    assert m.volume_mm3 == pytest.approx(np.pi / 6 * diameter**3, rel=0.08)
    assert m.mean_hu == pytest.approx(35.0)


def test_long_and_short_axis_of_an_ellipse_in_plane() -> None:
    spacing = (1.0, 0.5, 0.5)
    mask = _ellipsoid((3.0, 4.0, 9.0), spacing, shape=48)
    m = measure(mask, mask.astype(float), spacing)
    assert m.long_axis_mm == pytest.approx(18.0, abs=0.5)
    assert m.short_axis_mm == pytest.approx(8.0, abs=0.5)
    assert m.axial_slice == 24


def test_axial_axes_of_a_rotated_ellipse() -> None:
    jj, ii = np.mgrid[:80, :80]
    u = ((ii - 40) + (jj - 40)) / np.sqrt(2)
    v = ((ii - 40) - (jj - 40)) / np.sqrt(2)
    mask = (u / 20) ** 2 + (v / 6) ** 2 <= 1.0
    axes = axial_axes(mask, (0.5, 0.5))
    assert axes.long_axis_mm == pytest.approx(20.0, abs=0.75)
    assert axes.short_axis_mm == pytest.approx(6.0, abs=0.75)
    # The drawn end points have the reported lengths and cross at right angles.
    long_vec = np.diff(axes.long_ends_ij, axis=0)[0] * 0.5
    short_vec = np.diff(axes.short_ends_ij, axis=0)[0] * 0.5
    assert np.linalg.norm(long_vec) == pytest.approx(axes.long_axis_mm)
    assert np.linalg.norm(short_vec) == pytest.approx(axes.short_axis_mm)
    assert abs(long_vec @ short_vec) < 1e-6


def test_empty_mask_measures_zero() -> None:
    axes = axial_axes(np.zeros((5, 5), dtype=bool), (1.0, 1.0))
    assert (axes.long_axis_mm, axes.short_axis_mm) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("composition", "diameter", "solid", "category"),
    [
        ("solid", 5.9, 0, "2"),
        ("solid", 5.96, 0, "3"),  # reported to one decimal: 6.0 mm
        ("solid", 7.9, 0, "3"),
        ("solid", 8.0, 0, "4A"),
        ("solid", 14.9, 0, "4A"),
        ("solid", 15.0, 0, "4B"),
        ("part-solid", 5.9, 3, "2"),
        ("part-solid", 6.0, 5.9, "3"),
        ("part-solid", 12.0, 6.0, "4A"),
        ("part-solid", 12.0, 8.0, "4B"),
        ("ground-glass", 29.9, 0, "2"),
        ("ground-glass", 30.0, 0, "3"),
    ],
)
def test_lung_rads_v2022_baseline_table(
    composition: str, diameter: float, solid: float, category: str
) -> None:
    assert lung_rads_category(composition, diameter, solid) == category


def test_lung_rads_rejects_unknown_composition() -> None:
    with pytest.raises(ValueError, match="composition must be"):
        lung_rads_category("calcified", 5.0)


def test_a_benign_calcification_is_lung_rads_1_whatever_its_size() -> None:
    assert lung_rads_category("solid", 12.0, 12.0, calcified=True) == "1"
    assert lung_rads_category("solid", 12.0, 12.0, calcified=False) == "4A"


def _cored_nodule(
    core_radius_mm: float, core_hu: float, probability: float | None
) -> tuple[NoduleFinding, np.ndarray, np.ndarray]:
    """A 12 mm solid nodule (35 HU) in lung with a central core of ``core_hu``, measured as
    the detector measures a finding; with its mask and core."""
    from inference.detector import finding_from_mask
    from inference.volume import Volume

    spacing = (0.7, 0.7, 0.7)
    mask = _ellipsoid((6.0, 6.0, 6.0), spacing)
    core = _ellipsoid((core_radius_mm,) * 3, spacing)
    hu = np.where(core, core_hu, np.where(mask, 35.0, -850.0)).astype(np.float32)
    finding = finding_from_mask(
        Volume(hu, (0.0, 0.0, 0.0), spacing, np.eye(3)),
        mask,
        (0, 0, 0),
        score=0.9,
        composition="solid",
        malignancy_probability=0.1,
        calcification_probability=probability,
    )
    return finding, mask, core


@pytest.mark.parametrize(
    ("core_hu", "probability", "category"),
    [(600.0, 0.9, "1"), (600.0, 0.2, "4A"), (40.0, 0.9, "4A")],
)
def test_only_calcium_the_head_also_sees_makes_a_nodule_benign(
    core_hu: float, probability: float, category: str
) -> None:
    """Lung-RADS 1 needs both: calcium in the voxels and the calcification head's word."""
    finding, mask, core = _cored_nodule(3.5, core_hu, probability)
    assert finding.lung_rads == category
    assert finding.calcified_volume_percent == pytest.approx(
        100.0 * (core.sum() if core_hu > 200 else 0) / mask.sum(), abs=0.1
    )


@pytest.mark.parametrize(
    ("core_radius_mm", "probability", "category"),
    [(5.6, 0.1, "1"), (5.6, None, "1"), (4.5, 0.1, "4A")],
)
def test_a_lesion_calcium_nearly_throughout_is_benign_whatever_the_head_says(
    core_radius_mm: float, probability: float | None, category: str
) -> None:
    """Diffuse calcification (or a contrast-filled vessel) is never a suspicious solid
    nodule; calcium in less of it still needs the head's word."""
    finding, _, _ = _cored_nodule(core_radius_mm, 600.0, probability)
    dense = finding.calcified_volume_percent >= DENSE_CALCIUM_PERCENT
    assert dense == (category == "1")
    assert finding.lung_rads == category and finding.calcified == dense


@pytest.mark.parametrize("diameter", [6.0, 12.0])
def test_half_maximum_edge_trims_a_generous_mask_to_the_true_size(diameter: float) -> None:
    """A blurred sphere outlined 1 mm too wide (as LIDC's readers outline) measures its
    true size after trimming, whatever its size: the shell is not a fixed share of it."""
    spacing = (0.7, 0.7, 0.7)
    truth = _ellipsoid((diameter / 2,) * 3, spacing)
    hu = ndimage.gaussian_filter(np.where(truth, 30.0, -860.0), 1.0)
    generous = _ellipsoid((diameter / 2 + 1.0,) * 3, spacing)
    trimmed = half_maximum_edge(generous, hu)
    assert trimmed.sum() < generous.sum()
    assert trimmed.sum() == pytest.approx(truth.sum(), rel=0.06)
    assert not (trimmed & ~generous).any()  # only removes voxels


@pytest.mark.parametrize("composition", ["part-solid", "ground-glass"])
def test_a_small_solid_nodule_the_head_calls_subsolid_is_measured_as_solid(
    composition: str,
) -> None:
    """Partial volume makes a small solid nodule's rim look like ground glass; whatever the
    head calls it, its volume is the solid one, or its growth between two scans is wrong."""
    spacing = (0.7, 0.7, 0.7)
    truth = _ellipsoid((3.0,) * 3, spacing)
    hu = ndimage.gaussian_filter(np.where(truth, 30.0, -860.0), 1.0)
    generous = _ellipsoid((4.0,) * 3, spacing)
    measured = measured_voxels(generous, hu, composition)
    assert measured.sum() == pytest.approx(truth.sum(), rel=0.06)
    assert (measured == half_maximum_edge(generous, hu)).all()


@pytest.mark.parametrize(
    ("core_hu", "composition"), [(30.0, "part-solid"), (-550.0, "ground-glass")]
)
def test_a_ground_glass_part_is_kept_in_the_measured_volume(
    core_hu: float, composition: str
) -> None:
    """A part-solid nodule's ground glass lies millimetres outside its solid core, and a
    ground-glass nodule has no solid core: neither is cut down to half-maximum."""
    spacing = (0.7, 0.7, 0.7)
    outline = _ellipsoid((6.0,) * 3, spacing)
    core = _ellipsoid((2.5,) * 3, spacing)
    hu = ndimage.gaussian_filter(np.where(core, core_hu, np.where(outline, -550.0, -860.0)), 1.0)
    assert (measured_voxels(outline, hu, composition) == outline).all()
    assert half_maximum_edge(outline, hu).sum() < outline.sum()  # what solid would measure


def test_half_maximum_edge_leaves_a_mask_inside_the_chest_wall_alone() -> None:
    spacing = (0.7, 0.7, 0.7)
    mask = _ellipsoid((4.0, 4.0, 4.0), spacing)
    hu = np.where(mask, 30.0, 40.0)  # no lung around it: no edge to find
    assert (half_maximum_edge(mask, hu) == mask).all()
