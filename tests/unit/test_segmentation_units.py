"""Fast tests of the segmentation building blocks (no model, no Cellpose run)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from hpc_jobs.fsutil import file_sha256
from hpc_jobs.segmentation import model as seg_model
from hpc_jobs.segmentation.merge import Records, plan
from hpc_jobs.segmentation.run_tiles import TileJob, extract_nuclei, pending_tiles
from hpc_jobs.segmentation.stats import window_stats
from hpc_jobs.segmentation.tile_result import TileResult, load, save, tile_path
from hpc_jobs.segmentation.tiling import TileGrid, check_alignment


def test_every_pixel_owned_by_exactly_one_tile_and_tasks_partition_tiles() -> None:
    grid = TileGrid(height=700, width=530, block=256, halo=64)
    assert (grid.ny, grid.nx, len(grid)) == (3, 3, 9)
    owners = np.zeros((700, 530), np.int32)
    for t in grid.tiles():
        y0, x0, y1, x1 = t.core
        owners[y0:y1, x0:x1] += 1
        wy0, wx0, wy1, wx1 = t.window
        assert wy0 == max(0, y0 - 64) and wy1 == min(700, y1 + 64)
        assert wx0 == max(0, x0 - 64) and wx1 == min(530, x1 + 64)
    assert (owners == 1).all()
    for y, x in [(0.0, 0.0), (255.9, 256.0), (699.5, 529.2), (512.0, 300.3)]:
        t = grid.tile(grid.owner(y, x))
        assert t.in_core(y, x)
        assert sum(u.in_core(y, x) for u in grid.tiles()) == 1
    split = [t.index for k in range(4) for t in grid.for_task(k, 4)]
    assert sorted(split) == list(range(9))
    assert [t.index for t in grid.for_task(1, 4)] == [1, 5]


def test_block_must_be_a_multiple_of_the_shard() -> None:
    check_alignment(4096, (2048, 2048))
    with pytest.raises(ValueError, match="block_size=2048"):
        check_alignment(1000, (2048, 2048))


def test_eval_signature_detection_for_cellpose_3_and_4() -> None:
    def eval_v3(x, batch_size=8, channels=None, diameter=None):  # noqa: ARG001
        return None

    def eval_v4(x, batch_size=8, diameter=None, flow_threshold=0.4):  # noqa: ARG001
        return None

    assert seg_model.eval_accepts_channels(eval_v3)
    assert not seg_model.eval_accepts_channels(eval_v4)


def test_model_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CELLPOSE_LOCAL_MODELS_PATH", raising=False)
    with pytest.raises(seg_model.ModelNotFoundError, match="omeflow bootstrap-model"):
        seg_model.resolve_model_path(None, None)
    boot = seg_model.bootstrapped_model_path()
    boot.parent.mkdir(parents=True)
    boot.write_bytes(b"w")
    assert seg_model.resolve_model_path(None, None) == boot
    env_dir = tmp_path / "cp_models"
    env_dir.mkdir()
    (env_dir / "nuclei").write_bytes(b"w")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(env_dir))
    assert seg_model.resolve_model_path(None, None) == env_dir / "nuclei"
    site_dir = tmp_path / "site_models"
    site_dir.mkdir()
    (site_dir / "nucleitorch_0").write_bytes(b"w")
    (site_dir / "mine").write_bytes(b"w")
    assert seg_model.resolve_model_path(None, site_dir) == site_dir / "nucleitorch_0"
    assert seg_model.resolve_model_path("mine", site_dir) == site_dir / "mine"
    explicit = site_dir / "explicit_model"
    explicit.write_bytes(b"w")
    assert seg_model.resolve_model_path(str(explicit), site_dir) == explicit.resolve()
    with pytest.raises(seg_model.ModelNotFoundError, match="params.model"):
        seg_model.resolve_model_path(str(site_dir / "missing" / "m"), site_dir)
    # a path outside the site's model folders is refused even if the file exists
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"w")
    for hostile in (str(outside), "/etc/passwd", str(site_dir / ".." / "elsewhere.pt")):
        with pytest.raises(seg_model.ModelNotFoundError, match="outside this site's model"):
            seg_model.resolve_model_path(hostile, site_dir)
    with pytest.raises(seg_model.ModelNotFoundError, match="site.toml"):
        seg_model.resolve_model_path("unknown_name", site_dir)


def test_window_stats_match_numpy_and_scipy_and_clip_at_borders() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 4000, size=(2, 300, 260)).astype(np.uint16)
    cents = np.array([[150.2, 130.7], [3.0, 4.4], [299.0, 259.0]])
    out = window_stats(img, (0, 0), cents, 101, (300, 260))
    for i, (y0, x0, y1, x1) in enumerate([(100, 81, 201, 182), (0, 0, 54, 55),
                                          (249, 209, 300, 260)]):
        for c in range(2):
            px = img[c, y0:y1, x0:x1].astype(np.float64).ravel()
            np.testing.assert_allclose(out[i, c], [px.mean(), np.median(px), px.var(),
                                                   sps.skew(px)], rtol=1e-9)
    sub = img[:, 90:260, 60:240]
    np.testing.assert_allclose(window_stats(sub, (90, 60), cents[:1], 101, (300, 260)),
                               out[:1])


def _disk_labels(h: int, w: int, centres: list[tuple[int, int]], r: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int32)
    for k, (cy, cx) in enumerate(centres, 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return lab


def test_extract_keeps_owned_and_candidates_and_drops_cut_masks() -> None:
    grid = TileGrid(512, 512, 256, 64)
    tile = grid.tile(0)  # core (0,0)-(256,256), window (0,0)-(320,320)
    lab = _disk_labels(320, 320, [(100, 100), (250, 100), (262, 140), (100, 300), (318, 40)])
    rec, dropped = extract_nuclei(lab, tile, (512, 512), claim_margin=16)
    assert rec["local"].tolist() == [1, 2, 3]
    assert rec["owned"].tolist() == [True, True, False]
    assert dropped == 0
    np.testing.assert_allclose(rec["cy"], [100, 250, 262])
    assert rec["area"][0] == (lab == 1).sum()
    big = np.zeros((320, 320), np.int32)
    big[150:320, 100:150] = 1  # centroid in the core, cut by the window's lower edge
    assert extract_nuclei(big, tile, (512, 512), 16)[1] == 1


def _result(tile: int, tiles_nx: int, lab: np.ndarray, keep: list[int], owned: list[bool],
            origin: tuple[int, int] = (0, 0)) -> TileResult:
    from scipy import ndimage

    objs = ndimage.find_objects(lab)
    local, cy, cx, area, bbox, masks = [], [], [], [], [], []
    for k in keep:
        sl = objs[k - 1]
        crop = lab[sl] == k
        ys, xs = np.nonzero(crop)
        local.append(k)
        cy.append(ys.mean() + sl[0].start + origin[0])
        cx.append(xs.mean() + sl[1].start + origin[1])
        area.append(ys.size)
        bbox.append((sl[0].start + origin[0], sl[1].start + origin[1],
                     sl[0].stop + origin[0], sl[1].stop + origin[1]))
        masks.append(crop.ravel())
    offsets = np.concatenate([[0], np.cumsum([m.size for m in masks])]).astype(np.int64)
    return TileResult(tile=tile, ty=tile // tiles_nx, tx=tile % tiles_nx, config_key="k",
                      local=np.array(local, np.int32), cy=np.array(cy), cx=np.array(cx),
                      area=np.array(area, np.int64), bbox=np.array(bbox, np.int64),
                      owned=np.array(owned), mask_flat=np.concatenate(masks),
                      mask_offsets=offsets, stats=np.zeros((len(keep), 1, 4)))


def test_merge_plan_removes_seam_duplicates_and_adopts_orphans(tmp_path: Path) -> None:
    lab = _disk_labels(512, 512, [(100, 100), (255, 100), (256, 300), (400, 100)])
    shifted = _disk_labels(512, 512, [(100, 100), (256, 100), (255, 300), (400, 100)])
    # tile 0 (top): owns 1 and its version of 2 (centroid 255); 3 is its candidate (256)
    top = _result(0, 1, lab, [1, 2, 3], [True, True, False])
    # tile 1 (bottom): also owns nucleus 2 (its centroid says 256: a duplicate), owns 4,
    # and sees nucleus 3 at 255 (candidate), so nobody owns nucleus 3: an orphan
    bottom = _result(1, 1, shifted, [2, 3, 4], [True, False, True])
    save(top, tmp_path / "0_0.npz")
    top = load(tmp_path / "0_0.npz")
    mp = plan(Records.from_results({0: top, 1: bottom}), search_radius=40, block=256)
    assert (mp.duplicates_removed, mp.orphans_adopted, len(mp)) == (1, 1, 4)
    assert mp.tile.tolist() == [0, 0, 0, 1]
    assert mp.local.tolist() == [1, 2, 3, 4]


def test_cached_tiles_are_keyed_by_the_model_content_not_its_path_and_size(
        tmp_path: Path) -> None:
    model = tmp_path / "models" / "nuclei"
    model.parent.mkdir()
    model.write_bytes(bytes(range(256)) * 64)
    stamp = model.stat()

    def job_for_model_now() -> TileJob:  # what segment_nuclei builds at the start of a job
        return TileJob(array_path=str(tmp_path / "image.zarr" / "0"),
                       tiles_dir=str(tmp_path / "tiles"), model_path=str(model),
                       model_sha256=file_sha256(model), shape=(2, 512, 512), block=256)

    before = job_for_model_now()
    tile = before.grid.tile(0)
    finished = dataclasses.replace(_result(0, 1, _disk_labels(64, 64, [(32, 32)]), [1], [True]),
                                   config_key=before.config_key())
    (tmp_path / "tiles").mkdir()
    save(finished, tile_path(tmp_path / "tiles", tile.ty, tile.tx))
    assert pending_tiles(before, [tile]) == ([], [tile]), "same weights: the tile is reused"

    # retrained in place: same path, same architecture (size), even the same mtime
    model.write_bytes(bytes(reversed(range(256))) * 64)
    os.utime(model, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert model.stat().st_size == stamp.st_size
    after = job_for_model_now()
    assert after.config_key() != before.config_key()
    assert pending_tiles(after, [tile]) == ([tile], []), "new weights: the tile is redone"

    # the same weights under another path are the same model: the tile stays valid
    copy = tmp_path / "models" / "copy"
    copy.write_bytes(model.read_bytes())
    moved = dataclasses.replace(after, model_path=str(copy))
    assert moved.config_key() == after.config_key()
