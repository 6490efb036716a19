"""Reading CT series from files into volumes, with the eligibility rules a nodule CAD needs.

Each rule that fails gives a one-line reason naming the tag and what was expected, so that
an operator can tell a scanner protocol problem from a broken file.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_node.pipeline.slices import SAME_POSITION_MM, is_localizer, median_step
from dicom_node.sop_classes import MULTI_FRAME_CT
from inference.volume import Volume

log = logging.getLogger(__name__)

#: Multi-frame CT: the whole series in one instance, geometry in functional groups.


@dataclass(frozen=True)
class EligibilityRules:
    """What a series must be for the detector to read it (``config.yaml``: ``eligibility``)."""

    min_coverage_mm: float = 80.0
    max_slice_spacing_mm: float = 3.0
    #: Largest relative deviation of one slice step from the median step.
    spacing_tolerance: float = 0.1
    #: Cosine tolerance for "axial" and "no tilt".
    orientation_tolerance: float = 0.02
    min_slices: int = 16

    #: Validated as the ``eligibility`` section of config.yaml: unknown keys are errors.
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value}")


class SeriesRejected(Exception):
    """A series the engine will not analyse; the message is the one-line reason."""


@dataclass
class UnreadableFile:
    path: Path
    reason: str


@dataclass
class SeriesFiles:
    """The files of one series as found on disk, headers read, pixels not yet."""

    series_instance_uid: str
    datasets: list[tuple[Path, Dataset]] = field(default_factory=list)


@dataclass(frozen=True)
class CTSeries:
    """An eligible series: its volume and, slice by slice, the datasets it came from.

    ``slices[k]`` is the dataset (pixel data dropped) of the volume's slice k, which the
    writers need for references and for copying patient and study attributes. For a
    multi-frame CT, ``slices[k]`` is a single-frame view of frame ``frame_numbers[k]`` of
    ``multiframe`` (same SOP instance), and references must name that frame.
    """

    volume: Volume
    slices: list[Dataset]
    frame_numbers: tuple[int, ...] | None = None
    multiframe: Dataset | None = None

    @property
    def series_instance_uid(self) -> str:
        return str(self.slices[0].SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        return str(self.slices[0].StudyInstanceUID)


def read_stored(paths: list[Path], series_uid: str) -> tuple[SeriesFiles, list[Path]]:
    """The series' files, and the indexed paths that have no file."""
    files, missing = SeriesFiles(series_uid), []
    for path in paths:
        try:
            files.datasets.append((path, pydicom.dcmread(path, defer_size="1 KB")))
        except FileNotFoundError:
            missing.append(path)
    return files, missing


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")


def scan_files(paths: Iterable[Path]) -> tuple[list[SeriesFiles], list[UnreadableFile]]:
    """Group DICOM files by Series Instance UID; list what is not DICOM or not an image.

    Files without a DICOM preamble (the LIDC XML, a README) are skipped quietly only when
    they are plainly not DICOM by name; any other unreadable file is reported.
    """
    groups: dict[str, SeriesFiles] = {}
    bad: list[UnreadableFile] = []
    for path in iter_files(paths):
        if path.suffix.lower() in {".xml", ".txt", ".md", ".json", ".csv"}:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, defer_size="1 KB")
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            bad.append(
                UnreadableFile(path, f"not a readable DICOM file ({exc.__class__.__name__}: {exc})")
            )
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        key = uid or f"<no SeriesInstanceUID> in {path.parent}"
        groups.setdefault(key, SeriesFiles(uid)).datasets.append((path, ds))
    return list(groups.values()), bad


def _float_list(ds: Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    where = f"{path.name}: {keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag else path.name
    if value is None:
        raise SeriesRejected(f"{where} is missing")
    try:
        values = np.array(
            [
                float(v)
                for v in (
                    value if isinstance(value, list | pydicom.multival.MultiValue) else [value]
                )
            ]
        )
    except (TypeError, ValueError) as exc:
        raise SeriesRejected(f"{where} is not numeric: {value!r}") from exc
    if not np.isfinite(values).all():
        raise SeriesRejected(f"{where} is not a finite number: {value!r}")
    if values.size != count:
        raise SeriesRejected(f"{where} has {values.size} values, expected {count}")
    return values


def load_series(files: SeriesFiles, rules: EligibilityRules) -> CTSeries:
    """Check the series and build its volume, or raise :class:`SeriesRejected` with the reason."""
    if not files.series_instance_uid:
        first = files.datasets[0][0]
        raise SeriesRejected(
            f"{first.name}: SeriesInstanceUID (0020,000E) is empty; cannot place results"
        )
    for required in ("StudyInstanceUID", "SOPInstanceUID"):
        missing = [p.name for p, ds in files.datasets if not str(ds.get(required, "") or "")]
        if missing:
            raise SeriesRejected(f"{missing[0]}: {required} is empty in {len(missing)} file(s)")
    images = []
    modalities = {str(ds.get("Modality", "")) for _, ds in files.datasets}
    if modalities != {"CT"}:
        raise SeriesRejected(
            f"Modality (0008,0060) is {', '.join(sorted(modalities))}; expected CT"
        )
    frames: dict[int, int] = {}
    multiframe = None
    for path, ds in files.datasets:
        _check_matrix(path, ds)
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in MULTI_FRAME_CT:
            if len(files.datasets) > 1:
                raise SeriesRejected(
                    f"{path.name}: {len(files.datasets)} instances in a multi-frame CT series; "
                    "one instance holding every slice is expected"
                )
            for view_path, view, number in _frame_views(path, ds):
                frames[id(view)] = number
                images.append((view_path, view))
            multiframe = ds
            continue
        if sop_class != CTImageStorage:
            raise SeriesRejected(
                f"{path.name}: SOPClassUID {sop_class or '(empty)'} is not CT Image Storage"
            )
        if "PixelData" not in ds:
            raise SeriesRejected(f"{path.name}: PixelData (7FE0,0010) is missing")
        if is_localizer(ds.get("ImageType", [])):
            continue
        images.append((path, ds))
    if len(images) < rules.min_slices:
        raise SeriesRejected(f"{len(images)} axial images; at least {rules.min_slices} are needed")
    series = _build_volume(images, rules)
    if multiframe is None:
        return series
    del multiframe.PixelData
    numbers = tuple(frames[id(ds)] for ds in series.slices)
    return CTSeries(series.volume, series.slices, numbers, multiframe)


#: Largest Rows or Columns read (CT is 512, some scanners 1024), and largest pixel count of one
#: instance: declared dimensions are checked before any decoder allocates for them.
MAX_MATRIX = 4096
MAX_PIXELS_PER_INSTANCE = 1 << 30


def _check_matrix(path: Path, ds: Dataset) -> None:
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise SeriesRejected(f"{path.name}: Rows, Columns or NumberOfFrames unreadable") from exc
    if not (0 < rows <= MAX_MATRIX and 0 < columns <= MAX_MATRIX):
        raise SeriesRejected(
            f"{path.name}: Rows x Columns {rows} x {columns}; 1 to {MAX_MATRIX} each expected"
        )
    if not 0 < frames * rows * columns <= MAX_PIXELS_PER_INSTANCE:
        raise SeriesRejected(
            f"{path.name}: {frames} frames of {rows} x {columns} exceed "
            f"{MAX_PIXELS_PER_INSTANCE} pixels per instance"
        )


def _frame_group(ds: Dataset, index: int, name: str, where: str) -> Dataset:
    """Functional group ``name`` of one frame: its own if it has one, else the shared one."""
    for groups in (
        ds.get("PerFrameFunctionalGroupsSequence", [])[index : index + 1],
        ds.get("SharedFunctionalGroupsSequence", [])[:1],
    ):
        for group in groups:
            if name in group and group[name].value:
                return group[name].value[0]
    raise SeriesRejected(f"{where}: {name} is missing from the functional groups")


def _frame_views(path: Path, ds: Dataset) -> list[tuple[Path, Dataset, int]]:
    """One classic-CT-like dataset per frame of a multi-frame CT, named ``file#frameN``, so
    that the checks and the volume builder treat both kinds of series alike."""
    if "PixelData" not in ds:
        raise SeriesRejected(f"{path.name}: PixelData (7FE0,0010) is missing")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad or undecodable pixel data
        raise SeriesRejected(f"{path.name}: pixel data cannot be decoded: {exc}") from exc
    count = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = pixels.reshape(count, int(ds.Rows), int(ds.Columns))
    header = Dataset()
    for element in ds:
        if element.keyword not in {
            "PixelData",
            "PerFrameFunctionalGroupsSequence",
            "SharedFunctionalGroupsSequence",
            "NumberOfFrames",
        }:
            header.add(element)
    views = []
    for index in range(count):
        where = f"{path.name}#frame{index + 1}"
        view = Dataset()
        view.update(header)
        view.file_meta = FileMetaDataset()
        view.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        position = _frame_group(ds, index, "PlanePositionSequence", where)
        orientation = _frame_group(ds, index, "PlaneOrientationSequence", where)
        measures = _frame_group(ds, index, "PixelMeasuresSequence", where)
        view.ImagePositionPatient = position.get("ImagePositionPatient")
        view.ImageOrientationPatient = orientation.get("ImageOrientationPatient")
        view.PixelSpacing = measures.get("PixelSpacing")
        if "SliceThickness" in measures:
            view.SliceThickness = measures.SliceThickness
        try:
            rescale = _frame_group(ds, index, "PixelValueTransformationSequence", where)
            view.RescaleSlope = rescale.get("RescaleSlope", 1)
            view.RescaleIntercept = rescale.get("RescaleIntercept", 0)
        except SeriesRejected:  # optional: stored values are then Hounsfield units already
            pass
        view.PixelData = pixels[index].tobytes()
        views.append((path.with_name(where), view, index + 1))
    return views


def _build_volume(images: list[tuple[Path, Dataset]], rules: EligibilityRules) -> CTSeries:
    path0, ds0 = images[0]
    orientation = _float_list(ds0, "ImageOrientationPatient", 6, path0)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    tol = rules.orientation_tolerance
    if abs(abs(normal[2]) - 1.0) > tol:
        raise SeriesRejected(
            f"{path0.name}: ImageOrientationPatient (0020,0037) {orientation.round(3).tolist()} is not axial"
        )
    shape0 = (int(ds0.Rows), int(ds0.Columns))
    spacing0 = _float_list(ds0, "PixelSpacing", 2, path0)
    if (spacing0 <= 0).any():
        raise SeriesRejected(
            f"{path0.name}: PixelSpacing (0028,0030) {spacing0.tolist()} is not positive"
        )
    positions = []
    for path, ds in images:
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise SeriesRejected(
                f"{path.name}: Rows/Columns {ds.Rows}x{ds.Columns} differ from {shape0[0]}x{shape0[1]}"
            )
        if np.abs(_float_list(ds, "ImageOrientationPatient", 6, path) - orientation).max() > 1e-3:
            raise SeriesRejected(
                f"{path.name}: ImageOrientationPatient (0020,0037) differs within the series"
            )
        if np.abs(_float_list(ds, "PixelSpacing", 2, path) - spacing0).max() > 1e-3:
            raise SeriesRejected(f"{path.name}: PixelSpacing (0028,0030) differs within the series")
        positions.append(_float_list(ds, "ImagePositionPatient", 3, path))
    positions_arr = np.array(positions)
    along = positions_arr @ normal
    order = np.argsort(along)
    along = along[order]
    steps = np.diff(along)
    if np.any(steps < SAME_POSITION_MM):
        n = int(np.argmin(steps))
        raise SeriesRejected(
            f"duplicate slice position {along[n]:.2f} mm ({images[order[n]][0].name} and {images[order[n + 1]][0].name})"
        )
    step = float(median_step(along) or 0.0)
    if step > rules.max_slice_spacing_mm + 1e-6:
        raise SeriesRejected(f"slice spacing {step:.2f} mm exceeds {rules.max_slice_spacing_mm} mm")
    irregular = np.abs(steps - step) > rules.spacing_tolerance * step
    if irregular.any():
        n = int(np.argmax(irregular))
        raise SeriesRejected(
            f"irregular slice spacing: a gap of {steps[n]:.2f} mm after {along[n]:.2f} mm where {step:.2f} mm is expected"
        )
    # Gantry tilt shows as slice origins that drift in-plane along the stack.
    drift = positions_arr[order] - positions_arr[order][0] - np.outer(along - along[0], normal)
    if np.abs(drift).max() > max(1.0, tol * (along[-1] - along[0])):
        tilt = np.degrees(np.arctan2(np.abs(drift[-1]).max(), along[-1] - along[0]))
        raise SeriesRejected(
            f"gantry tilt of about {tilt:.1f} degrees (slice positions shear in-plane); not supported"
        )
    coverage = float(along[-1] - along[0] + step)
    if coverage < rules.min_coverage_mm:
        raise SeriesRejected(
            f"coverage {coverage:.0f} mm is below the {rules.min_coverage_mm:.0f} mm required"
        )
    slices: list[Dataset] = []
    arrays = []
    for n in order:
        path, ds = images[n]
        arrays.append(_hounsfield(path, ds))
        del ds.PixelData
        slices.append(ds)
    direction = np.stack([row, col, normal], axis=1)
    origin = positions_arr[order][0]
    volume = Volume(
        np.stack(arrays),
        (float(origin[0]), float(origin[1]), float(origin[2])),
        (float(spacing0[1]), float(spacing0[0]), step),
        direction,
    )
    return CTSeries(volume, slices)


def _hounsfield(path: Path, ds: Dataset) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad or undecodable pixel data
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise SeriesRejected(
            f"{path.name}: pixel data cannot be decoded (transfer syntax {syntax}): {exc}"
        ) from exc
    if pixels.shape != (int(ds.Rows), int(ds.Columns)):
        raise SeriesRejected(
            f"{path.name}: pixel data has shape {pixels.shape}, expected {ds.Rows}x{ds.Columns}"
        )
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (pixels.astype(np.float32) * slope + intercept).astype(np.float32)


def read_series(
    paths: Iterable[Path], rules: EligibilityRules | None = None
) -> tuple[list[CTSeries], dict[str, str], list[UnreadableFile]]:
    """All series under ``paths``: the eligible ones, reasons for the others, unreadable files."""
    rules = rules or EligibilityRules()
    groups, bad = scan_files(paths)
    eligible: list[CTSeries] = []
    rejected: dict[str, str] = defaultdict(str)
    for group in groups:
        key = group.series_instance_uid or f"(no SeriesInstanceUID, {group.datasets[0][0].parent})"
        try:
            eligible.append(load_series(group, rules))
        except SeriesRejected as exc:
            log.info("series %s rejected: %s", key, exc)
            rejected[key] = str(exc)
    return eligible, dict(rejected), bad


@contextmanager
def unpacked(paths: list[Path]) -> Iterator[list[Path]]:
    """Folders to read: archives are extracted to a temporary folder removed afterwards."""
    with ExitStack() as stack:
        out = []
        for path in paths:
            if path.is_file() and path.name.endswith((".tar.xz", ".tar.gz", ".tgz", ".tar")):
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lidc-")))
                with tarfile.open(path) as archive:
                    archive.extractall(folder, filter="data")
                out.append(folder)
            else:
                out.append(path)
        yield out
