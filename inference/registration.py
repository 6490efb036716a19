"""Registration of a prior CT to the current one: where a point of one scan lies in the other.

Two scans of one patient differ by how the patient lay on the table (a rigid move) and by how
deeply they breathed (roughly affine inside the chest). Lungs first: the lung masks, which
look alike whatever the scanner and the dose, give a rigid start that cannot be fooled by
the table or the arms; the images inside the lungs (vessels, fissures) then refine it to an
affine. Both run on a coarse grid, because nodule matching needs millimetres, not voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.lungs import segment_lungs
from inference.transforms import ResampleToSpacing
from inference.volume import Volume, apply_affine

#: Grid of the rigid (lung masks) and affine (lung images) stages.
MASK_SPACING_MM = 4.0
IMAGE_SPACING_MM = 2.5
#: The images are compared inside the current lungs grown by this margin, so that the
#: pleura and the mediastinal edge take part but the table, arms and bowel do not.
LUNG_MARGIN_MM = 10.0
#: Lung CT contrast: air to vessel wall; denser tissue says nothing about lung alignment.
IMAGE_HU_WINDOW = (-1000.0, 100.0)


class RegistrationFailed(ValueError):
    """The two scans could not be aligned (no lungs found in one of them, for instance)."""


@dataclass(frozen=True)
class Registration:
    """An affine between the two scans' patient coordinates (LPS mm), and how well it fits.

    ``current_to_prior`` takes a point of the current scan to the same anatomy in the
    prior. ``residual_mm`` is the mean distance between the lung surfaces after alignment:
    what is left is breathing, posture and the registration's own error.
    """

    current_to_prior: np.ndarray
    residual_mm: float

    def to_prior(self, points_mm: np.ndarray) -> np.ndarray:
        return apply_affine(self.current_to_prior, points_mm)

    def to_current(self, points_mm: np.ndarray) -> np.ndarray:
        return apply_affine(np.linalg.inv(self.current_to_prior), points_mm)


def sitk_image(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """The volume (or other voxels on its grid) as a SimpleITK image in the same LPS place."""
    image = sitk.GetImageFromArray(
        np.ascontiguousarray(volume.array if array is None else array, dtype=np.float32)
    )
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetSpacing(tuple(float(v) for v in volume.spacing))
    image.SetDirection(tuple(float(v) for v in np.asarray(volume.direction).ravel()))
    return image


def _lungs(volume: Volume) -> tuple[Volume, np.ndarray]:
    coarse = ResampleToSpacing(MASK_SPACING_MM)(volume)
    lungs = segment_lungs(coarse)
    if lungs.sum() * np.prod(coarse.spacing) < 100_000.0:  # under 0.1 litre: not a chest CT
        raise RegistrationFailed("no lungs found to align the scans by")
    return coarse, lungs


def _method(
    metric_mask: sitk.Image | None, sampling: float, seed: int
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    if metric_mask is not None:
        method.SetMetricFixedMask(metric_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _matrix(transform: sitk.AffineTransform) -> np.ndarray:
    a = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = centre + np.asarray(transform.GetTranslation()) - a @ centre
    return out


def register_prior(current: Volume, prior: Volume, seed: int = 1) -> Registration:
    """Align ``prior`` to ``current``: rigid on the lung masks, then affine on the lungs'
    images. Deterministic for a given seed (the metric samples voxels at random)."""
    current_coarse, current_lungs = _lungs(current)
    prior_coarse, prior_lungs = _lungs(prior)
    # Smoothed masks give the rigid stage a gradient beyond the edge of the lungs.
    fixed_mask = sitk.SmoothingRecursiveGaussian(
        sitk_image(current_coarse, current_lungs.astype(np.float32)), 4.0
    )
    moving_mask = sitk.SmoothingRecursiveGaussian(
        sitk_image(prior_coarse, prior_lungs.astype(np.float32)), 4.0
    )
    start = sitk.CenteredTransformInitializer(
        fixed_mask,
        moving_mask,
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    rigid_method = _method(None, 0.3, seed)
    rigid_method.SetInitialTransform(start, inPlace=False)
    rigid = rigid_method.Execute(fixed_mask, moving_mask)

    affine = sitk.AffineTransform(3)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(rigid).GetNthTransform(0))
    affine.SetMatrix(euler.GetMatrix())
    affine.SetCenter(euler.GetCenter())
    affine.SetTranslation(euler.GetTranslation())
    current_image = ResampleToSpacing(IMAGE_SPACING_MM)(current)
    prior_image = ResampleToSpacing(IMAGE_SPACING_MM)(prior)
    fixed = sitk.Clamp(sitk_image(current_image), sitk.sitkFloat32, *IMAGE_HU_WINDOW)
    moving = sitk.Clamp(sitk_image(prior_image), sitk.sitkFloat32, *IMAGE_HU_WINDOW)
    region = sitk.Resample(
        sitk.Cast(sitk_image(current_coarse, current_lungs.astype(np.float32)), sitk.sitkUInt8),
        fixed,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
    )
    region = sitk.BinaryDilate(region, [int(np.ceil(LUNG_MARGIN_MM / IMAGE_SPACING_MM))] * 3)
    affine_method = _method(region, 0.1, seed)
    affine_method.SetInitialTransform(affine, inPlace=True)
    affine_method.Execute(fixed, moving)
    matrix = _matrix(affine)
    return Registration(
        matrix,
        _surface_residual_mm(current_coarse, current_lungs, prior_coarse, prior_lungs, matrix),
    )


def _surface_residual_mm(
    current: Volume,
    current_lungs: np.ndarray,
    prior: Volume,
    prior_lungs: np.ndarray,
    current_to_prior: np.ndarray,
) -> float:
    """Mean distance from the current lung surface to the aligned prior lung surface."""
    surface = current_lungs & ~ndimage.binary_erosion(current_lungs)
    points = current.index_to_world(np.argwhere(surface)[:, ::-1])
    in_prior = apply_affine(current_to_prior, points)
    distance = ndimage.distance_transform_edt(
        ~(prior_lungs & ~ndimage.binary_erosion(prior_lungs)), sampling=prior.spacing[::-1]
    )
    kji = prior.world_to_index(in_prior)[:, ::-1]
    values = ndimage.map_coordinates(distance, kji.T, order=1, mode="nearest")
    return float(np.mean(values))
