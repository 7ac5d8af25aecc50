"""Merge phase: reconcile seams, assign global ids, paint the label image, write the table.

Every merge task reads all tile results (small: centroids, boxes, mask crops) and computes
the same deterministic plan:

1. *Kept* = every owned nucleus, minus seam duplicates: two owned nuclei from different
   tiles whose masks overlap by >= half of the smaller one are one nucleus claimed twice
   (sub-pixel centroid differences between the two segmentations); the one from the lower
   tile index is kept.
2. *Orphans*: a seam candidate (centroid just outside its tile's core, see :mod:`.tiling`)
   that overlaps no kept nucleus was claimed by nobody; it is adopted with its own mask.
3. Global ids 1..N in order of (tile index, Cellpose label inside that tile).

Task ``t`` of ``n`` then paints the cores of tiles ``i % n == t`` from every kept nucleus
whose box meets that core (a nucleus owned by one tile may reach into a neighbour's core;
each core writer paints its part) and writes whole shard-aligned cores, so no two writers
touch one shard. Task 0 writes ``nuclei.parquet`` (atomically).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from hpc_jobs.segmentation import tile_result
from hpc_jobs.segmentation.run_tiles import TileJob
from hpc_jobs.segmentation.stats import STAT_NAMES
from hpc_jobs.segmentation.tiling import TileGrid

TABLE_SCHEMA_VERSION = "1"


@dataclass
class MergePlan:
    """The kept nuclei in global id order (arrays parallel; id = position + 1)."""

    tile: np.ndarray  # int64 tile index of the segmentation the mask comes from
    row: np.ndarray  # int64 row in that tile's result
    local: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    area: np.ndarray
    bbox: np.ndarray
    duplicates_removed: int
    orphans_adopted: int

    def __len__(self) -> int:
        return len(self.tile)


def load_results(job: TileJob) -> dict[int, tile_result.TileResult]:
    """Every tile's result; refuse missing or stale ones with a message naming the fix."""
    grid, key = job.grid, job.config_key()
    results, missing, stale = {}, [], []
    for t in grid.tiles():
        path = tile_result.tile_path(Path(job.tiles_dir), t.ty, t.tx)
        if not path.is_file():
            missing.append(t.name)
            continue
        res = tile_result.load(path)
        if res.config_key != key:
            stale.append(t.name)
        results[t.index] = res
    if missing or stale:
        what = (f"{len(missing)} of {len(grid)} tiles have no result (e.g. {missing[:3]})"
                if missing else f"{len(stale)} tile results were made with other settings "
                f"(e.g. {stale[:3]})")
        raise RuntimeError(f"cannot merge: {what}; run phase='tiles' (all array tasks) with "
                           "the same params first")
    return results


def _overlap(a: tile_result.TileResult, i: int, b: tile_result.TileResult, j: int) -> float:
    """|A ∩ B| / min(|A|, |B|) of two nucleus masks (level-0 coordinates)."""
    ay0, ax0, ay1, ax1 = a.bbox[i]
    by0, bx0, by1, bx1 = b.bbox[j]
    y0, x0, y1, x1 = max(ay0, by0), max(ax0, bx0), min(ay1, by1), min(ax1, bx1)
    if y0 >= y1 or x0 >= x1:
        return 0.0
    ma = a.mask(i)[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
    mb = b.mask(j)[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    return float(np.count_nonzero(ma & mb)) / float(min(a.area[i], b.area[j]))


def plan(results: dict[int, tile_result.TileResult], search_radius: float, block: int
         ) -> MergePlan:
    """Reconcile seams and order the kept nuclei (deterministic; see module docstring).

    Only nuclei within ``search_radius`` of a core edge (a multiple of ``block``) can be
    claimed twice; the duplicate search looks at those only, so it stays cheap on slides
    with hundreds of thousands of nuclei.
    """
    recs = [(t, r) for t in sorted(results) for r in range(len(results[t]))]
    tiles = np.array([t for t, _ in recs], np.int64)
    rows = np.array([r for _, r in recs], np.int64)
    owned = np.array([results[t].owned[r] for t, r in recs], bool)
    yx = np.array([(results[t].cy[r], results[t].cx[r]) for t, r in recs],
                  np.float64).reshape(-1, 2)
    keep = owned.copy()
    rem = np.mod(yx, block)
    near_seam = (np.minimum(rem, block - rem) < search_radius).any(axis=1)
    own_idx = np.flatnonzero(owned & near_seam)
    duplicates = 0
    if len(own_idx) > 1:
        tree = cKDTree(yx[own_idx])
        for p, q in sorted(tree.query_pairs(search_radius)):
            i, j = own_idx[p], own_idx[q]  # i < j: recs are sorted by (tile, row)
            if tiles[i] == tiles[j] or not keep[i] or not keep[j]:
                continue
            if _overlap(results[tiles[i]], rows[i], results[tiles[j]], rows[j]) >= 0.5:
                keep[j] = False
                duplicates += 1
    adopted = 0
    kept_idx = np.flatnonzero(keep)
    tree = cKDTree(yx[kept_idx]) if len(kept_idx) else None
    extra: list[int] = []
    for c in np.flatnonzero(~owned):
        near = list(kept_idx[tree.query_ball_point(yx[c], search_radius)]) if tree else []
        near += [e for e in extra if np.hypot(*(yx[e] - yx[c])) <= search_radius]
        rc = results[tiles[c]]
        if all(_overlap(rc, rows[c], results[tiles[k]], rows[k]) < 0.5 for k in near):
            keep[c] = True
            extra.append(int(c))
            adopted += 1
    sel = np.flatnonzero(keep)
    local = np.array([results[tiles[k]].local[rows[k]] for k in sel], np.int64)
    order = np.lexsort((local, tiles[sel]))
    sel = sel[order]
    return MergePlan(
        tile=tiles[sel], row=rows[sel], local=local[order],
        cy=yx[sel, 0].copy(), cx=yx[sel, 1].copy(),
        area=np.array([results[tiles[k]].area[rows[k]] for k in sel], np.int64),
        bbox=np.array([results[tiles[k]].bbox[rows[k]] for k in sel], np.int64).reshape(-1, 4),
        duplicates_removed=duplicates, orphans_adopted=adopted,
    )


def paint_core(core: tuple[int, int, int, int], merge_plan: MergePlan,
               results: dict[int, tile_result.TileResult]) -> np.ndarray:
    """uint32 labels of one core from every kept nucleus whose box meets it."""
    y0, x0, y1, x1 = core
    out = np.zeros((y1 - y0, x1 - x0), np.uint32)
    b = merge_plan.bbox
    hit = np.flatnonzero((b[:, 0] < y1) & (b[:, 2] > y0) & (b[:, 1] < x1) & (b[:, 3] > x0))
    for k in hit:  # ascending id: deterministic if two masks ever overlap
        by0, bx0, by1, bx1 = b[k]
        m = results[int(merge_plan.tile[k])].mask(int(merge_plan.row[k]))
        sy0, sx0, sy1, sx1 = max(by0, y0), max(bx0, x0), min(by1, y1), min(bx1, x1)
        sub = m[sy0 - by0:sy1 - by0, sx0 - bx0:sx1 - bx0]
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0][sub] = k + 1
    return out


def write_table(path: Path, merge_plan: MergePlan, results: dict[int, tile_result.TileResult],
                grid: TileGrid, channels: int, metadata: dict[str, str]) -> None:
    """``nuclei.parquet``: one row per nucleus; schema version in the file metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(merge_plan)
    stats = (np.stack([results[int(t)].stats[int(r)] for t, r in
                       zip(merge_plan.tile, merge_plan.row, strict=True)])
             if n else np.zeros((0, channels, len(STAT_NAMES))))
    cols: dict[str, Any] = {
        "id": pa.array(np.arange(1, n + 1, dtype=np.uint32)),
        "x": pa.array(merge_plan.cx), "y": pa.array(merge_plan.cy),
        "area": pa.array(merge_plan.area),
        "tile": pa.array(merge_plan.tile.astype(np.int32)),
        "tile_y": pa.array((merge_plan.tile // grid.nx).astype(np.int32)),
        "tile_x": pa.array((merge_plan.tile % grid.nx).astype(np.int32)),
    }
    for c in range(channels):
        for s, name in enumerate(STAT_NAMES):
            cols[f"c{c}_{name}"] = pa.array(stats[:, c, s])
    table = pa.table(cols)
    meta = {"omeflow.schema": "nuclei", "omeflow.schema_version": TABLE_SCHEMA_VERSION,
            **metadata}
    table = table.replace_schema_metadata({k: str(v) for k, v in meta.items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def merge(job: TileJob, image_zarr: Path, table_path: Path, task_id: int, task_count: int,
          chunks: tuple[int, int], shards: tuple[int, int] | None, metadata: dict[str, str],
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run this task's share of the merge; return counts for the step summary."""
    from hpc_jobs.segmentation.labels import ensure_labels_array

    grid = job.grid
    results = load_results(job)
    mp = plan(results, search_radius=max(2.0 * job.diameter, 2.0 * job.claim_margin),
              block=job.block)
    log(f"merge: {len(mp)} nuclei ({mp.duplicates_removed} seam duplicates removed, "
        f"{mp.orphans_adopted} seam orphans adopted)")
    arr = ensure_labels_array(image_zarr, (grid.height, grid.width), chunks, shards)
    mine = grid.for_task(task_id, task_count)
    for t in mine:
        y0, x0, y1, x1 = t.core
        arr[y0:y1, x0:x1] = paint_core(t.core, mp, results)
    log(f"merge: painted {len(mine)} tile cores into {image_zarr / 'labels' / 'nuclei'}")
    if task_id == 0:
        write_table(table_path, mp, results, grid, job.shape[0], metadata)
        log(f"merge: wrote {table_path}")
    dropped = sum(int(r.info.get("dropped_large", 0)) for r in results.values())
    if dropped:
        log(f"merge: WARNING {dropped} objects larger than the halo were dropped; "
            f"raise halo above {job.halo}")
    return {"nuclei": len(mp), "duplicates_removed": mp.duplicates_removed,
            "orphans_adopted": mp.orphans_adopted, "dropped_large": dropped,
            "cores_written": len(mine)}
