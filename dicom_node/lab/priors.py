"""A generated scan as DICOM files: what benchmarks and tests send to a PACS or to the node.

A volume made from a real series (``inference.lab.priors``: a prior, or the scan with
nodules planted in it) is written slice by slice into copies of that series' own datasets:
same patient, new series and instance UIDs (the pixels are not the original's), and each
slice's position taken from the volume's grid. A prior also gets a study of its own, a Study
Date earlier by the pair's interval and its own frame of reference.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import numpy as np
from highdicom import UID
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.pipeline.priors import study_date
from dicom_node.pipeline.series import CTSeries
from inference.volume import Volume


def write_series_like(
    current: CTSeries, volume: Volume, folder: Path, earlier_by_days: int = 0
) -> list[Path]:
    """``volume`` (on a grid of the current's shape and spacing) as a CT series of the same
    patient, one file per slice: with ``earlier_by_days``, of a new study that many days
    before the current's (a prior); with 0, a new series of the current's own study."""
    if current.multiframe is not None:
        raise ValueError("a series is written slice by slice from a single-frame CT series")
    if volume.array.shape != current.volume.array.shape:
        raise ValueError(f"volume shape {volume.array.shape} is not {current.volume.array.shape}")
    first = current.slices[0]
    study, frame = str(first.StudyInstanceUID), str(first.FrameOfReferenceUID)
    day = None
    if earlier_by_days:
        when = study_date(current)
        if when is None:
            raise ValueError("the current series has no Study Date to date the prior from")
        day = (when - timedelta(days=earlier_by_days)).strftime("%Y%m%d")
        study, frame = str(UID()), str(UID())
    series = str(UID())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, template in enumerate(current.slices):
        ds = copy.deepcopy(template)  # Dataset.copy() shares elements with the template
        meta = FileMetaDataset(template.file_meta)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian  # written uncompressed
        ds.file_meta = meta
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = UID()
        if day is not None:
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day
            ds.AccessionNumber = ""
        ds.ImagePositionPatient = [float(v) for v in volume.index_to_world(np.array([0, 0, k]))]
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        dtype = np.int16 if signed else np.uint16
        info = np.iinfo(dtype)
        stored = np.round((volume.array[k] - intercept) / slope)
        ds.PixelData = np.clip(stored, info.min, info.max).astype(dtype).tobytes()
        ds["PixelData"].VR = "OW"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
