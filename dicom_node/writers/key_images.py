"""Key images: one Secondary Capture per nodule for viewers that show neither SR nor SEG.

The axial slice through the nodule in a lung window, the nodule's outline in yellow, and a
caption with what the SR says, burnt in and marked not for diagnostic use. Compared with a
prior, the same place in the prior scan stands beside it (the prior resampled onto this
slice's plane through the registration), with the prior nodule circled, and the caption
says what changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom import UID
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from dicom_node.writers.common import (
    MANUFACTURER,
    NO_PRIOR,
    NOT_FOR_DIAGNOSTIC_USE,
    Device,
    OutputSeries,
    SourceFrames,
    TimePoint,
)
from inference.findings import ModelInfo, NoduleFinding
from inference.volume import Volume

LUNG_WINDOW = (-600.0, 1500.0)  # centre, width
MARKER = (255, 220, 0)


def lung_window(hu: np.ndarray) -> np.ndarray:
    centre, width = LUNG_WINDOW
    low = centre - width / 2
    return (np.clip((hu - low) / width, 0, 1) * 255).astype(np.uint8)


def _panel(hu_slice: np.ndarray, outline: np.ndarray) -> np.ndarray:
    grey = lung_window(hu_slice)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    edge = outline & ~ndimage.binary_erosion(outline)
    rgb[ndimage.binary_dilation(edge)] = MARKER
    return rgb


def render_key_image(
    hu_slice: np.ndarray,
    outline: np.ndarray,
    caption: list[str],
    prior: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """RGB uint8 picture: windowed slice, outline of the nodule, and a caption band added
    below it (below, not over: a nodule low in the image must not be hidden by its own
    caption); with ``prior`` (the prior's slice on the same plane, and what to outline
    there) the two side by side, now on the left."""
    rgb = _panel(hu_slice, outline)
    if prior is not None:
        rgb = np.concatenate([rgb, _panel(*prior)], axis=1)
    font = ImageFont.load_default(size=max(12, hu_slice.shape[0] // 32))
    line = font.size + 4 if hasattr(font, "size") else 16
    band = line * len(caption) + 10
    image = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + band))
    image.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(image)
    top = rgb.shape[0] + 6
    for n, text in enumerate(caption):
        draw.text((6, top + n * line), text, fill=MARKER if n == 0 else (255, 255, 255), font=font)
    return np.asarray(image)


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (0020,0020) letters of the rows and columns, from the CT's
    Image Orientation (Patient): the SC has no orientation of its own to report."""
    cosines = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    out = []
    for vector in cosines:
        axis = int(np.argmax(np.abs(vector)))
        out.append(letters[axis][0] if vector[axis] > 0 else letters[axis][1])
    return out[0], out[1]


class NoduleKeyImages:
    """Builds the Secondary Capture images of one series' findings, one per nodule."""

    def __init__(
        self,
        slices: Sequence[Dataset],
        volume: Volume,
        findings: Sequence[NoduleFinding],
        model: ModelInfo,
        series: OutputSeries,
        frames: SourceFrames | None = None,
        time_point: TimePoint = NO_PRIOR,
    ) -> None:
        """``volume``: the series' voxels in HU and their place in space (where a prior's
        slice is taken from)."""
        volume_hu = volume.array
        if volume_hu.shape[0] != len(slices):
            raise ValueError(f"{volume_hu.shape[0]} slices of pixels but {len(slices)} datasets")
        self.slices = list(slices)
        self.volume_hu = volume_hu
        self.findings = list(findings)
        self.model = model
        self.series = series
        self.frames = frames
        self.time_point = time_point
        self.geometry = volume

    def caption(self, finding: NoduleFinding) -> list[str]:
        n = self.findings.index(finding)
        change = self.time_point.change(n)
        category = (
            f"Lung-RADS {finding.lung_rads} (baseline)"
            if change is None
            else f"Lung-RADS {finding.lung_rads}: {change.lung_rads_rule}"
        )
        return [
            f"{finding.label}: {finding.diameter_mm:.1f} mm ({finding.long_axis_mm:.1f} x "
            f"{finding.short_axis_mm:.1f}), {finding.composition}"
            + (", calcified" if finding.calcified else "")
            + (f", {finding.laterality} lung" if finding.laterality else ""),
            f"{category}  malignancy {finding.malignancy_probability:.0%}"
            f"  score {finding.score:.2f}",
            *([self.time_point.describe(change)] if change is not None else []),
            f"{self.model.name} - {NOT_FOR_DIAGNOSTIC_USE}",
        ]

    def _prior_panel(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The prior resampled onto finding n's slice plane, and a circle where the matched
        prior nodule lies (none for a new nodule)."""
        tp = self.time_point
        change = tp.change(n)
        if change is None or tp.prior_volume is None or tp.registration is None:
            return None
        k = self.findings[n].axial_slice
        rows, columns = self.volume_hu.shape[1:]
        jj, ii = np.mgrid[:rows, :columns]
        here = self.geometry.index_to_world(
            np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], axis=1).astype(float)
        )
        there = tp.prior_volume.world_to_index(tp.registration.to_prior(here))[:, ::-1]
        plane = ndimage.map_coordinates(
            tp.prior_volume.array, there.T, order=1, mode="constant", cval=-1000.0
        ).reshape(rows, columns)
        circle = np.zeros((rows, columns), dtype=bool)
        if change.prior_diameter_mm is not None:
            finding = self.findings[n]
            centre = self.geometry.world_to_index(np.asarray(finding.center_mm))
            pixel = float(np.mean(self.geometry.spacing[:2]))
            radius = change.prior_diameter_mm / 2.0 / pixel
            circle = (jj - centre[1]) ** 2 + (ii - centre[0]) ** 2 <= radius**2
        return plane, circle

    def build(self) -> list[hd.sc.SCImage]:
        images = []
        shape = self.volume_hu.shape
        for number, finding in enumerate(self.findings, start=1):
            k = finding.axial_slice
            outline = finding.axial_mask(k, shape[1], shape[2])
            prior = self._prior_panel(number - 1)
            pixels = render_key_image(self.volume_hu[k], outline, self.caption(finding), prior)
            ref = self.slices[k]
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=ref,
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=self.series.series_instance_uid,
                series_number=self.series.number,
                sop_instance_uid=str(UID()),
                instance_number=number,
                manufacturer=MANUFACTURER,
                patient_orientation=patient_orientation(ref),
                transfer_syntax_uid=ExplicitVRLittleEndian,
                series_description=self.series.description,
            )
            if "Laterality" not in sc:
                # Type 2C in General Series: the chest is not a paired part, so it is empty.
                sc.Laterality = ""
            Device.running(self.model).describe(sc)
            sc.BurnedInAnnotation = "YES"
            change = self.time_point.change(number - 1)
            said = f": {self.time_point.describe(change)}" if change is not None else ""
            sc.ImageComments = f"{finding.label}{said}. {NOT_FOR_DIAGNOSTIC_USE}."
            sc.DerivationDescription = (
                f"Axial CT slice {ref.SOPInstanceUID} in a lung window, nodule outlined"
                + (
                    f"; on the right the prior study of {self.time_point.prior_date} resampled "
                    "onto the same plane through the registration"
                    if prior is not None
                    else ""
                )
            )
            source = Dataset()
            source.ReferencedSOPClassUID = ref.SOPClassUID
            source.ReferencedSOPInstanceUID = ref.SOPInstanceUID
            if self.frames is not None:
                source.ReferencedFrameNumber = self.frames.of(k)
            sc.SourceImageSequence = [source]
            images.append(sc)
        return images
