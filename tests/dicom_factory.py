"""Build CT series as DICOM files for tests: every geometry and encoding a scanner may send."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


@dataclass
class SeriesSpec:
    slices: int = 96
    rows: int = 128
    columns: int = 128
    pixel_mm: float = 1.5
    slice_mm: float = 1.25
    origin: tuple[float, float, float] = (-96.0, -96.0, -150.0)
    slope: float = 1.0
    intercept: float = -1024.0
    modality: str = "CT"
    sop_class: str = CTImageStorage


def phantom(
    spec: SeriesSpec, nodule_mm: tuple[float, float, float] | None, nodule_diameter_mm: float = 12.0
) -> np.ndarray:
    """HU volume (k, j, i): a body of soft tissue, two lungs, and a solid sphere if asked."""
    k, j, i = np.mgrid[: spec.slices, : spec.rows, : spec.columns].astype(np.float32)
    x = spec.origin[0] + i * spec.pixel_mm
    y = spec.origin[1] + j * spec.pixel_mm
    z = spec.origin[2] + k * spec.slice_mm
    hu = np.full(k.shape, -1000.0, dtype=np.float32)
    hu[(x / 90) ** 2 + (y / 75) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        lung = ((x - side * 40) / 32) ** 2 + (y / 55) ** 2 <= 1
        hu[lung] = -850.0
    if nodule_mm is not None:
        r = np.sqrt((x - nodule_mm[0]) ** 2 + (y - nodule_mm[1]) ** 2 + (z - nodule_mm[2]) ** 2)
        hu[r <= nodule_diameter_mm / 2] = 30.0
    rng = np.random.default_rng(0)
    return hu + rng.normal(0, 8, hu.shape).astype(np.float32)


def ct_datasets(spec: SeriesSpec, hu: np.ndarray) -> list[Dataset]:
    """One dataset per slice with the modules a CT Image needs, in slice order."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for n in range(spec.slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = spec.sop_class
        ds.SOPClassUID = spec.sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "Test^Phantom",
            "PHANTOM1",
            "19600101",
            "O",
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = (
            "20260101",
            "120000",
            "1",
            "ACC1",
        )
        ds.ReferringPhysicianName = ""
        ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = (
            "20260101",
            "120000",
            "20260101",
            "120000",
        )
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = spec.modality, 2, spec.slices - n
        ds.Manufacturer, ds.PositionReferenceIndicator, ds.PatientPosition = "Test", "", "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [
            spec.origin[0],
            spec.origin[1],
            spec.origin[2] + n * spec.slice_mm,
        ]
        ds.PixelSpacing = [spec.pixel_mm, spec.pixel_mm]
        ds.SliceThickness = spec.slice_mm
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.Rows, ds.Columns = spec.rows, spec.columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = spec.slope, spec.intercept, "HU"
        stored = np.round((hu[n] - spec.intercept) / spec.slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def multiframe_ct(datasets: list[Dataset], sop_class: str = EnhancedCTImageStorage) -> Dataset:
    """The same slices as one multi-frame instance (highdicom's legacy converter lays out the
    functional groups; the SOP class is then set to what the test needs)."""
    ds = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def write_series(folder: Path, datasets: list[Dataset], shuffle_names: bool = True) -> list[Path]:
    """Files named in an order unrelated to position, as PACS exports often are."""
    folder.mkdir(parents=True, exist_ok=True)
    order = (
        np.random.default_rng(1).permutation(len(datasets))
        if shuffle_names
        else range(len(datasets))
    )
    paths = []
    for name, n in enumerate(order):
        path = folder / f"IM{name:05d}"
        datasets[int(n)].save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
