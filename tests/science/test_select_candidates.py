"""select_candidates against a hand computation on a synthetic slide (two ROIs, one hole).

The slide goes through the real landed steps (export_zarr, segment_nuclei with the
bootstrapped Cellpose model, ecdf); the expected candidates are computed here from the raw
pixels (re-rendered from the synthetic spec), the truth's tissue/hole polygons (shapely on
every pixel centre) and the nuclei table, with numpy only: nothing from the step's own code.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image

from hpc_jobs import crops, ngff
from hpc_jobs.protocol import MAX_CHUNK_BYTES
from hpc_jobs.steps import ecdf, export_zarr, segment_nuclei, select_candidates
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.base import PolygonShape
from hpc_jobs.stores.local import LocalStore
from hpc_jobs.synth import SynthSpec, generate, render_region
from tests.science.conftest import make_context

#: seed 1 at 640 x 320: two tissues side by side, one hole in tissue_1.
SPEC = SynthSpec(width=640, height=320, seed=1)
#: A hole drawn by a person over part of tissue_2 after segmentation: the nuclei under it
#: must not count (the synthetic generator puts no nucleus in its own holes).
DRAWN_HOLE = ((420.0, 70.0), (560.0, 60.0), (570.0, 170.0), (430.0, 160.0))
#: A 21 px statistics window: the synthetic positives' marker mean lies far above their
#: tissue's background there (the 101 px default dilutes it with neighbours).
WINDOW = 21


def _context(root: Path, job: str) -> StepContext:
    ctx = make_context(root, cpus=2)
    ctx.job_dir = root / "jobs" / job
    return ctx


@pytest.fixture(scope="module")
def slide(cellpose_model: Path, tmp_path_factory) -> dict[str, Any]:
    """The synthetic slide after export, segmentation and eCDF, plus the truth."""
    root = tmp_path_factory.mktemp("candidates")
    ctx = _context(root, "prep")
    with LocalStore(ctx.site.store.path) as store:
        synth = generate(SPEC, store, out_truth=root / "truth")
    image_id = synth["image_id"]
    export_zarr.run(export_zarr.Params(image_id=image_id, block_size=256), ctx)
    segment_nuclei.run(
        segment_nuclei.Params(image_id=image_id, block_size=256, window=WINDOW), ctx
    )
    with LocalStore(ctx.site.store.path) as store:
        store.add_roi(image_id, PolygonShape(DRAWN_HOLE, "hole_drawn"), name="hole_drawn")
    ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    regions = json.loads((root / "truth" / "regions.json").read_text())
    pixels, _ = render_region(SPEC, 0, SPEC.height, 0, SPEC.width)
    return {"root": root, "image_id": image_id, "regions": regions, "pixels": pixels,
            "table": pd.read_parquet(ctx.image_dir(image_id) / "nuclei.parquet"),
            "labels": np.asarray(ngff.open_level(
                ngff.image_zarr_path(ctx.image_dir(image_id)) / "labels" / "nuclei", 0)[...])}


def _polygons(regions: Any) -> tuple[dict[str, Any], Any]:
    """``({tissue name: polygon}, union of holes)`` from the truth's regions.json."""
    items = regions if isinstance(regions, list) else [
        *regions.get("tissues", []), *regions.get("holes", [])]
    tissues = {r["name"]: shapely.Polygon(r["points"]) for r in items
               if r["name"].startswith("tissue_")}
    holes = shapely.union_all([shapely.Polygon(r["points"]) for r in items
                               if r["name"].startswith("hole_")] + [shapely.Polygon(DRAWN_HOLE)])
    return tissues, holes


def _by_hand(slide: dict[str, Any], rule: str, value: float) -> tuple[set[int], dict[str, float]]:
    """Expected candidate ids and per-tissue thresholds, from pixels, polygons and the table."""
    tissues, holes = _polygons(slide["regions"])
    marker = slide["pixels"][-1]
    yy, xx = np.mgrid[0:SPEC.height, 0:SPEC.width]
    table = slide["table"]
    px, py = table.x.to_numpy() + 0.5, table.y.to_numpy() + 0.5
    ids: set[int] = set()
    thresholds = {}
    for name, poly in tissues.items():
        mask = shapely.contains_xy(poly, xx + 0.5, yy + 0.5)
        mask &= ~shapely.intersects_xy(holes, xx + 0.5, yy + 0.5)
        thr = (float(np.quantile(marker[mask], value, method="inverted_cdf"))
               if rule == "quantile" else value)
        thresholds[name] = thr
        inside = shapely.contains_xy(poly, px, py) & ~shapely.intersects_xy(holes, px, py)
        ids |= set(table.id[inside & (table.c1_mean.to_numpy() > thr)].tolist())
    return ids, thresholds


def _run(slide: dict[str, Any], job: str, **params: Any) -> tuple[dict[str, Any], list[dict]]:
    ctx = _context(slide["root"], job)
    summary = select_candidates.run(
        select_candidates.Params(image_id=slide["image_id"], **params), ctx
    )
    rows = []
    for name in summary["crops"]["chunks"]:
        path = ctx.outputs / name
        assert path.stat().st_size <= crops.CHUNK_LIMIT < MAX_CHUNK_BYTES
        chunk = json.loads(path.read_text())
        assert chunk["schema"] == crops.CHUNK_SCHEMA
        rows += chunk["candidates"]
    assert sorted(p.name for p in ctx.outputs.glob("crops.*.json")) == summary["crops"]["chunks"]
    return summary, rows


@pytest.mark.parametrize(("rule", "value"), [("quantile", 0.9), ("fixed", 1200.0)])
def test_candidates_equal_the_hand_computation(slide, rule: str, value: float) -> None:
    key = "quantile" if rule == "quantile" else "threshold"
    summary, rows = _run(slide, f"sel-{rule}", rule=rule, **{key: value})
    want, thresholds = _by_hand(slide, rule, value)
    got = {r["id"] for r in rows}
    assert got == want
    # a real selection: some nuclei in tissue are above, some below, and the hole counts
    assert 3 <= len(want) < 0.8 * len(slide["table"]), (len(want), len(slide["table"]))
    assert summary["candidates"] == len(rows) == len(got)
    assert summary["rule"] == rule and summary["rule_params"][key] == value
    assert {t["roi"]: t["threshold"] for t in summary["thresholds"]} == thresholds
    assert len(thresholds) == 2
    per_roi = {t["roi"]: t["candidates"] for t in summary["thresholds"]}
    assert sum(per_roi.values()) == len(want)


def test_nuclei_in_the_hole_or_outside_tissue_never_count(slide) -> None:
    """With a threshold below every nucleus, the candidates are exactly the nuclei in tissue."""
    summary, rows = _run(slide, "sel-all", rule="fixed", threshold=0.0)
    tissues, holes = _polygons(slide["regions"])
    table = slide["table"]
    px, py = table.x.to_numpy() + 0.5, table.y.to_numpy() + 0.5
    tissue = shapely.contains_xy(shapely.union_all(list(tissues.values())), px, py)
    in_hole = shapely.intersects_xy(holes, px, py)
    assert in_hole.sum() >= 3, "the drawn hole must cover nuclei"
    assert {r["id"] for r in rows} == set(table.id[tissue & ~in_hole].tolist())
    assert summary["nuclei"] == len(table) > summary["candidates"]


def test_a_roi_without_candidates_is_reported_with_the_fix(slide) -> None:
    """A threshold no nucleus reaches yields an empty set, and the summary says so per ROI,
    naming the params to change (a silent empty set would look like a negative slide)."""
    summary, rows = _run(slide, "sel-none", rule="fixed", threshold=1e9)
    assert rows == [] and summary["candidates"] == 0
    assert len(summary["warnings"]) == 2, summary["warnings"]
    for warning in summary["warnings"]:
        assert "no nucleus of ROI 'tissue_" in warning and "threshold" in warning
        assert "window" in warning
    some, _ = _run(slide, "sel-some", rule="fixed", threshold=0.0)
    assert some["warnings"] == []


def test_cap_samples_reproducibly(slide) -> None:
    full, full_rows = _run(slide, "cap-full", rule="fixed", threshold=0.0)
    a, rows_a = _run(slide, "cap-a", rule="fixed", threshold=0.0, max_candidates=7, seed=3)
    b, rows_b = _run(slide, "cap-b", rule="fixed", threshold=0.0, max_candidates=7, seed=3)
    c, rows_c = _run(slide, "cap-c", rule="fixed", threshold=0.0, max_candidates=7, seed=4)
    ids = [[r["id"] for r in rows] for rows in (rows_a, rows_b, rows_c)]
    assert len(ids[0]) == 7 and ids[0] == ids[1] and set(ids[0]) != set(ids[2])
    assert set(ids[0]) <= {r["id"] for r in full_rows}
    assert a["eligible"] == full["candidates"] > 7 and a["candidates"] == 7


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_crops_show_the_window_in_the_tissue_display_range_with_the_outline(slide) -> None:
    summary, rows = _run(slide, "sel-crops", rule="fixed", threshold=0.0, crop_size=32,
                         display_low=0.01, display_high=0.995)
    tissues, holes = _polygons(slide["regions"])
    yy, xx = np.mgrid[0:SPEC.height, 0:SPEC.width]
    pixels, labels = slide["pixels"], slide["labels"]
    assert summary["crops"]["zooms"] == [1, 2] and len(summary["crops"]["chunks"]) >= 1
    checked = 0
    for row in rows:
        cy, cx = int(round(row["y"])), int(round(row["x"]))
        if not (32 <= cy < SPEC.height - 32 and 32 <= cx < SPEC.width - 32):
            continue  # the hand computation below takes windows inside the image
        poly = tissues[row["roi"]]
        mask = shapely.contains_xy(poly, xx + 0.5, yy + 0.5)
        mask &= ~shapely.intersects_xy(holes, xx + 0.5, yy + 0.5)
        for zoom in (1, 2):
            half = 16 * zoom
            win = pixels[:, cy - half:cy + half, cx - half:cx + half].astype(np.float64)
            win = win.reshape(len(pixels), 32, zoom, 32, zoom).mean(axis=(2, 4))
            got = row["crops"][str(zoom)]
            for c in range(len(pixels)):
                lo = np.quantile(pixels[c][mask], 0.01, method="inverted_cdf")
                hi = np.quantile(pixels[c][mask], 0.995, method="inverted_cdf")
                want = np.clip(np.rint((win[c] - lo) * 255.0 / (hi - lo)), 0, 255)
                kind = ("dapi", "marker")[c]
                assert np.array_equal(_png(got[kind]), want.astype(np.uint8)), (row["id"], c)
            rgb = _png(got["composite"])
            assert rgb.shape == (32, 32, 3)
            lab = labels[cy - half:cy + half:zoom, cx - half:cx + half:zoom] == row["id"]
            edge = lab & ~(np.pad(lab, 1)[:-2, 1:-1] & np.pad(lab, 1)[2:, 1:-1]
                           & np.pad(lab, 1)[1:-1, :-2] & np.pad(lab, 1)[1:-1, 2:])
            assert edge.sum() >= 8
            assert (rgb[edge] == (255, 255, 0)).all()
            assert np.array_equal(rgb[~edge][:, 1], _png(got["marker"])[~edge])  # marker: green
            assert np.array_equal(rgb[~edge][:, 2], _png(got["dapi"])[~edge])  # DAPI: blue
        checked += 1
    assert checked >= 5


def test_missing_outputs_name_the_step_to_run(tmp_path: Path) -> None:
    ctx = _context(tmp_path, "missing")
    with LocalStore(ctx.site.store.path) as store:
        image_id = generate(SynthSpec(width=128, height=128, seed=2), store,
                            out_truth=tmp_path / "truth")["image_id"]
    export_zarr.run(export_zarr.Params(image_id=image_id, block_size=128), ctx)
    with pytest.raises(FileNotFoundError, match="run segment_nuclei for image"):
        select_candidates.run(select_candidates.Params(image_id=image_id), ctx)
    with pytest.raises(Exception, match="marker_channel=7 is out of range"):
        select_candidates.run(select_candidates.Params(image_id=image_id, marker_channel=7), ctx)
