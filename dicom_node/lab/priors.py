"""A generated prior as DICOM files: what benchmarks send to a PACS or to the node.

The prior volume (``inference.lab.priors``) is written slice by slice into copies of the
current series' own datasets: same patient, new study, series and instance UIDs, a Study
Date earlier by the pair's interval, and each slice's position moved with the prior's grid.
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


def write_prior_series(
    current: CTSeries, prior: Volume, interval_days: int, folder: Path
) -> list[Path]:
    """``prior`` (on a grid of the current's shape and spacing) as a CT series of an earlier
    study of the same patient; one file per slice."""
    if current.multiframe is not None:
        raise ValueError("a prior is written slice by slice from a single-frame CT series")
    if prior.array.shape != current.volume.array.shape:
        raise ValueError(f"prior shape {prior.array.shape} is not {current.volume.array.shape}")
    when = study_date(current)
    if when is None:
        raise ValueError("the current series has no Study Date to date the prior from")
    day = (when - timedelta(days=interval_days)).strftime("%Y%m%d")
    study, series, frame = str(UID()), str(UID()), str(UID())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, template in enumerate(current.slices):
        ds = copy.deepcopy(template)  # Dataset.copy() shares elements with the template
        meta = FileMetaDataset(template.file_meta)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian  # written uncompressed
        ds.file_meta = meta
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = UID()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day
        ds.AccessionNumber = ""
        ds.ImagePositionPatient = [float(v) for v in prior.index_to_world(np.array([0, 0, k]))]
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        dtype = np.int16 if signed else np.uint16
        info = np.iinfo(dtype)
        stored = np.round((prior.array[k] - intercept) / slope)
        ds.PixelData = np.clip(stored, info.min, info.max).astype(dtype).tobytes()
        ds["PixelData"].VR = "OW"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
