"""Step ``segment_nuclei``: tiled, parallel Cellpose nuclei segmentation of one image.

Reads ``<image_dir>/image.zarr/0`` (c, y, x uint16, written by ``export_zarr``), writes

- ``<image_dir>/segmentation/tiles/<ty>_<tx>.npz``: per-tile results (resume points);
- ``<image_dir>/image.zarr/labels/nuclei``: OME-NGFF 0.5 label image (uint32, y x), one
  level per image pyramid level (nearest neighbour);
- ``<image_dir>/nuclei.parquet``: one row per nucleus with window statistics; its metadata
  records the DAPI normalisation range.

Every tile is normalised with one DAPI range per image (:mod:`hpc_jobs.segmentation.normalise`),
so masks do not depend on ``block_size``. With tissue ROIs, tiles whose window holds no tissue
are not segmented (``tissue_only``; :mod:`hpc_jobs.segmentation.tissue`).

Phases: ``all`` (one job does everything), or for large images a Slurm job array with
``phase="tiles"`` (task t segments tiles i with i % n_tasks == t) followed by a job (or a
second array) with ``phase="merge"`` (task t paints the cores of the same tiles; task 0
writes the table). See :mod:`hpc_jobs.segmentation` for the pieces.
"""

from __future__ import annotations

import time
from math import ceil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from hpc_jobs.steps.base import StepContext, StepParams
from hpc_jobs.steps.fields import BlockSize, DapiChannel, ImageId

if TYPE_CHECKING:
    from hpc_jobs.segmentation.run_tiles import TileJob


class Params(StepParams):
    """Parameters of ``segment_nuclei`` (also the Airflow trigger form)."""

    image_id: ImageId
    dapi_channel: DapiChannel = 0
    diameter: float = Field(20.0, gt=0, description="Expected nucleus diameter in pixels.")
    model: str | None = Field(
        None, description="Cellpose model file (or model name in the site model folder); "
        "default: the site model, else the bootstrapped one.")
    block_size: BlockSize = 2048
    halo: int = Field(64, ge=0, le=4096, description="Context pixels around each tile core "
                      "(at least 2 x diameter).")
    processes: int | None = Field(None, ge=1, description="Worker processes (default: CPUs).")
    window: int = Field(101, ge=1, description="Side of the statistics window (px).")
    phase: Literal["all", "tiles", "merge"] = Field("all", description="Which part to run.")
    log_transform: bool = Field(True, description="Segment log(1 + DAPI) (the lab's recipe).")
    flow_threshold: float = Field(0.4, ge=0, description="Cellpose flow error threshold.")
    cellprob_threshold: float = Field(0.0, description="Cellpose cell probability threshold.")
    tissue_only: bool = Field(True, description="Segment only tiles whose window meets a "
                              "tissue ROI (holes excluded); no effect on images without "
                              "tissue ROIs.")

    @model_validator(mode="after")
    def _halo_fits_nuclei(self) -> Params:
        if self.halo < 2 * self.diameter:
            raise ValueError(f"halo={self.halo} is less than 2 x diameter={self.diameter}; "
                             f"use halo >= {ceil(self.diameter * 2)} so every nucleus owned "
                             "by a tile (or claimed at a seam) lies fully inside its window")
        return self


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Segment the image (or this array task's share of it); return a small summary.

    The tiles phase reads the image: it holds the image's lock shared (with other readers,
    also other runs' tiles). The merge phase rewrites the labels and the nuclei table: it
    holds the lock exclusive (so the tasks of a merge array take their turns).
    """
    from hpc_jobs.fsutil import file_sha256
    from hpc_jobs.segmentation.merge import merge
    from hpc_jobs.segmentation.model import resolve_model_path
    from hpc_jobs.segmentation.run_tiles import pending_tiles, run_tiles

    t0 = time.perf_counter()
    task_id, task_count = ctx.array_task_id or 0, ctx.array_task_count or 1
    if params.phase == "all" and task_count > 1:
        raise ValueError("phase='all' cannot run as a job array; submit the array with "
                         "phase='tiles', then phase='merge'")
    model_path = resolve_model_path(params.model, ctx.site.models.cellpose)
    model_sha256 = file_sha256(model_path)  # once per job: tiles are keyed on the weights
    summary: dict[str, Any] = {
        "image_id": params.image_id, "phase": params.phase, "array_task": task_id,
        "array_tasks": task_count, "model_path": str(model_path),
        "model_sha256": model_sha256,
    }
    if params.phase in ("all", "tiles"):
        with ctx.lock_image(params.image_id, exclusive=False, purpose="segment_nuclei tiles"):
            job, image = _tile_job(params, ctx, model_path, model_sha256, summary)
            grid = job.grid
            mine = grid.for_task(task_id, task_count)
            todo, done = pending_tiles(job, [t for t in mine if t.index not in image["skip"]])
            ctx.log(f"segment_nuclei: image {params.image_id} {image['shape']}, {len(grid)} "
                    f"tiles of {params.block_size}px (+{params.halo} halo), "
                    f"{len(image['skip'])} without tissue; task {task_id}/{task_count}: "
                    f"{len(todo)} to do, {len(done)} already done; DAPI range "
                    f"{job.norm_low:.4g}..{job.norm_high:.4g}; "
                    f"model {model_path} (sha256 {model_sha256[:12]})")
            totals = {"model_load_s": 0.0, "read_s": 0.0, "segment_s": 0.0, "post_s": 0.0,
                      "write_s": 0.0}
            processes = params.processes or ctx.cpus
            reporter = ctx.progress("tiles", total=len(todo) + len(done), message="segmenting")
            reporter.update(len(done))
            for i, res in enumerate(run_tiles(job, todo, processes, ctx.cpus, ctx.log), 1):
                for k in totals:
                    totals[k] += float(res.get(k, 0.0))
                ctx.log(f"segment_nuclei: tile {res['tile']} ({i}/{len(todo)}): "
                        f"{res['owned']} nuclei, segment {res['segment_s']:.1f}s")
                reporter.update(len(done) + i)
            reporter.finish("segmented")
            summary.update({"tiles": len(todo) + len(done), "tiles_skipped": len(done),
                            "tiles_no_tissue": sum(t.index in image["skip"] for t in mine),
                            **{k: round(v, 3) for k, v in totals.items()}})
    if params.phase in ("all", "merge"):
        with ctx.lock_image(params.image_id, exclusive=True, purpose="segment_nuclei merge"):
            job, image = _tile_job(params, ctx, model_path, model_sha256, summary)
            meta = {"image_id": str(params.image_id), "channels": str(job.shape[0]),
                    "dapi_channel": str(params.dapi_channel), "window": str(params.window),
                    "diameter": str(params.diameter), "model": str(model_path),
                    "model_sha256": model_sha256, "block_size": str(params.block_size),
                    "halo": str(params.halo), "tissue_only": str(params.tissue_only),
                    "tiles_no_tissue": str(len(image["skip"])), **image["norm"].metadata()}
            # the merge is one pass over every tile: reported as started, then done
            tiles = len(job.grid) - len(image["skip"])
            merging = ctx.progress("tiles", total=tiles, message="merging")
            merging.update(0, force=True)
            summary.update(merge(job, image["zarr"], image["dir"] / "nuclei.parquet", task_id,
                                 task_count, image["chunks"], image["shards"], meta, ctx.log,
                                 skip=image["skip"], level_shapes=image["levels"]))
            merging.update(tiles)
            merging.finish("merged")
        summary.setdefault("tiles", summary["tiles_total"] - len(image["skip"]))
        summary.setdefault("tiles_skipped", 0)
        summary.setdefault("tiles_no_tissue", len(image["skip"]))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _tile_job(params: Params, ctx: StepContext, model_path: Path, model_sha256: str,
              summary: dict[str, Any]) -> tuple[TileJob, dict[str, Any]]:
    """Open the exported image (call with its lock held) and describe the tiling job: its
    tissue (from the store's ROIs), the tiles without tissue, the DAPI range."""
    from hpc_jobs import ngff
    from hpc_jobs.segmentation.normalise import dapi_range
    from hpc_jobs.segmentation.run_tiles import TileJob
    from hpc_jobs.segmentation.tiling import TileGrid, check_alignment
    from hpc_jobs.segmentation.tissue import tiles_without_tissue, tissue_geometries

    image_dir = ctx.image_dir(params.image_id)
    image_zarr = ngff.image_zarr_path(image_dir)
    arr = ngff.open_level(image_zarr, 0)  # names the fix (run export_zarr) if missing
    n_channels = int(arr.shape[0])
    if params.dapi_channel >= n_channels:
        raise ValueError(f"image {params.image_id} has {n_channels} channel(s); "
                         f"dapi_channel={params.dapi_channel} is out of range "
                         f"(use 0..{n_channels - 1})")
    chunks = tuple(int(c) for c in arr.chunks[-2:])
    shards = tuple(int(s) for s in arr.shards[-2:]) if arr.shards else None
    check_alignment(params.block_size, shards or chunks)
    height, width = int(arr.shape[1]), int(arr.shape[2])
    with ctx.open_store() as store:
        regions = tissue_geometries(store.get_rois(params.image_id), width, height)
    norm = dapi_range(image_zarr, params.dapi_channel, regions, params.log_transform)
    group = ngff.open_image(image_zarr)
    levels = [tuple(int(v) for v in group[d["path"]].shape[-2:])
              for d in ngff.multiscale(group)["datasets"]]
    grid = TileGrid(height, width, params.block_size, params.halo)
    skip = tiles_without_tissue(grid, regions) if params.tissue_only else set()
    job = TileJob(
        array_path=str(image_zarr / arr.path), tiles_dir=str(image_dir / "segmentation" / "tiles"),
        model_path=str(model_path), model_sha256=model_sha256,
        shape=(n_channels, int(arr.shape[1]), int(arr.shape[2])),
        dapi_channel=params.dapi_channel, diameter=params.diameter,
        flow_threshold=params.flow_threshold, cellprob_threshold=params.cellprob_threshold,
        log_transform=params.log_transform, block=params.block_size, halo=params.halo,
        window=params.window, norm_low=norm.low, norm_high=norm.high,
    )
    summary.update({"tiles_total": len(job.grid), "dapi_norm": [norm.low, norm.high],
                    "dapi_norm_source": norm.source,
                    "labels_path": str(image_zarr / "labels" / "nuclei"),
                    "table_path": str(image_dir / "nuclei.parquet")})
    return job, {"dir": image_dir, "zarr": image_zarr, "shape": tuple(arr.shape),
                 "chunks": chunks, "shards": shards, "skip": skip, "norm": norm,
                 "levels": levels}
