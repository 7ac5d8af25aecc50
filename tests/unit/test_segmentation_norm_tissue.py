"""The slide-wide DAPI range and the tissue-only tile selection (no Cellpose)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_jobs.segmentation import normalise
from hpc_jobs.segmentation.synthetic import render_nuclei, write_as_export
from hpc_jobs.segmentation.tiling import TileGrid
from hpc_jobs.segmentation.tissue import tiles_without_tissue, tissue_geometries
from hpc_jobs.stores.base import PolygonShape, Roi


def rect(x0: float, y0: float, x1: float, y1: float, text: str) -> PolygonShape:
    return PolygonShape(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), text)


def test_tiles_whose_window_meets_no_tissue_are_skipped_holes_excluded() -> None:
    # 512 x 768 px, block 256, halo 64: windows x [0,320) [192,576) [448,768)
    grid = TileGrid(512, 768, 256, 64)
    rois = [Roi(1, (rect(20, 20, 300, 490, "tissue_left"),), "tissue_left"),
            Roi(2, (rect(600, 360, 760, 500, "tissue_right"),), "tissue_right"),
            Roi(3, (rect(590, 350, 765, 505, "hole_fold"),), "hole_fold")]
    regions = tissue_geometries(rois, 768, 512)
    # by hand: the left tissue meets the windows of columns 0 and 1 (x < 300 reaches 192);
    # the right tissue lies in a hole, so column 2 (both rows) has no tissue
    assert tiles_without_tissue(grid, regions) == {2, 5}
    # without the hole, the right tissue (y >= 360) meets the bottom-right window only (the
    # top-right window ends at y = 256 + 64)
    assert tiles_without_tissue(grid, tissue_geometries(rois[:2], 768, 512)) == {2}
    # no tissue ROI at all: nothing is skipped
    assert tissue_geometries([Roi(4, (rect(0, 0, 5, 5, "hole_x"),), "")], 768, 512) == []
    assert tiles_without_tissue(grid, []) == set()


def test_dapi_range_is_the_exact_tissue_percentile_of_log1p(tmp_path: Path) -> None:
    pixels, _ = render_nuclei((300, 400), seed=3, channels=2)
    image_zarr = tmp_path / "image.zarr"
    write_as_export(image_zarr, pixels, chunk=64, block=128)
    rois = [Roi(1, (rect(50.0, 40.0, 250.0, 200.0, "tissue_a"),), "tissue_a"),
            Roi(2, (rect(100.0, 80.0, 150.0, 120.0, "hole_b"),), "")]
    r = normalise.dapi_range(image_zarr, 0, tissue_geometries(rois, 400, 300), True)
    inside = np.zeros((300, 400), bool)
    inside[40:200, 50:250] = True
    inside[80:120, 100:150] = False  # pixel centres (c + 0.5, r + 0.5) inside the hole
    values = pixels[0][inside]
    lo, hi = np.quantile(values, [0.01, 0.99], method="inverted_cdf")
    assert (r.raw_low, r.raw_high, r.level, r.source) == (lo, hi, 0, "tissue")
    assert r.pixels == inside.sum()
    assert (r.low, r.high) == (float(np.log1p(np.float32(lo))), float(np.log1p(np.float32(hi))))
    # without tissue: the whole plane, and no transform when log_transform is off
    whole = normalise.dapi_range(image_zarr, 0, [], False)
    lo, hi = np.quantile(pixels[0], [0.01, 0.99], method="inverted_cdf")
    assert (whole.low, whole.high, whole.source) == (lo, hi, "image")
    assert whole.metadata()["dapi_norm_low"] == repr(float(lo))


def test_large_images_use_the_finest_level_under_the_pixel_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalise.choose_level([(100, 100), (50, 50)]) == 0
    monkeypatch.setattr(normalise, "MAX_PIXELS", 60 * 60)
    assert normalise.choose_level([(100, 100), (50, 50), (25, 25)]) == 1
    assert normalise.choose_level([(100, 100), (70, 70)]) == 1  # none fits: the coarsest
    pixels, _ = render_nuclei((256, 256), seed=1)
    write_as_export(tmp_path / "i.zarr", pixels, chunk=64, block=64)
    r = normalise.dapi_range(tmp_path / "i.zarr", 0, [], True)
    assert r.level == 2 and r.pixels == 64 * 64
