"""The GPU (torch) filters compute what the CPU (scipy) ones do: same candidates either way.

The torch versions run here on the CPU; on a GPU they run the same code on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import inference.candidates
import inference.filters
from inference.candidates import find_candidates
from inference.detector import prepare
from inference.filters import _edt_closing, _gaussian, _maximum, _upload, torch_ball_closing
from inference.lab.synthesis import NoduleSpec
from inference.network import NetworkConfig
from tests.test_pipeline import _phantom_with_nodule

CPU = torch.device("cpu")


@pytest.mark.parametrize("sigma", [(1.0, 2.0, 0.7), (5.0, 5.0, 5.0), (12.0, 3.0, 20.0)])
def test_gaussian_matches_scipy_including_its_mirrored_border(sigma: tuple[float, ...]) -> None:
    array = np.random.default_rng(0).normal(size=(40, 50, 30)).astype(np.float32)
    expected = ndimage.gaussian_filter(array, sigma, truncate=3.0)
    got = _gaussian(_upload(array, CPU), sigma)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("size", [(3, 3, 3), (5, 7, 3), (11, 11, 11)])
def test_maximum_matches_scipy_exactly(size: tuple[int, int, int]) -> None:
    array = np.random.default_rng(1).normal(size=(40, 50, 30)).astype(np.float32)
    expected = ndimage.maximum_filter(array, size=size)
    np.testing.assert_array_equal(_maximum(_upload(array, CPU), size)[0, 0].numpy(), expected)


@pytest.mark.parametrize(
    ("spacing", "radius"), [((2.5, 2.5, 2.5), 20.0), ((2.0, 1.5, 1.5), 6.0), ((2.5, 2.5, 2.5), 7.4)]
)
def test_ball_closing_matches_the_distance_transform_version(
    spacing: tuple[float, float, float], radius: float
) -> None:
    k, j, i = np.mgrid[:60, :70, :64]

    def ball(centre: tuple[int, int, int], r: int) -> np.ndarray:
        return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= r * r

    mask = (ball((30, 20, 32), 14) | ball((30, 48, 32), 14)) & ~ball((30, 34, 46), 6)
    mask ^= np.random.default_rng(1).random(mask.shape) > 0.995
    closed = _edt_closing(mask, spacing, radius)
    assert closed.sum() > mask.sum()  # the closing does close something here
    np.testing.assert_array_equal(torch_ball_closing(mask, spacing, radius, CPU), closed)


def test_detector_stages_give_the_same_lungs_and_candidates_on_the_torch_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = NoduleSpec(10.0, "solid", "round", 0.4, 40.0, -550.0, seed=3)
    volume, _, _ = _phantom_with_nodule(spec)
    work, lungs = prepare(volume, NetworkConfig(spacing_mm=1.25))
    expected = find_candidates(work, lungs)
    for module in (inference.filters, inference.candidates):
        monkeypatch.setattr(module, "on_gpu", lambda device: device is not None)
    torch_work, torch_lungs = prepare(volume, NetworkConfig(spacing_mm=1.25), device=CPU)
    np.testing.assert_array_equal(torch_lungs, lungs)
    got = find_candidates(torch_work, torch_lungs, device=CPU)
    # The phantom is mirror-symmetric, so some responses tie exactly; rounding in the last bit
    # then picks the other of two equal peaks. Everything else is the same.
    common = {(c.kji, c.radius_mm) for c in got} & {(c.kji, c.radius_mm) for c in expected}
    assert len(common) >= 0.95 * max(len(got), len(expected))
    responses = {(c.kji, c.radius_mm): c.response for c in expected}
    for c in got:
        if (c.kji, c.radius_mm) in common:
            assert c.response == pytest.approx(responses[(c.kji, c.radius_mm)], rel=1e-3)
    nodule = max(expected, key=lambda c: c.response)
    assert (nodule.kji, nodule.radius_mm) in common
