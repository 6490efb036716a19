"""Reading series: geometry, HU, decoding, and each eligibility rule's reason."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    EnhancedCTImageStorage,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
)

from dicom_node.pipeline.series import EligibilityRules, read_series
from tests.conftest import shared
from tests.dicom_factory import SeriesSpec, ct_datasets, multiframe_ct, phantom, write_series


def _read_one(folder: Path, rules: EligibilityRules | None = None):  # type: ignore[no-untyped-def]
    eligible, rejected, bad = read_series([folder], rules)
    return eligible, rejected, bad


def test_slices_sorted_by_position_not_instance_number_or_name(tmp_path: Path) -> None:
    spec = SeriesSpec()
    hu = phantom(spec, (-40.0, 10.0, -90.0))
    write_series(tmp_path, ct_datasets(spec, hu), shuffle_names=True)
    (series,), rejected, _ = _read_one(tmp_path)
    assert rejected == {}
    np.testing.assert_array_equal(
        series.volume.array, np.round(hu - spec.intercept) + spec.intercept
    )
    z = [float(ds.ImagePositionPatient[2]) for ds in series.slices]
    assert z == sorted(z)
    assert series.volume.spacing == pytest.approx((spec.pixel_mm, spec.pixel_mm, spec.slice_mm))


def test_world_position_of_voxel_matches_image_position(tmp_path: Path) -> None:
    spec = SeriesSpec()
    write_series(tmp_path, ct_datasets(spec, phantom(spec, None)))
    (series,), _, _ = _read_one(tmp_path)
    k = 17
    ds = series.slices[k]
    expected = (
        np.array([float(v) for v in ds.ImagePositionPatient]) + np.array([3, 5, 0]) * spec.pixel_mm
    )
    np.testing.assert_allclose(
        series.volume.index_to_world(np.array([3, 5, k])), expected, atol=1e-6
    )


def test_feet_first_series_sorted_along_normal(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, None))
    for ds in datasets:  # rows run right-to-left and columns anterior: the normal points feet-ward
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    write_series(tmp_path, datasets)
    (series,), _, _ = _read_one(tmp_path)
    along = [float(ds.ImagePositionPatient[2]) for ds in series.slices]
    assert along == sorted(along, reverse=True)


def test_rescale_slope_and_intercept_applied(tmp_path: Path) -> None:
    spec = SeriesSpec(slope=2.0, intercept=-2048.0)
    hu = phantom(spec, None)
    write_series(tmp_path, ct_datasets(spec, hu))
    (series,), _, _ = _read_one(tmp_path)
    np.testing.assert_allclose(series.volume.array, hu, atol=1.01)


def test_localizer_dropped(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, None))
    scout = copy.deepcopy(datasets[0])
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.file_meta.MediaStorageSOPInstanceUID = scout.SOPInstanceUID
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    write_series(tmp_path, [*datasets, scout])
    (series,), rejected, _ = _read_one(tmp_path)
    assert len(series.slices) == spec.slices and rejected == {}


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_decode(tmp_path: Path, syntax: str) -> None:
    spec = SeriesSpec(slices=70, rows=64, columns=64, slice_mm=1.25)
    hu = phantom(spec, None)
    datasets = ct_datasets(spec, hu)
    for ds in datasets:
        ds.compress(syntax)
    write_series(tmp_path, datasets)
    (series,), rejected, _ = _read_one(tmp_path, EligibilityRules(min_coverage_mm=80))
    assert rejected == {}
    np.testing.assert_array_equal(
        series.volume.array, np.round(hu - spec.intercept) + spec.intercept
    )


def test_jpeg_lossless_from_dcmtk_decodes(tmp_path: Path) -> None:
    """JPEG Lossless SV1, written by a real encoder (DCMTK's dcmcjpeg), as scanners send it."""
    tool = shutil.which("dcmcjpeg")
    if tool is None:
        pytest.skip("dcmcjpeg (dcmtk) is not installed; .ci/run installs it")
    spec = SeriesSpec(slices=70, rows=64, columns=64)
    hu = phantom(spec, None)
    for path in write_series(tmp_path / "raw", ct_datasets(spec, hu)):
        subprocess.run([tool, "+e1", str(path), str(tmp_path / path.name)], check=True)
    assert (
        pydicom.dcmread(next(tmp_path.glob("IM*"))).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    )
    eligible, rejected, _ = read_series([p for p in tmp_path.glob("IM*")])
    assert rejected == {}
    np.testing.assert_array_equal(
        eligible[0].volume.array, np.round(hu - spec.intercept) + spec.intercept
    )


def test_real_jpeg2000_series_decodes_and_blank_uids_give_reason() -> None:
    folder = shared("robustness/siemens-j2k-blank-uids")
    files = sorted(folder.iterdir())
    pixels = pydicom.dcmread(files[0]).pixel_array
    assert pixels.shape == (512, 512)
    eligible, rejected, bad = read_series([folder])
    assert eligible == [] and bad == []
    (reason,) = rejected.values()
    assert "SeriesInstanceUID (0020,000E) is empty" in reason


def _reason(tmp_path: Path, datasets: list, rules: EligibilityRules | None = None) -> str:  # type: ignore[type-arg]
    write_series(tmp_path, datasets)
    eligible, rejected, _ = _read_one(tmp_path, rules)
    assert eligible == []
    (reason,) = rejected.values()
    return reason


def test_non_ct_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec(modality="MR")
    assert "Modality (0008,0060) is MR; expected CT" in _reason(
        tmp_path, ct_datasets(spec, phantom(spec, None))
    )


def test_gap_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, None))
    del datasets[40:43]
    assert "irregular slice spacing" in _reason(tmp_path, datasets)


def test_duplicate_position_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, None))
    datasets[5].ImagePositionPatient = list(datasets[4].ImagePositionPatient)
    assert "duplicate slice position" in _reason(tmp_path, datasets)


def test_gantry_tilt_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, None))
    shear = np.tan(np.radians(15))
    for n, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + n * spec.slice_mm * shear, z]
    assert "gantry tilt" in _reason(tmp_path, datasets)


def test_not_axial_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, None))
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert "is not axial" in _reason(tmp_path, datasets)


def test_thick_slices_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=40, slice_mm=5.0)
    assert "slice spacing 5.00 mm exceeds 3.0 mm" in _reason(
        tmp_path, ct_datasets(spec, phantom(spec, None))
    )


def test_short_coverage_rejected_and_configurable(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=40)
    datasets = ct_datasets(spec, phantom(spec, None))
    assert "coverage 50 mm is below the 80 mm required" in _reason(tmp_path / "a", datasets)
    eligible, _, _ = _read_one(tmp_path / "a", EligibilityRules(min_coverage_mm=40))
    assert len(eligible) == 1


def test_inconsistent_rows_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, None))
    small = SeriesSpec(rows=64)
    other = ct_datasets(small, phantom(small, None))[0]
    datasets[3].Rows, datasets[3].PixelData = 64, other.PixelData
    assert "Rows/Columns 64x128 differ from 128x128" in _reason(tmp_path, datasets)


def test_truncated_pixel_data_rejected(tmp_path: Path) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, None))
    datasets[10].PixelData = datasets[10].PixelData[:1000]
    reason = _reason(tmp_path, datasets)
    assert "pixel data" in reason.lower() and "IM" in reason


def test_unreadable_file_reported_and_series_still_read(tmp_path: Path) -> None:
    spec = SeriesSpec()
    write_series(tmp_path, ct_datasets(spec, phantom(spec, None)))
    (tmp_path / "garbage.dcm").write_bytes(b"\x00" * 300)
    eligible, rejected, bad = _read_one(tmp_path)
    assert len(eligible) == 1 and rejected == {}
    assert [b.path.name for b in bad] == ["garbage.dcm"]
    assert "not a readable DICOM file" in bad[0].reason


def test_two_series_in_one_folder_read_separately(tmp_path: Path) -> None:
    spec = SeriesSpec()
    write_series(tmp_path / "a", ct_datasets(spec, phantom(spec, None)))
    mr = SeriesSpec(modality="MR")
    write_series(tmp_path / "b", ct_datasets(mr, phantom(mr, None)))
    eligible, rejected, _ = _read_one(tmp_path)
    assert len(eligible) == 1 and len(rejected) == 1


@pytest.mark.parametrize(
    "sop_class", [EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage]
)
def test_multiframe_ct_reads_as_the_same_volume_with_frame_numbers(
    tmp_path: Path, sop_class: str
) -> None:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0)))
    multiframe = multiframe_ct(datasets, sop_class)
    multiframe.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    write_series(tmp_path / "classic", datasets)
    (classic,), _, _ = read_series([tmp_path / "classic"])
    (multi,), rejected, _ = read_series([tmp_path / "mf.dcm"])
    assert rejected == {}
    np.testing.assert_array_equal(multi.volume.array, classic.volume.array)
    assert multi.volume.origin == classic.volume.origin
    assert multi.volume.spacing == classic.volume.spacing
    assert multi.frame_numbers is not None and multi.multiframe is not None
    for k, number in enumerate(multi.frame_numbers):
        frame = multi.multiframe.PerFrameFunctionalGroupsSequence[number - 1]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == [
            float(v) for v in classic.slices[k].ImagePositionPatient
        ]
    assert {str(s.SOPInstanceUID) for s in multi.slices} == {str(multiframe.SOPInstanceUID)}


def test_multiframe_ct_without_plane_positions_is_rejected_by_name(tmp_path: Path) -> None:
    spec = SeriesSpec()
    multiframe = multiframe_ct(ct_datasets(spec, phantom(spec, None)))
    del multiframe.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    multiframe.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    _, rejected, _ = read_series([tmp_path / "mf.dcm"])
    (reason,) = rejected.values()
    assert reason == "mf.dcm#frame4: PlanePositionSequence is missing from the functional groups"
