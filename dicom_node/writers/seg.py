"""DICOM Segmentation: one binary segment per nodule, frames on the source CT slices."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom import UID

from dicom_node.writers import codes
from dicom_node.writers.common import (
    Device,
    TrackedFindingsWriter,
    algorithm_parameters,
)


class NoduleSegmentation(TrackedFindingsWriter):
    """Builds the SEG; segment n carries the SR's tracking identifier and UID of nodule n.

    Frames are taken from the same (k, j, i) grid the CT volume was read into, in the order
    of ``slices``, which is how the SEG stays registered to the CT (no flip, no shift).
    """

    object_name = "a SEG"
    needs_findings = True

    def segment_descriptions(self) -> list[hd.seg.SegmentDescription]:
        algorithm = hd.AlgorithmIdentificationSequence(
            name=self.model.name,
            family=codes.ARTIFICIAL_INTELLIGENCE,
            version=self.model.version,
            parameters=algorithm_parameters(self.model),
        )
        return [
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=finding.label,
                segmented_property_category=codes.MORPHOLOGIC_ABNORMALITY,
                segmented_property_type=codes.FINDING_TYPES[finding.kind],
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=uid,
                tracking_id=finding.label,
                anatomic_regions=[codes.LUNG],
            )
            for n, (finding, uid) in enumerate(
                zip(self.findings, self.tracking_uids, strict=True), start=1
            )
        ]

    def build(self) -> hd.seg.Segmentation:
        """The SEG derives from the slices the nodules span, not the whole series: a few dozen
        frames to encode instead of hundreds of empty ones, the same result in the viewer."""
        first = min(f.mask_origin_kji[0] for f in self.findings)
        last = max(f.mask_origin_kji[0] + f.mask.shape[0] for f in self.findings)
        rows, columns = int(self.slices[0].Rows), int(self.slices[0].Columns)
        pixels = np.zeros((last - first, rows, columns, len(self.findings)), dtype=np.uint8)
        for n, finding in enumerate(self.findings):
            k, j, i = finding.mask_origin_kji
            dk, dj, di = finding.mask.shape
            pixels[k - first : k - first + dk, j : j + dj, i : i + di, n] = finding.mask
        if self.frames is None:
            sources, positions = self.slices[first:last], None
        else:  # frames of one multi-frame CT, placed by position
            sources = [self.frames.instance]
            positions = [
                hd.PlanePositionSequence(
                    hd.CoordinateSystemNames.PATIENT,
                    [float(v) for v in ds.ImagePositionPatient],
                )
                for ds in self.slices[first:last]
            ]
        device = Device.running(self.model)
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            plane_positions=positions,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=self.segment_descriptions(),
            series_instance_uid=self.series.series_instance_uid,
            series_number=self.series.number,
            sop_instance_uid=str(UID()),
            instance_number=1,
            series_description=self.series.description,
            content_label="NODULES",
            content_description=f"Lung nodules and masses found by {self.model.name}",
            manufacturer=device.manufacturer,
            manufacturer_model_name=device.model_name,
            software_versions=device.software_versions,
            device_serial_number=device.serial_number,
        )
        return seg
