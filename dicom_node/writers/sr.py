"""Comprehensive 3D SR with a TID 1500 Measurement Report: one tracked finding per nodule.

Each nodule gets three measurement groups that share its tracking identifier and UID:
- TID 1410, a closed POLYLINE tracing the ellipse of the nodule's long and short axes on the
  axial slice through it, with every measurement and evaluation: the group viewers such as
  OHIF draw (OHIF 3.13 draws an ELLIPSE only when an axis runs along the image's columns,
  and nodules lie at any angle, so the ellipse is sent as its outline);
- TID 1411 referencing the nodule's SEG segment (volume, mean attenuation);
- TID 1411 with the nodule centre as a 3D POINT in the CT's frame of reference.
A scan without findings still gets a report, saying so, so that the radiologist knows it
was read.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom import UID
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import SegmentationStorage

from dicom_node.writers import codes
from dicom_node.writers.common import (
    MANUFACTURER,
    Device,
    OutputSeries,
    SourceFrames,
    TrackedFindingsWriter,
    algorithm_parameters,
    distinct_instances,
)
from inference.findings import ModelInfo, NoduleFinding

#: Points on the outline of a nodule's ellipse (the first repeated at the end to close it).
OUTLINE_POINTS = 48


def ellipse_outline(
    long_axis_ij: Sequence[Sequence[float]],
    short_axis_ij: Sequence[Sequence[float]],
    points: int = OUTLINE_POINTS,
) -> np.ndarray:
    """The ellipse whose diameters are the long and short axes, as a closed polyline of
    (column, row) SCOORD points. SCOORD coordinates put the top-left corner of the first pixel
    at (0, 0), so a pixel centre (column i, row j) is (i + 0.5, j + 0.5)."""
    long_ends, short_ends = np.asarray(long_axis_ij, float), np.asarray(short_axis_ij, float)
    centre = long_ends.mean(axis=0) + 0.5
    semi_long = (long_ends[1] - long_ends[0]) / 2
    semi_short = (short_ends[1] - short_ends[0]) / 2
    angles = np.linspace(0.0, 2 * np.pi, points + 1)
    outline = centre + np.outer(np.cos(angles), semi_long) + np.outer(np.sin(angles), semi_short)
    outline[-1] = outline[0]  # closed exactly, as PS3.3 C.18.6.1.1 asks of a closed POLYLINE
    return outline


class NoduleReport(TrackedFindingsWriter):
    """Builds the SR for one series' findings."""

    object_name = "an SR"

    def __init__(
        self,
        slices: Sequence[Dataset],
        findings: Sequence[NoduleFinding],
        tracking_uids: Sequence[str],
        model: ModelInfo,
        series: OutputSeries,
        segmentation: Dataset | None,
        replaces: Dataset | None = None,
        frames: SourceFrames | None = None,
    ) -> None:
        """``replaces``: the SR this one amends (a re-analysis after late slices). It is
        referenced as the predecessor document (PS3.3 C.17.2.3), and this SR takes the next
        instance number in the same series, so viewers list the newest version first."""
        super().__init__(slices, findings, tracking_uids, model, series, frames)
        if findings and segmentation is None:
            raise ValueError("findings need the SEG they reference")
        if replaces is not None and replaces.StudyInstanceUID != slices[0].StudyInstanceUID:
            raise ValueError("an amended SR must replace an SR of the same study")
        self.segmentation = segmentation
        self.replaces = replaces

    def _algorithm(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.model.name,
            version=self.model.version,
            parameters=[f"{k}={v}" for k, v in algorithm_parameters(self.model).items()],
        )

    def _groups(self, finding: NoduleFinding, number: int, tracking_uid: str) -> list[object]:
        tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=finding.label)
        side = codes.LATERALITY.get(finding.laterality or "")
        sites = [hd.sr.FindingSite(anatomic_location=codes.LUNG, laterality=side)]
        ds = self.slices[finding.axial_slice]
        algorithm = self._algorithm()
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=ellipse_outline(finding.long_axis_ij, finding.short_axis_ij),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                referenced_frame_numbers=self.frames.of(finding.axial_slice)
                if self.frames
                else None,
            ),
        )

        def mm(name: object, value: float) -> hd.sr.Measurement:
            return hd.sr.Measurement(name=name, value=round(value, 1), unit=codes.MM)  # type: ignore[arg-type]

        planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=region,
            finding_type=codes.FINDING_TYPES[finding.kind],
            finding_category=codes.MORPHOLOGIC_ABNORMALITY,
            algorithm_id=algorithm,
            finding_sites=sites,
            measurements=[
                mm(codes.DIAMETER, finding.diameter_mm),
                mm(codes.LONG_AXIS, finding.long_axis_mm),
                mm(codes.SHORT_AXIS, finding.short_axis_mm),
                hd.sr.Measurement(
                    name=codes.PROBABILITY_OF_CANCER,
                    value=round(finding.malignancy_probability, 3),
                    unit=codes.PROBABILITY,
                ),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    codes.COMPOSITION, codes.COMPOSITION_VALUES[finding.composition]
                ),
                hd.sr.QualitativeEvaluation(
                    codes.LUNG_RADS, codes.lung_rads_code(finding.lung_rads)
                ),
            ],
        )
        assert self.segmentation is not None
        volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=SegmentationStorage,
                sop_instance_uid=str(self.segmentation.SOPInstanceUID),
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(str(ds.SeriesInstanceUID)),
            ),
            finding_type=codes.FINDING_TYPES[finding.kind],
            finding_category=codes.MORPHOLOGIC_ABNORMALITY,
            algorithm_id=algorithm,
            finding_sites=sites,
            measurements=[
                hd.sr.Measurement(
                    name=codes.VOLUME, value=round(finding.volume_mm3), unit=codes.MM3
                ),
                hd.sr.Measurement(
                    name=codes.MEAN_ATTENUATION, value=round(finding.mean_hu, 1), unit=codes.HU
                ),
                hd.sr.Measurement(
                    name=codes.CALCIFICATION_EXTENT,
                    value=round(finding.calcified_volume_percent, 1),
                    unit=codes.PERCENT,
                ),
                *(
                    [
                        hd.sr.Measurement(
                            name=codes.PROBABILITY_OF_CALCIFICATION,
                            value=round(finding.calcification_probability, 3),
                            unit=codes.PROBABILITY,
                        )
                    ]
                    if finding.calcification_probability is not None
                    else []
                ),
            ],
        )
        centre = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_volume_surface=hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.array([finding.center_mm]),
                frame_of_reference_uid=str(ds.FrameOfReferenceUID),
                source_series=hd.sr.SourceSeriesForSegmentation(str(ds.SeriesInstanceUID)),
            ),
            finding_type=codes.FINDING_TYPES[finding.kind],
            finding_category=codes.MORPHOLOGIC_ABNORMALITY,
            algorithm_id=algorithm,
            finding_sites=sites,
        )
        return [planar, volumetric, centre]

    def build(self) -> hd.sr.Comprehensive3DSR:
        groups: list[object] = []
        for number, (finding, uid) in enumerate(
            zip(self.findings, self.tracking_uids, strict=True), start=1
        ):
            groups += self._groups(finding, number, uid)
        if not self.findings:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=str(UID()), identifier="Scan read"
                    ),
                    algorithm_id=self._algorithm(),
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(codes.FINDING, codes.NO_NODULE)
                    ],
                )
            )
        observer = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=dcm_codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=str(UID()),
                    name=self.model.name,
                    manufacturer_name=MANUFACTURER,
                    model_name=Device.running(self.model).model_name,
                ),
            )
        )
        report = hd.sr.MeasurementReport(
            observation_context=observer,
            procedure_reported=codes.CT_CHEST,
            imaging_measurements=groups,  # type: ignore[arg-type]
        )
        evidence = distinct_instances(self.slices) + (
            [self.segmentation] if self.segmentation is not None else []
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=self.series.series_instance_uid,
            series_number=self.series.number,
            sop_instance_uid=str(UID()),
            instance_number=int(self.replaces.InstanceNumber) + 1 if self.replaces else 1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            previous_versions=[self.replaces] if self.replaces is not None else None,
            series_description=self.series.description,
        )
        sr.CodingSchemeIdentificationSequence = [codes.private_scheme_identification()]
        Device.running(self.model).describe(sr)
        return sr
