"""Tissue-only segmentation: tiles whose window holds no tissue are not segmented.

A 512 x 768 synthetic slide, blocks of 256 px (2 x 3 tiles, halo 64): tissue covers the left
part; a second tissue ROI on the right lies entirely in a hole. By hand, the right column's
windows (x >= 448) meet no tissue: 2 of 6 tiles are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpc_jobs import ngff
from hpc_jobs.segmentation.synthetic import render_nuclei, write_as_export
from hpc_jobs.steps import segment_nuclei
from hpc_jobs.stores.base import NewRoi, PolygonShape
from tests.science.conftest import make_context

pytestmark = pytest.mark.slow
TISSUE = (20.0, 20.0, 300.0, 490.0)  # x0, y0, x1, y1


def rect(x0: float, y0: float, x1: float, y1: float, text: str) -> PolygonShape:
    return PolygonShape(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), text)


def test_tiles_without_tissue_are_skipped_and_no_tissue_nucleus_is_lost(
        cellpose_model: Path, tmp_path: Path) -> None:
    pixels, _ = render_nuclei((512, 768), seed=11, channels=2)
    ctx = make_context(tmp_path)
    with ctx.open_store() as store:
        image_id = store.add_image("slide", pixels, ["DAPI", "marker"])
        store.add_rois(image_id, [NewRoi((rect(*TISSUE, "tissue_left"),), "tissue_left"),
                                  NewRoi((rect(600, 360, 760, 500, "tissue_right"),), ""),
                                  NewRoi((rect(590, 350, 765, 505, "hole_fold"),), "")])
    image_dir = ctx.image_dir(image_id)
    write_as_export(ngff.image_zarr_path(image_dir), pixels, chunk=128, block=256,
                    image_id=image_id)

    def run(tissue_only: bool) -> tuple[dict, pd.DataFrame]:
        params = segment_nuclei.Params(image_id=image_id, block_size=256, halo=64,
                                       tissue_only=tissue_only)
        summary = segment_nuclei.run(params, ctx)
        return summary, pd.read_parquet(image_dir / "nuclei.parquet")

    only, t_only = run(True)
    print(f"tissue only: {only['tiles']} tiles segmented, {only['tiles_no_tissue']} skipped, "
          f"{only['seconds']:.1f}s")
    assert (only["tiles"], only["tiles_no_tissue"], only["tiles_total"]) == (4, 2, 6)
    assert set(t_only["tile_x"]) <= {0, 1}
    full, t_full = run(False)  # reuses the 4 tiles, segments the other 2
    assert (full["tiles"], full["tiles_no_tissue"], full["tiles_skipped"]) == (6, 0, 4)
    x0, y0, x1, y1 = TISSUE
    in_tissue = t_full[t_full.x.between(x0, x1) & t_full.y.between(y0, y1)]
    assert len(in_tissue) > 100
    found = t_only.set_index(["x", "y"]).index
    lost = [(r.x, r.y) for r in in_tissue.itertuples() if (r.x, r.y) not in found]
    print(f"nuclei in tissue: {len(in_tissue)} (full run), lost by tissue-only: {len(lost)}; "
          f"all nuclei: {len(t_full)} full, {len(t_only)} tissue-only")
    assert not lost
    assert len(t_only) < len(t_full)
    assert np.isfinite(t_only["c0_mean"]).all()
