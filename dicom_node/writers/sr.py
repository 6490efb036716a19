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

Every group carries the reading's Time Point Context (TID 1502): "Baseline" with the reason
there is no comparison, or a follow-up naming the prior study, which is referenced as
Pertinent Other Evidence. A follow-up adds to each nodule's first group its change since the
prior (status, the prior's size, the changes, the volume doubling time), and one group per
prior nodule no longer seen (resolved).
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
    NO_PRIOR,
    Device,
    OutputSeries,
    SourceFrames,
    TimePoint,
    TrackedFindingsWriter,
    algorithm_parameters,
    distinct_instances,
)
from inference.findings import FindingSummary, ModelInfo, NoduleFinding

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
        time_point: TimePoint = NO_PRIOR,
    ) -> None:
        """``replaces``: the SR this one amends (a re-analysis after late slices). It is
        referenced as the predecessor document (PS3.3 C.17.2.3), and this SR takes the next
        instance number in the same series, so viewers list the newest version first."""
        super().__init__(slices, findings, tracking_uids, model, series, frames)
        if findings and segmentation is None:
            raise ValueError("findings need the SEG they reference")
        if time_point.follow_up and len(time_point.changes) != len(findings):
            raise ValueError(
                f"{len(findings)} findings but {len(time_point.changes)} changes since the prior"
            )
        if (
            time_point.prior is not None
            and time_point.prior.StudyInstanceUID == slices[0].StudyInstanceUID
        ):
            raise ValueError("the prior study must be another study than the one reported")
        self.time_point = time_point
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

    def _time_point_context(self) -> hd.sr.TimePointContext:
        if self.time_point.follow_up:
            return hd.sr.TimePointContext(
                f"Follow-up, compared with the prior study of {self.time_point.prior_date}"
            )
        return hd.sr.TimePointContext(
            f"Baseline: {self.time_point.baseline_reason}", time_point_type=codes.BASELINE
        )

    def _change_content(
        self, n: int
    ) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
        """Measurements and evaluations of finding n's change since the prior."""
        change = self.time_point.change(n)
        if change is None:
            return [], []
        measured = [
            (codes.PRIOR_DIAMETER, change.prior_diameter_mm, codes.MM),
            (codes.PRIOR_VOLUME, change.prior_volume_mm3, codes.MM3),
            (codes.DIAMETER_CHANGE, change.diameter_change_mm, codes.MM),
            (codes.VOLUME_CHANGE, change.volume_change_percent, codes.PERCENT),
            (codes.VOLUME_DOUBLING_TIME, change.vdt_days, codes.DAYS),
        ]
        measurements = [
            hd.sr.Measurement(name=name, value=value, unit=unit)
            for name, value, unit in measured
            if value is not None
        ]
        status = hd.sr.QualitativeEvaluation(
            codes.INTERVAL_CHANGE, codes.CHANGE_VALUES[str(change.status)]
        )
        return measurements, [status]

    def _resolved_group(self, prior: FindingSummary) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        """A prior nodule no longer seen: its prior size, and that it resolved."""
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(UID()), identifier=f"Prior {prior.finding} {prior.id}"
            ),
            time_point_context=self._time_point_context(),
            finding_type=codes.FINDING_TYPES[prior.finding],
            algorithm_id=self._algorithm(),
            measurements=[
                hd.sr.Measurement(
                    name=codes.PRIOR_DIAMETER, value=prior.diameter_mm, unit=codes.MM
                ),
                hd.sr.Measurement(name=codes.PRIOR_VOLUME, value=prior.volume_mm3, unit=codes.MM3),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(codes.INTERVAL_CHANGE, codes.CHANGE_VALUES["resolved"])
            ],
        )

    def _groups(self, finding: NoduleFinding, number: int, tracking_uid: str) -> list[object]:
        tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=finding.label)
        when = self._time_point_context()
        change_measurements, change_evaluations = self._change_content(number - 1)
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
            time_point_context=when,
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
                *change_measurements,
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    codes.COMPOSITION, codes.COMPOSITION_VALUES[finding.composition]
                ),
                hd.sr.QualitativeEvaluation(
                    codes.LUNG_RADS,
                    codes.lung_rads_code(finding.lung_rads, self.time_point.follow_up),
                ),
                *change_evaluations,
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
            time_point_context=when,
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
            time_point_context=when,
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
        groups += [self._resolved_group(prior) for prior in self.time_point.resolved]
        if not self.findings:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=str(UID()), identifier="Scan read"
                    ),
                    time_point_context=self._time_point_context(),
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
        if self.time_point.prior is not None:
            evidence.append(self.time_point.prior)  # another study: Pertinent Other Evidence
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
