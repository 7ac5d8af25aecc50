"""Segment the tiles of one array task on a pool of worker processes inside the node.

``N`` worker processes each load the Cellpose model ONCE (pool initializer) and run
``torch.set_num_threads(cpus // N)`` with OMP/MKL thread variables set to the same value
before torch is imported (spawned workers; the parent never imports torch). Tiles are
handed out one at a time (dynamic load balancing: tissue-free tiles are cheap). With one
process the tiles run in the calling process instead (no spawn cost).

Each tile: read the core grown by ``pad = max(halo, window // 2 + claim_margin + 1)`` for
all channels, run Cellpose on log(1 + DAPI) over the core + halo, keep owned nuclei and seam
candidates (:mod:`.tiling`), compute window statistics (:mod:`.stats`) and write the result
file atomically (:mod:`.tile_result`). Finished tiles (file present with the same
``config_key``) are skipped: that is resume.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from hpc_jobs.segmentation import tile_result
from hpc_jobs.segmentation.tiling import Tile, TileGrid

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs to segment any tile of one image (picklable)."""

    array_path: str  # level-0 Zarr array (c, y, x)
    tiles_dir: str
    model_path: str
    shape: tuple[int, int, int]  # c, y, x
    #: sha256 of the model file's bytes (``fsutil.file_sha256``), computed once per job by the
    #: caller: tile results are keyed on the weights' content, not on their path or size.
    model_sha256: str
    dapi_channel: int = 0
    diameter: float = 20.0
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    log_transform: bool = True
    block: int = 2048
    halo: int = 64
    window: int = 101
    claim_margin: int = 16
    batch_size: int = 8
    #: the slide-wide DAPI range (of the preprocessed values) Cellpose maps to 0..1
    #: (:mod:`.normalise`); None: per-tile percentiles. Part of the config key.
    norm_low: float | None = None
    norm_high: float | None = None

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.shape[1], self.shape[2], self.block, self.halo)

    @property
    def pad(self) -> int:
        return max(self.halo, self.window // 2 + self.claim_margin + 1)

    def config_key(self) -> str:
        """Hash of every setting that changes a tile's result (the model by its content)."""
        d = asdict(self)
        for name in ("tiles_dir", "batch_size", "model_path"):
            d.pop(name)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def extract_nuclei(labels: np.ndarray, tile: Tile, image_hw: tuple[int, int],
                   claim_margin: int) -> tuple[dict[str, np.ndarray], int]:
    """Owned nuclei and seam candidates of a window's label image; also ``dropped_large``.

    Masks touching the window's outer edge (where it is not the image border) are cut off
    and dropped; if such a mask's centroid lies in the core, the object is larger than the
    halo and is counted in ``dropped_large``.
    """
    wy0, wx0, wy1, wx1 = tile.window
    h, w = labels.shape
    cut = (wy0 > 0, wx0 > 0, wy1 < image_hw[0], wx1 < image_hw[1])
    local, cy, cx, area, bbox, owned, masks = [], [], [], [], [], [], []
    dropped = 0
    for lab_id, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl] == lab_id
        ys, xs = np.nonzero(crop)
        y = float(ys.mean()) + sl[0].start + wy0
        x = float(xs.mean()) + sl[1].start + wx0
        touches = ((cut[0] and sl[0].start == 0) or (cut[1] and sl[1].start == 0)
                   or (cut[2] and sl[0].stop == h) or (cut[3] and sl[1].stop == w))
        mine = tile.in_core(y, x)
        if touches:
            dropped += int(mine)
            continue
        if not mine and not tile.near_core(y, x, claim_margin):
            continue
        local.append(lab_id)
        cy.append(y)
        cx.append(x)
        area.append(int(ys.size))
        bbox.append((sl[0].start + wy0, sl[1].start + wx0, sl[0].stop + wy0, sl[1].stop + wx0))
        owned.append(mine)
        masks.append(crop.ravel())
    offsets = np.zeros(len(masks) + 1, np.int64)
    offsets[1:] = np.cumsum([m.size for m in masks])
    out = {
        "local": np.asarray(local, np.int32), "cy": np.asarray(cy, np.float64),
        "cx": np.asarray(cx, np.float64), "area": np.asarray(area, np.int64),
        "bbox": np.asarray(bbox, np.int64).reshape(-1, 4), "owned": np.asarray(owned, bool),
        "mask_flat": np.concatenate(masks) if masks else np.zeros(0, bool),
        "mask_offsets": offsets,
    }
    return out, dropped


# --- per-process state (one model per process) ---------------------------------------------
_STATE: dict[str, Any] = {}


def set_threads(threads: int) -> None:
    """Thread variables for OpenMP/MKL/BLAS, then torch's own pools (call before work)."""
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def init_worker(model_path: str, threads: int, model_sha256: str | None = None) -> None:
    """Pool initializer: pin threads, load the model once, remember how long that took."""
    import logging

    logging.getLogger("cellpose").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    set_threads(threads)
    from hpc_jobs.segmentation.model import load_model

    _STATE["model"] = load_model(model_path, model_sha256)
    _STATE["model_id"] = (model_path, model_sha256)
    _STATE["load_seconds"] = time.perf_counter() - t0
    _STATE["load_reported"] = False


def process_tile(job: TileJob, tile: Tile) -> dict[str, Any]:
    """Segment one tile and write its result file; return timings and counts."""
    import zarr

    from hpc_jobs.segmentation.model import preprocess, segment
    from hpc_jobs.segmentation.stats import window_stats

    t0 = time.perf_counter()
    _, height, width = job.shape
    y0, x0, y1, x1 = tile.core
    p = job.pad
    ry0, rx0, ry1, rx1 = max(0, y0 - p), max(0, x0 - p), min(height, y1 + p), min(width, x1 + p)
    arr = zarr.open_array(job.array_path, mode="r")
    pixels = np.asarray(arr[:, ry0:ry1, rx0:rx1])
    wy0, wx0, wy1, wx1 = tile.window
    dapi = pixels[job.dapi_channel, wy0 - ry0:wy1 - ry0, wx0 - rx0:wx1 - rx0]
    t1 = time.perf_counter()
    norm = None if job.norm_low is None or job.norm_high is None else (job.norm_low,
                                                                         job.norm_high)
    labels = segment(_STATE["model"], preprocess(dapi, job.log_transform), job.diameter,
                     job.flow_threshold, job.cellprob_threshold, job.batch_size, norm)
    t2 = time.perf_counter()
    rec, dropped = extract_nuclei(labels, tile, (height, width), job.claim_margin)
    stats = window_stats(pixels, (ry0, rx0), np.stack([rec["cy"], rec["cx"]], axis=1),
                         job.window, (height, width))
    t3 = time.perf_counter()
    info = {"read_s": t1 - t0, "segment_s": t2 - t1, "post_s": t3 - t2,
            "dropped_large": float(dropped), "pid": float(os.getpid())}
    if not _STATE.get("load_reported", True):
        info["model_load_s"] = _STATE["load_seconds"]
        _STATE["load_reported"] = True
    result = tile_result.TileResult(tile=tile.index, ty=tile.ty, tx=tile.tx,
                                    config_key=job.config_key(), stats=stats, info=info, **rec)
    tile_result.save(result, tile_result.tile_path(Path(job.tiles_dir), tile.ty, tile.tx))
    info["write_s"] = time.perf_counter() - t3
    return {"tile": tile.name, "index": tile.index, "owned": int(rec["owned"].sum()),
            "candidates": int((~rec["owned"]).sum()), **info}


def _run_one(args: tuple[TileJob, Tile]) -> dict[str, Any]:
    return process_tile(*args)


def pending_tiles(job: TileJob, tiles: Iterable[Tile]) -> tuple[list[Tile], list[Tile]]:
    """Split ``tiles`` into (to do, already done with this config)."""
    key = job.config_key()
    todo, done = [], []
    for t in tiles:
        path = tile_result.tile_path(Path(job.tiles_dir), t.ty, t.tx)
        (done if path.is_file() and tile_result.read_config_key(path) == key else todo).append(t)
    return todo, done


def run_tiles(job: TileJob, tiles: list[Tile], processes: int, cpus: int,
              log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Segment ``tiles`` with ``processes`` workers sharing ``cpus`` cores; yield per tile."""
    if not tiles:
        return
    processes = max(1, min(processes, len(tiles)))
    threads = max(1, cpus // processes)
    log(f"segment: {len(tiles)} tiles on {processes} process(es) x {threads} thread(s)")
    if processes == 1:
        if _STATE.get("model_id") != (job.model_path, job.model_sha256):
            init_worker(job.model_path, threads, job.model_sha256)
        else:
            set_threads(threads)
        for t in tiles:
            yield process_tile(job, t)
        return
    ctx = multiprocessing.get_context("spawn")
    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    for var in THREAD_VARS:  # inherited by the spawned children before they import torch
        os.environ[var] = str(threads)
    try:
        with ctx.Pool(processes, initializer=init_worker,
                      initargs=(job.model_path, threads, job.model_sha256)) as pool:
            yield from pool.imap_unordered(_run_one, [(job, t) for t in tiles], chunksize=1)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
