"""Key images: one Secondary Capture per nodule for viewers that show neither SR nor SEG.

The axial slice through the nodule in a lung window, the nodule's outline in yellow, and a
caption with what the SR says, burnt in and marked not for diagnostic use.
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

LUNG_WINDOW = (-600.0, 1500.0)  # centre, width
MARKER = (255, 220, 0)


def lung_window(hu: np.ndarray) -> np.ndarray:
    centre, width = LUNG_WINDOW
    low = centre - width / 2
    return (np.clip((hu - low) / width, 0, 1) * 255).astype(np.uint8)


def render_key_image(hu_slice: np.ndarray, outline: np.ndarray, caption: list[str]) -> np.ndarray:
    """RGB uint8 picture: windowed slice, outline of the nodule, caption band at the bottom."""
    grey = lung_window(hu_slice)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    edge = outline & ~ndimage.binary_erosion(outline)
    edge = ndimage.binary_dilation(edge)
    rgb[edge] = MARKER
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, hu_slice.shape[0] // 32))
    line = font.size + 4 if hasattr(font, "size") else 16
    top = image.height - line * len(caption) - 6
    draw.rectangle([0, top - 4, image.width, image.height], fill=(0, 0, 0))
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
        volume_hu: np.ndarray,
        findings: Sequence[NoduleFinding],
        model: ModelInfo,
        series: OutputSeries,
        frames: SourceFrames | None = None,
        time_point: TimePoint = NO_PRIOR,
    ) -> None:
        if volume_hu.shape[0] != len(slices):
            raise ValueError(f"{volume_hu.shape[0]} slices of pixels but {len(slices)} datasets")
        self.slices = list(slices)
        self.volume_hu = volume_hu
        self.findings = list(findings)
        self.model = model
        self.series = series
        self.frames = frames
        self.time_point = time_point

    def caption(self, finding: NoduleFinding) -> list[str]:
        n = self.findings.index(finding)
        change = self.time_point.change(n)
        reading = "baseline" if change is None else change.lung_rads_rule
        return [
            f"{finding.label}: {finding.diameter_mm:.1f} mm ({finding.long_axis_mm:.1f} x "
            f"{finding.short_axis_mm:.1f}), {finding.composition}"
            + (", calcified" if finding.calcified else "")
            + (f", {finding.laterality} lung" if finding.laterality else ""),
            f"Lung-RADS {finding.lung_rads} ({reading})  malignancy {finding.malignancy_probability:.0%}"
            f"  score {finding.score:.2f}",
            *([self.time_point.describe(change)] if change is not None else []),
            f"{self.model.name} - {NOT_FOR_DIAGNOSTIC_USE}",
        ]

    def build(self) -> list[hd.sc.SCImage]:
        images = []
        shape = self.volume_hu.shape
        for number, finding in enumerate(self.findings, start=1):
            k = finding.axial_slice
            outline = finding.axial_mask(k, shape[1], shape[2])
            pixels = render_key_image(self.volume_hu[k], outline, self.caption(finding))
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
            sc.ImageComments = f"{finding.label}. {NOT_FOR_DIAGNOSTIC_USE}."
            sc.DerivationDescription = (
                f"Axial CT slice {ref.SOPInstanceUID} in a lung window, nodule outlined"
            )
            source = Dataset()
            source.ReferencedSOPClassUID = ref.SOPClassUID
            source.ReferencedSOPInstanceUID = ref.SOPInstanceUID
            if self.frames is not None:
                source.ReferencedFrameNumber = self.frames.of(k)
            sc.SourceImageSequence = [source]
            images.append(sc)
        return images
