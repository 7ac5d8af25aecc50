"""The streaming merge and the label pyramid, on tile results cut from known labels.

No Cellpose: every tile "segments" by cropping a ground-truth label image to its window, then
goes through the real ``extract_nuclei`` and result files, and the real ``merge`` writes the
labels and the table. The painted level 0 must equal the ground truth (relabelled), every
lower level its nearest-neighbour downsample, and the group must validate as NGFF 0.5 labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from hpc_jobs import ngff
from hpc_jobs.segmentation import merge as merge_mod
from hpc_jobs.segmentation import tile_result
from hpc_jobs.segmentation.run_tiles import TileJob, extract_nuclei
from hpc_jobs.segmentation.synthetic import render_nuclei, write_as_export

SHAPE = (600, 900)  # not a multiple of the block: clipped edge tiles and levels


def write_tiles(job: TileJob, truth: np.ndarray, skip: set[int] = frozenset()) -> None:
    """One result file per tile, as ``process_tile`` writes it, from ``truth`` cropped."""
    for t in job.grid.tiles():
        if t.index in skip:
            continue
        wy0, wx0, wy1, wx1 = t.window
        rec, _ = extract_nuclei(truth[wy0:wy1, wx0:wx1], t, SHAPE, job.claim_margin)
        stats = np.zeros((len(rec["local"]), job.shape[0], 4))
        stats[:, 0, 0] = rec["cy"]  # something per nucleus to find again in the table
        res = tile_result.TileResult(tile=t.index, ty=t.ty, tx=t.tx,
                                     config_key=job.config_key(), stats=stats, info={}, **rec)
        tile_result.save(res, tile_result.tile_path(Path(job.tiles_dir), t.ty, t.tx))


@pytest.fixture()
def merged(tmp_path: Path) -> tuple[np.ndarray, Path, dict, TileJob]:
    pixels, truth = render_nuclei(SHAPE, seed=5, channels=2)
    image_zarr = tmp_path / "image.zarr"
    write_as_export(image_zarr, pixels, chunk=64, block=128)  # 5 levels: 900 px .. 57 px
    job = TileJob(array_path=str(image_zarr / "0"), tiles_dir=str(tmp_path / "tiles"),
                  model_path="m", model_sha256="0" * 64, shape=(2, *SHAPE), block=256,
                  halo=64)
    write_tiles(job, truth)
    group = ngff.open_image(image_zarr)
    shapes = [tuple(group[d["path"]].shape[-2:]) for d in ngff.multiscale(group)["datasets"]]
    summaries = [merge_mod.merge(job, image_zarr, tmp_path / "nuclei.parquet", t, 2,
                                 (64, 64), (128, 128), {"k": "v"}, log=lambda _m: None,
                                 level_shapes=shapes) for t in (1, 0)]
    return truth, image_zarr, summaries[1], job


def test_level_0_equals_the_truth_and_the_table_has_every_nucleus(merged) -> None:
    truth, image_zarr, summary, _ = merged
    labels = zarr.open_array(image_zarr / "labels" / "nuclei" / "0", mode="r")[...]
    assert summary["nuclei"] == truth.max()
    # same partition of the pixels (ids differ): a one-to-one map between the two labelings
    pairs = np.unique(np.stack([truth.ravel(), labels.ravel().astype(np.int64)]), axis=1)
    assert len(pairs[0]) == len(set(pairs[0].tolist())) == len(set(pairs[1].tolist()))
    assert ((pairs[0] == 0) == (pairs[1] == 0)).all()
    table = pd.read_parquet(image_zarr.parent / "nuclei.parquet")
    assert table["id"].tolist() == list(range(1, len(table) + 1))
    np.testing.assert_array_equal(table["c0_mean"], table["y"])  # stats rows follow ids
    areas = np.bincount(labels.ravel())[1:]
    np.testing.assert_array_equal(areas, table["area"])
    # only seam masks were held in memory, not all of them
    assert 0 < summary["seam_masks_held"] < summary["nuclei"]


def test_every_level_is_the_nearest_neighbour_downsample_of_level_0(merged) -> None:
    _, image_zarr, summary, _ = merged
    image_levels = len(ngff.multiscale(ngff.open_image(image_zarr))["datasets"])
    assert summary["label_levels"] == image_levels == 5
    group = zarr.open_group(image_zarr / "labels" / "nuclei", mode="r")
    level0 = group["0"][...]
    for level in range(1, image_levels):
        arr = group[str(level)]
        image_arr = ngff.open_level(image_zarr, level)
        assert arr.shape == image_arr.shape[1:]
        assert (arr.chunks, arr.shards) == (image_arr.chunks[1:], image_arr.shards[1:])
        s = 2 ** level
        np.testing.assert_array_equal(arr[...], level0[::s, ::s], err_msg=f"level {level}")
        scale = group.attrs["ome"]["multiscales"][0]["datasets"][level][
            "coordinateTransformations"][0]["scale"]
        assert scale == [float(s), float(s)]


def test_label_pyramid_validates_as_ngff_0_5_labels(merged) -> None:
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    _, image_zarr, _, _ = merged
    labels = Labels.from_zarr(zarr.open_group(image_zarr / "labels", mode="r"))
    assert labels.label_paths == ["nuclei"]
    label = ImageLabel.from_zarr(zarr.open_group(image_zarr / "labels" / "nuclei", mode="r"))
    datasets = label.attributes.ome.multiscales[0].datasets
    assert [d.path for d in datasets] == ["0", "1", "2", "3", "4"]


def test_an_older_single_level_label_group_is_replaced(merged, tmp_path: Path) -> None:
    from hpc_jobs.segmentation.labels import ensure_labels

    _, image_zarr, _, _ = merged
    arrays = ensure_labels(image_zarr, [SHAPE], (64, 64), (128, 128))  # as before: one level
    assert len(arrays) == 1
    arrays = ensure_labels(image_zarr, [SHAPE, (300, 450)], (64, 64), (128, 128))
    assert [a.shape for a in arrays] == [SHAPE, (300, 450)]


def test_skipped_tiles_own_nothing_and_need_no_file(tmp_path: Path) -> None:
    pixels, truth = render_nuclei(SHAPE, seed=6, channels=1)
    image_zarr = tmp_path / "image.zarr"
    write_as_export(image_zarr, pixels, chunk=64, block=128)
    job = TileJob(array_path=str(image_zarr / "0"), tiles_dir=str(tmp_path / "tiles"),
                  model_path="m", model_sha256="0" * 64, shape=(1, *SHAPE), block=256, halo=64)
    skip = {3, 7, 11}  # the right column of the 3 x 4 grid (x >= 768)
    write_tiles(job, truth, skip)
    s = merge_mod.merge(job, image_zarr, tmp_path / "n.parquet", 0, 1, (64, 64), (128, 128),
                        {}, log=lambda _m: None, skip=skip)
    table = pd.read_parquet(tmp_path / "n.parquet")
    assert s["nuclei"] == len(table) and set(table["tile"]).isdisjoint(skip)
    with pytest.raises(RuntimeError, match="1 of 9 tiles have no result"):
        (tmp_path / "tiles" / "0_0.npz").unlink()
        merge_mod.merge(job, image_zarr, tmp_path / "n.parquet", 0, 1, (64, 64), (128, 128),
                        {}, log=lambda _m: None, skip=skip)
