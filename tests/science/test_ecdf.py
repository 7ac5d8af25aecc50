"""ecdf: exact histograms per tissue ROI (holes subtracted) against an independent brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import Polygon, box

from hpc_jobs import ecdf_core, ngff
from hpc_jobs.steps import ecdf, export_zarr
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.base import EllipseShape, NewRoi, PointShape, PolygonShape, StoreError
from hpc_jobs.stores.local import LocalStore
from tests.science.conftest import make_context

H, W = 200, 310  # rows, columns: non-square, not a multiple of the block
BLOCK, CHUNK = 64, 32


def make_ctx(tmp_path: Path, cpus: int = 2) -> StepContext:
    """A StepContext on a local site under ``tmp_path`` (2 CPUs: the block-parallel path)."""
    return make_context(tmp_path, cpus=cpus)


def poly(points, text: str) -> PolygonShape:
    return PolygonShape(tuple((float(x), float(y)) for x, y in points), text)


def add_exported_image(ctx: StepContext, pixels: np.ndarray, rois: list[NewRoi]) -> int:
    """Put an image + people-drawn ROIs in the store and export it with 64-px blocks."""
    with LocalStore(ctx.site.store.path) as store:
        image_id = store.add_image("img", pixels, [f"ch{i}" for i in range(pixels.shape[0])])
        if rois:
            store.add_rois(image_id, rois)
    export_zarr.run(
        export_zarr.Params(image_id=image_id, block_size=BLOCK, chunk_size=CHUNK), ctx
    )
    return image_id


def brute_force(pixels: np.ndarray, tissue, holes=None) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: shapely predicates on every pixel centre of the whole image.

    In the region iff the centre is inside the tissue and not in (or on the edge of) a hole.
    """
    yy, xx = np.mgrid[0 : pixels.shape[1], 0 : pixels.shape[2]]
    mask = shapely.contains_xy(tissue, xx + 0.5, yy + 0.5)
    if holes is not None:
        mask &= ~shapely.intersects_xy(holes, xx + 0.5, yy + 0.5)
    hists = np.stack([np.bincount(pixels[c][mask], minlength=65536) for c in range(len(pixels))])
    return hists, mask


def dense_hists(image_dir: Path, roi: str, n_channels: int) -> np.ndarray:
    df = pd.read_parquet(image_dir / "ecdf" / "histograms.parquet")
    out = np.zeros((n_channels, 65536), dtype=np.int64)
    sub = df[df.roi == roi]
    assert (sub["count"] > 0).all()  # sparse: only non-zero bins are stored
    out[sub.channel.to_numpy(), sub.value.to_numpy()] = sub["count"].to_numpy()
    return out


def summary_of(image_dir: Path) -> dict:
    return json.loads((image_dir / "ecdf" / "summary.json").read_text())


@pytest.fixture
def ctx(tmp_path: Path) -> StepContext:
    return make_ctx(tmp_path)


@pytest.fixture
def pixels() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 65536, size=(2, H, W), dtype=np.uint16)


TISSUE = [(20.3, 15.7), (290.6, 30.2), (250.1, 185.9), (120.4, 140.2), (30.8, 170.5)]
HOLE = [(130.2, 60.6), (200.7, 70.1), (170.4, 120.9)]


def test_histograms_equal_brute_force_with_hole_across_blocks(ctx, pixels):
    image_id = add_exported_image(
        ctx, pixels, [NewRoi((poly(TISSUE, "tissue_A"),)), NewRoi((poly(HOLE, "hole_1"),))]
    )
    summary = ecdf.run(ecdf.Params(image_id=image_id), ctx)
    image_dir = ctx.image_dir(image_id)
    want, mask = brute_force(pixels, Polygon(TISSUE), Polygon(HOLE))
    got = dense_hists(image_dir, "tissue_A", 2)
    assert np.array_equal(got, want)  # exact, every bin
    assert summary["rois"][0]["pixels"] == int(mask.sum()) > 20000
    assert summary["blocks_read"] < len(ngff.blocks((H, W), BLOCK))  # only blocks in the bbox
    # quantiles, mean, eCDF from the histogram == numpy on the raw pixel values
    rec = summary_of(image_dir)["rois"][0]
    assert rec["n_holes"] == 1
    for c in range(2):
        values = pixels[c][mask]
        ch = rec["channels"][c]
        assert ch["pixels"] == values.size
        assert ch["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert (ch["min"], ch["max"]) == (int(values.min()), int(values.max()))
        for q in ecdf_core.QUANTILES:
            assert ch["quantiles"][f"{q:g}"] == int(
                np.quantile(values, q, method="inverted_cdf")
            ), q
    table = pd.read_parquet(image_dir / "ecdf" / "ecdf.parquet")
    t0 = table[(table.roi == "tissue_A") & (table.channel == 0)]
    v = np.sort(pixels[0][mask])
    probe = t0.value.to_numpy()[:: max(1, len(t0) // 50)]
    assert np.allclose(
        t0.set_index("value").loc[probe, "ecdf"].to_numpy(),
        np.searchsorted(v, probe, side="right") / v.size,
    )
    q = pd.read_parquet(image_dir / "ecdf" / "quantiles.parquet")
    assert list(q["q0.5"]) == [rec["channels"][c]["quantiles"]["0.5"] for c in range(2)]


def test_orientation_rows_are_y_and_columns_are_x(ctx):
    # channel 0 = row index, channel 1 = column index: the histograms give the mask's rows
    # and columns back, so a transposed or scrambled mask cannot pass
    rows, cols = np.mgrid[0:H, 0:W].astype(np.uint16)
    img = np.stack([rows, cols])
    triangle = [(10, 5), (300, 5), (10, 190)]  # wide along x at the top, narrowing downwards
    top_right = [(160, 2), (305, 2), (305, 95), (160, 95)]  # x > W/2, y < H/2
    image_id = add_exported_image(
        ctx, img, [NewRoi((poly(triangle, "tissue_tri"),)), NewRoi((poly(top_right, "tissue_tr"),))]
    )
    ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    image_dir = ctx.image_dir(image_id)
    tri = dense_hists(image_dir, "tissue_tri", 2)
    yy, xx = np.mgrid[0:H, 0:W]
    inside = (xx + 0.5 > 10) & (yy + 0.5 > 5) & (
        (xx + 0.5 - 10) / 290 + (yy + 0.5 - 5) / 185 < 1
    )  # the triangle's interior, analytically
    assert np.array_equal(tri[0][:H], inside.sum(axis=1))  # pixels per row
    assert np.array_equal(tri[1][:W], inside.sum(axis=0))  # pixels per column
    assert tri[0][4] == 0 and tri[0][5] > 280 and tri[0][180] < 20  # wide top, narrow bottom
    tr = dense_hists(image_dir, "tissue_tr", 2)
    assert set(np.flatnonzero(tr[0])) == set(range(2, 95))  # rows 2..94 only
    assert set(np.flatnonzero(tr[1])) == set(range(160, 305))  # columns 160..304 only
    assert tr[0].sum() == 93 * 145


def test_two_halves_with_different_intensities(ctx):
    # top half dark, bottom half bright on a wide image; an L-shape that lies mostly in the
    # bottom-left: a transposed mask would sample the wrong half
    img = np.full((2, H, W), 100, dtype=np.uint16)
    img[:, H // 2 :, :] = 60000
    ell = [(0, 120), (40, 120), (40, 160), (200, 160), (200, 200), (0, 200)]
    image_id = add_exported_image(ctx, img, [NewRoi((poly(ell, "tissue_L"),))])
    ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    hist = dense_hists(ctx.image_dir(image_id), "tissue_L", 2)[0]
    assert np.flatnonzero(hist).tolist() == [60000]
    assert hist[60000] == 40 * 40 + 200 * 40


def test_multipolygon_roi_edge_clipping_and_shared_hole(ctx, pixels):
    left = [(5, 5), (70, 8), (60, 90), (3, 80)]
    right = [(220, 100), (330, 90), (340, 230), (200, 215)]  # partly outside (x > W, y > H)
    outside_left = [(-40, 120), (50, 110), (45, 260), (-30, 250)]  # partly outside x<0, y>H
    hole = [(40, 40), (240, 140), (230, 160), (30, 60)]  # meets both ROIs
    rois = [
        NewRoi((poly(left, "tissue_multi"), poly(right, "tissue_multi"), PointShape(9, 9, "x")),
               name="tissue_multi"),
        NewRoi((poly(outside_left, "tissue_edge"), poly(hole, "hole_shared"))),
        NewRoi((poly([(0, 0), (5, 0), (5, 5)], "annotation"),)),  # neither tissue nor hole
    ]
    image_id = add_exported_image(ctx, pixels, rois)
    summary = ecdf.run(ecdf.Params(image_id=image_id), ctx)
    image_dir = ctx.image_dir(image_id)
    assert [r["roi"] for r in summary["rois"]] == ["tissue_multi", "tissue_edge"]
    multi = shapely.union_all([Polygon(left), Polygon(right)])
    for name, tissue in [("tissue_multi", multi), ("tissue_edge", Polygon(outside_left))]:
        want, _ = brute_force(pixels, tissue, Polygon(hole))
        assert np.array_equal(dense_hists(image_dir, name, 2), want), name
    recs = {r["roi"]: r for r in summary_of(image_dir)["rois"]}
    assert recs["tissue_multi"]["n_shapes"] == 2 and recs["tissue_multi"]["n_holes"] == 1
    assert any("outside the image" in n for n in recs["tissue_edge"]["notes"])
    # the clipped part really was outside: the unclipped polygon's area is larger
    assert recs["tissue_edge"]["channels"][0]["pixels"] < Polygon(outside_left).area
    # attached to the image, with a map annotation of the main numbers
    with LocalStore(ctx.site.store.path) as store:
        names = sorted(a.name for a in store.list_attachments(image_id, ecdf.NAMESPACE))
        assert names == ["ecdf.parquet", "histograms.parquet", "quantiles.parquet", "summary.json"]
        (ann,) = store.get_map_annotations(image_id, ecdf.NAMESPACE)
        med = recs["tissue_multi"]["channels"][1]["quantiles"]["0.5"]
        assert ann.values["tissue_multi/ch1/p50"] == str(med)
        assert ann.values["tissue_edge/ch0/pixels"] == str(
            recs["tissue_edge"]["channels"][0]["pixels"]
        )
    # a rerun replaces, it does not pile up
    ecdf.run(ecdf.Params(image_id=image_id, channels=[1]), ctx)
    with LocalStore(ctx.site.store.path) as store:
        assert len(store.list_attachments(image_id, ecdf.NAMESPACE)) == 4
        assert len(store.get_map_annotations(image_id, ecdf.NAMESPACE)) == 1
    df = pd.read_parquet(image_dir / "ecdf" / "histograms.parquet")
    assert set(df.channel) == {1}


def test_pyramid_level_uses_scaled_regions(ctx, pixels):
    image_id = add_exported_image(
        ctx, pixels, [NewRoi((poly(TISSUE, "tissue_A"), poly(HOLE, "hole_in_same_roi")))]
    )
    ecdf.run(ecdf.Params(image_id=image_id, level=1, attach=False), ctx)
    level1 = np.asarray(ngff.open_level(ctx.image_dir(image_id) / "image.zarr", 1)[:])
    half = [[(x / 2, y / 2) for x, y in pts] for pts in (TISSUE, HOLE)]
    want, _ = brute_force(level1, Polygon(half[0]), Polygon(half[1]))
    assert np.array_equal(dense_hists(ctx.image_dir(image_id), "tissue_A", 2), want)


def test_errors_name_the_fix(ctx, pixels):
    with LocalStore(ctx.site.store.path) as store:
        no_zarr = store.add_image("raw", pixels[:, :50, :60], ["a", "b"])
        store.add_roi(no_zarr, poly([(1, 1), (20, 1), (20, 20)], "tissue_1"))
    with pytest.raises(ngff.ZarrLayoutError, match="run export_zarr"):
        ecdf.run(ecdf.Params(image_id=no_zarr), ctx)
    image_id = add_exported_image(ctx, pixels, [NewRoi((poly(HOLE, "hole_only"),))])
    with pytest.raises(ecdf_core.RegionError, match="text starts with 'tissue_'"):
        ecdf.run(ecdf.Params(image_id=image_id), ctx)
    with pytest.raises(StoreError, match=r"channel=2 is out of range \(use 0..1\)"):
        ecdf.run(ecdf.Params(image_id=no_zarr, channels=[0, 2]), ctx)
    with pytest.raises(ValueError, match="16-bit"):
        ecdf_core.histogram_bins("float32")


def test_rasterize_equals_contains_xy_on_random_polygons():
    """Self-intersecting, integer, half-integer (vertices on pixel centres) and float vertices."""
    rng = np.random.default_rng(3)
    h, w = 70, 90
    yy, xx = np.mgrid[0:h, 0:w]
    for trial in range(150):
        pts = rng.integers(-15, 100, size=(int(rng.integers(3, 10)), 2)).astype(float)
        pts += [0.0, rng.random(), 0.5 * rng.integers(0, 2)][trial % 3]
        geom = ecdf_core.shape_geometry(PolygonShape(tuple(map(tuple, pts)), "tissue_r"))
        for closed, predicate in [(False, shapely.contains_xy), (True, shapely.intersects_xy)]:
            want = predicate(geom, xx + 0.5, yy + 0.5)
            got = np.zeros_like(want)
            for y0, y1, x0, x1 in ngff.blocks((h, w), 32):
                got[y0:y1, x0:x1] = ecdf_core.rasterize(geom, y0, y1, x0, x1, closed=closed)
            assert np.array_equal(got, want), (trial, closed, geom.wkt)


def test_ellipse_and_region_building():
    rois_in = [
        ecdf_core.Roi(1, (EllipseShape(50, 40, 30, 10, "tissue_e"),)),
        ecdf_core.Roi(2, (poly([(0, 0), (10, 0), (10, 10), (0, 10)], "hole_x"),)),
    ]
    (region,) = ecdf_core.tissue_regions(rois_in, 100, 100)
    assert region.name == "tissue_e" and region.n_holes == 0
    assert region.geometry.area == pytest.approx(np.pi * 30 * 10, rel=1e-3)
    assert region.geometry.within(box(0, 0, 100, 100)) and not region.notes


def test_quantile_definition_is_inverted_cdf():
    hist = np.zeros(10, dtype=np.int64)
    hist[[2, 5, 7]] = [1, 2, 1]  # values 2, 5, 5, 7
    assert ecdf_core.quantile_from_hist(hist, 0.25) == 2  # F(2) = 0.25 >= 0.25
    assert ecdf_core.quantile_from_hist(hist, 0.26) == 5
    assert ecdf_core.quantile_from_hist(hist, 0.75) == 5
    assert ecdf_core.quantile_from_hist(hist, 0.99) == 7
    assert ecdf_core.quantile_from_hist(np.zeros(4, dtype=np.int64), 0.5) is None
