"""Real nodules read from a folder like lidc-nodules, and pasted into other lungs with their
mask exactly where their voxels went."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from inference.lab.nodule_folder import (
    NoduleFolderError,
    NoduleSplit,
    read_nodule_folder,
)
from inference.lab.transplant import (
    FEATHER_MM,
    Placement,
    paste_nodule,
    placement_showing,
    voi_mask_patch,
    voi_patch,
)
from tests.conftest import shared

HOST_HU = -850.0


def small_folder(tmp_path: Path, rows: int = 3, columns: tuple[str, ...] | None = None) -> Path:
    """The first ``rows`` nodules of the shared folder, with only ``columns`` (all if None)."""
    source = shared("lidc-nodules")
    lines = (source / "metadata.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = list(range(len(header))) if columns is None else [header.index(c) for c in columns]
    folder = tmp_path / "nodules"
    for sub in ("image", "nodule_mask"):
        (folder / sub).mkdir(parents=True)
    out = [",".join(header[i] for i in keep)]
    for line in lines[1 : rows + 1]:
        values = line.split(",")
        for name in ("image_file", "mask_file"):
            relative = values[header.index(name)]
            shutil.copy(source / relative, folder / relative)
        out.append(",".join(values[i] for i in keep))
    (folder / "metadata.csv").write_text("\n".join(out) + "\n")
    return folder


def test_a_folder_reads_with_ratings_and_without(tmp_path: Path) -> None:
    rated = read_nodule_folder(small_folder(tmp_path / "a"))
    bare = read_nodule_folder(
        small_folder(tmp_path / "b", columns=("patient_id", "nodule_id", "image_file", "mask_file"))
    )
    assert (
        [n.key for n in rated]
        == [n.key for n in bare]
        == ["LIDC-IDRI-0005/1", "LIDC-IDRI-0005/2", "LIDC-IDRI-0008/1"]
    )
    first = rated[0]
    assert (first.ratings.malignancy, first.ratings.texture, first.ratings.calcified) == (
        3,
        5,
        False,
    )
    assert first.ratings.composition == "solid" and first.ratings.malignant is None
    assert bare[0].ratings.malignancy is None and bare[0].ratings.composition is None
    # The centroid is where the metadata says the nodule is (LPS mm).
    assert np.allclose(first.centre_mm, (-79.19, 93.97, -146.31), atol=1.0)


def test_a_folder_without_a_required_column_names_it(tmp_path: Path) -> None:
    folder = small_folder(tmp_path, columns=("patient_id", "image_file", "mask_file"))
    with pytest.raises(NoduleFolderError, match="missing column\\(s\\) nodule_id"):
        read_nodule_folder(folder)


def test_the_split_is_by_patient_and_the_same_in_any_order() -> None:
    patients = [f"P{n:03d}" for n in range(400)]
    split = NoduleSplit(seed=11)
    parts = {p: split.part(p) for p in patients}
    again = {p: NoduleSplit(seed=11).part(p) for p in reversed(patients)}
    other = {p: NoduleSplit(seed=12).part(p) for p in patients}
    assert parts == again and parts != other
    counts = {part: sum(v == part for v in parts.values()) for part in set(parts.values())}
    assert 60 <= counts["validation"] <= 100 and 25 <= counts["calibration"] <= 55


@pytest.fixture(scope="module")
def largest(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    nodules = read_nodule_folder(small_folder(tmp_path_factory.mktemp("n"), rows=12))
    return max(nodules, key=lambda n: int(n.mask.sum()))


def test_a_pasted_nodule_keeps_its_volume_and_its_mask_holds_its_voxels(largest) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    spacing = np.array([1.25, 1.25, 1.25])
    host = np.full((72, 72, 72), HOST_HU, dtype=np.float32)
    placement = Placement(np.array([30.0, 40.0, 36.0]), angle_rad=0.7, flips=(True, False, True))
    mask = paste_nodule(host, spacing, largest, placement, rng)
    voi_volume = largest.mask.sum() * np.prod(largest.image.spacing)
    # Within what resampling a mask of 2.5 mm slices onto 1.25 mm voxels allows.
    assert abs(mask.sum() * spacing.prod() - voi_volume) / voi_volume < 0.15
    assert np.allclose(np.argwhere(mask).mean(axis=0), placement.centre_kji, atol=0.6)
    # Inside the mask the voxels are the nodule's (solid: well above lung); outside the mask
    # only the feathered rim changed.
    assert np.median(host[mask]) > -300
    rim = ndimage.binary_dilation(mask, iterations=int(np.ceil(FEATHER_MM / 1.25)) + 1)
    assert not np.any((host != HOST_HU) & ~rim)


def test_a_voi_patch_and_its_mask_patch_agree_under_any_placement(largest) -> None:  # type: ignore[no-untyped-def]
    size = 32
    for angle, flips in ((0.0, (False, False, False)), (2.1, (True, True, False))):
        placement = Placement(np.full(3, size / 2 - 0.5), angle, flips)
        cube = voi_patch(largest, 1.25, size, placement)
        mask = voi_mask_patch(largest, 1.25, size, placement)
        assert np.allclose(np.argwhere(mask).mean(axis=0), size / 2 - 0.5, atol=0.6)
        assert cube[mask].mean() > cube[~mask].mean() + 300


def test_a_placement_showing_a_voi_voxel_puts_it_at_that_patch_voxel(largest) -> None:  # type: ignore[no-untyped-def]
    """A view centred elsewhere than on the nodule: a marked spot of the VOI, away from the
    nodule, lands where it is asked to, under any turn and flips."""
    voi = copy.deepcopy(largest)
    spacing = np.asarray(voi.image.spacing[::-1])
    spot = np.array(voi.mask.shape) // 2
    spot[1:] = (2, 2)  # a corner of the middle slice
    assert not voi.mask[tuple(spot)]
    near = np.linalg.norm((np.indices(voi.mask.shape).T - spot) * spacing, axis=-1).T <= 1.5
    voi.image.array[...] = -800
    voi.image.array[near] = 300
    at = np.array([14.5, 17.5, 12.5])
    for seed in range(4):
        placement = placement_showing(voi, spot, at, 1.25, np.random.default_rng(seed))
        cube = voi_patch(voi, 1.25, 32, placement)
        assert np.allclose(np.argwhere(cube > -250).mean(axis=0), at, atol=0.75)


@pytest.mark.parametrize("rated", [True, False])
def test_evaluate_nodules_writes_predictions_and_a_report_only_with_ratings(
    tmp_path: Path, rated: bool
) -> None:
    from dicom_node.cli import EXIT_OK, main

    required = ("patient_id", "nodule_id", "image_file", "mask_file")
    folder = small_folder(tmp_path, rows=6, columns=None if rated else required)
    out = tmp_path / "out"
    assert (
        main(["evaluate", "--nodules", str(folder), "--out", str(out), "--device", "cpu"])
        == EXIT_OK
    )
    rows = (out / "nodule_predictions.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == [
        "patient_id",
        "nodule_id",
        "malignancy_probability",
        "composition",
    ]
    assert [r.split(",")[:2] for r in rows[1:3]] == [
        ["LIDC-IDRI-0005", "1"],
        ["LIDC-IDRI-0005", "2"],
    ]
    assert len(rows) == 7
    for row in rows[1:]:
        values = dict(zip(rows[0].split(","), row.split(","), strict=True))
        assert 0.0 <= float(values["malignancy_probability"]) <= 1.0
        assert values["composition"] in ("solid", "part-solid", "ground-glass")
        assert 2.0 < float(values["diameter_mm"]) < 40.0
    assert (out / "nodule_report.md").exists() == rated
    if rated:
        report = (out / "nodule_report.md").read_text()
        assert "malignancy AUC (rating >= 4 against <= 2)" in report
        assert (out / "roc.png").stat().st_size > 1000
