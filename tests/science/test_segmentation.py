"""Segmentation against synthetic ground truth: accuracy, seams, resume, array + merge.

One 512x512 synthetic slide (2 channels, shards of 256 px) is segmented

- as one tile (block 512),
- as 4 tiles (block 256, halo 64),
- as 4 tiles split over 2 array tasks (tiles phase, then merge phase),

and the results are compared with the ground truth and with each other.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr
from scipy.spatial import cKDTree

from hpc_jobs.segmentation.synthetic import render_nuclei
from hpc_jobs.steps import segment_nuclei
from tests.science.conftest import make_context, write_image

SIZE = 512
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slide() -> tuple[np.ndarray, np.ndarray]:
    return render_nuclei((SIZE, SIZE), seed=123, channels=2)


def _run(root: Path, image: np.ndarray, block: int, task: tuple[int, int] | None = None,
         phase: str = "all", processes: int = 1, write: bool = True) -> dict[str, Any]:
    ctx = make_context(root, cpus=processes, task=task)
    if write:
        with ctx.open_store() as store:  # the step reads the image's ROIs from the store
            assert store.add_image("slide", image, ["DAPI", "marker"]) == 1
        write_image(ctx, 1, image)
    params = segment_nuclei.Params(image_id=1, block_size=block, halo=64, phase=phase,
                                   processes=processes)
    return segment_nuclei.run(params, ctx)


def _outputs(root: Path) -> tuple[np.ndarray, pd.DataFrame]:
    d = root / "data" / "images" / "1"
    labels = zarr.open_array(d / "image.zarr" / "labels" / "nuclei" / "0", mode="r")[...]
    return labels, pd.read_parquet(d / "nuclei.parquet")


@pytest.fixture(scope="module")
def single(cellpose_model: Path, slide, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("single")
    return root, _run(root, slide[0], block=SIZE)


@pytest.fixture(scope="module")
def tiled(cellpose_model: Path, slide, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("tiled")
    return root, _run(root, slide[0], block=256)


def _f1(truth: np.ndarray, pred: np.ndarray) -> float:
    from cellpose import metrics

    _, tp, fp, fn = metrics.average_precision([truth], [pred.astype(np.int32)],
                                              threshold=[0.5])
    return float(2 * tp[0, 0] / (2 * tp[0, 0] + fp[0, 0] + fn[0, 0]))


def test_single_tile_matches_ground_truth(single, slide) -> None:
    root, summary = single
    labels, table = _outputs(root)
    f1 = _f1(slide[1], labels)
    print(f"F1@0.5 single tile: {f1:.3f} ({summary['nuclei']} found, {slide[1].max()} true)")
    assert f1 >= 0.9
    assert summary["tiles"] == 1 and summary["nuclei"] == len(table) == labels.max()


def test_tiled_run_has_no_seams(tiled, single, slide) -> None:
    root, summary = tiled
    labels, table = _outputs(root)
    _, single_table = _outputs(single[0])
    assert summary["tiles"] == 4
    f1 = _f1(slide[1], labels)
    print(f"F1@0.5 4 tiles: {f1:.3f}; seam duplicates removed "
          f"{summary['duplicates_removed']}, orphans adopted {summary['orphans_adopted']}")
    assert f1 >= 0.9
    assert len(table) == len(single_table)
    pairs = cKDTree(table[["y", "x"]].to_numpy()).query_pairs(3.0)
    assert not pairs, f"nuclei counted twice: {pairs}"
    # every table row is a distinct painted label with the stated area
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    assert ids.tolist() == table["id"].tolist()
    assert np.abs(counts - table["area"].to_numpy()).max() <= 0  # no mask cut at seams
    # same nuclei as the single-tile run (matched by centroid)
    dist, _ = cKDTree(single_table[["y", "x"]].to_numpy()).query(table[["y", "x"]].to_numpy())
    assert np.percentile(dist, 99) < 2.0


def test_table_schema_and_window_stats(tiled, slide) -> None:
    root, _ = tiled
    path = root / "data" / "images" / "1" / "nuclei.parquet"
    meta = pq.read_schema(path).metadata
    assert meta[b"omeflow.schema_version"] == b"1"
    _, table = _outputs(root)
    cols = {"id", "x", "y", "area", "tile", "c0_mean", "c0_median", "c0_var", "c0_skew",
            "c1_mean", "c1_skew"}
    assert cols <= set(table.columns)
    row = table.iloc[len(table) // 2]
    y, x = int(np.floor(row.y + 0.5)), int(np.floor(row.x + 0.5))
    win = slide[0][1, max(0, y - 50):y + 51, max(0, x - 50):x + 51].astype(float)
    assert row.c1_mean == pytest.approx(win.mean())
    assert row.c1_median == pytest.approx(np.median(win))


def test_labels_group_is_valid_ngff(tiled) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    root, _ = tiled
    image_zarr = root / "data" / "images" / "1" / "image.zarr"
    arr = zarr.open_array(image_zarr / "labels" / "nuclei" / "0", mode="r")
    assert arr.dtype == np.uint32 and arr.shape == (SIZE, SIZE)
    assert arr.chunks == (128, 128) and arr.shards == (256, 256)
    labels_group = zarr.open_group(image_zarr / "labels", mode="r")
    assert labels_group.attrs["ome"]["labels"] == ["nuclei"]
    nodes = list(Reader(parse_url(str(image_zarr / "labels" / "nuclei")))())
    label_nodes = [n for n in nodes if any(type(s).__name__ == "Label" for s in n.specs)]
    assert len(label_nodes) == 1, f"ome_zarr found no label node in {nodes}"
    node = label_nodes[0]
    assert node.metadata.get("name") == "nuclei"
    data = np.asarray(node.data[0])
    assert data.shape == (SIZE, SIZE) and data.max() == arr[...].max()
    # a pyramid like the image's (512, 256, 128 px with chunks of 128)
    assert [tuple(d.shape) for d in node.data] == [(512, 512), (256, 256), (128, 128)]


def test_resume_skips_finished_tiles_and_reruns_are_identical(tiled, slide) -> None:
    root, first = tiled
    labels1, table1 = _outputs(root)
    tiles_dir = root / "data" / "images" / "1" / "segmentation" / "tiles"
    (tiles_dir / "1_1.npz").unlink()
    again = _run(root, slide[0], block=256, write=False)
    assert (again["tiles"], again["tiles_skipped"]) == (4, 3)
    labels2, table2 = _outputs(root)
    np.testing.assert_array_equal(labels1, labels2)
    pd.testing.assert_frame_equal(table1, table2)
    assert again["nuclei"] == first["nuclei"]


def test_array_tasks_then_merge_equal_the_all_run(tiled, slide, tmp_path: Path) -> None:
    for t in range(2):
        s = _run(tmp_path, slide[0], block=256, task=(t, 2), phase="tiles", write=(t == 0))
        assert s["tiles"] == 2
    with pytest.raises(RuntimeError, match="phase='tiles'"):
        broken = tmp_path / "broken"
        shutil.copytree(tmp_path / "data", broken / "data")
        shutil.copytree(tmp_path / "store", broken / "store")
        next((broken / "data" / "images" / "1" / "segmentation" / "tiles").glob("*.npz")
             ).unlink()
        _run(broken, slide[0], block=256, phase="merge", write=False)
    for t in (1, 0):
        _run(tmp_path, slide[0], block=256, task=(t, 2), phase="merge", write=False)
    labels, table = _outputs(tmp_path)
    labels_all, table_all = _outputs(tiled[0])
    np.testing.assert_array_equal(labels, labels_all)
    pd.testing.assert_frame_equal(table, table_all)
    # every level of the label pyramid, each written by the task owning its shards
    for level in (1, 2):
        path = tmp_path / "data" / "images" / "1" / "image.zarr" / "labels" / "nuclei"
        part = zarr.open_array(path / str(level), mode="r")[...]
        np.testing.assert_array_equal(part, labels_all[::2 ** level, ::2 ** level])


def test_dapi_channel_out_of_range_names_the_fix(tmp_path: Path, slide) -> None:
    ctx = make_context(tmp_path)
    with ctx.open_store() as store:
        store.add_image("slide", slide[0])
    write_image(ctx, 1, slide[0])
    with pytest.raises(ValueError, match=r"2 channel\(s\); dapi_channel=5 .*use 0\.\.1"):
        segment_nuclei.run(segment_nuclei.Params(image_id=1, dapi_channel=5), ctx)


def test_process_pool_gives_the_same_result(tiled, slide, tmp_path: Path) -> None:
    # 2 worker processes x 1 thread (cpus=2) vs. the inline 1 x 1 run of ``tiled``
    summary = _run(tmp_path, slide[0], block=256, processes=2)
    assert summary["tiles"] == 4 and summary["model_load_s"] > 0
    labels, table = _outputs(tmp_path)
    labels_all, table_all = _outputs(tiled[0])
    np.testing.assert_array_equal(labels, labels_all)
    pd.testing.assert_frame_equal(table, table_all)
