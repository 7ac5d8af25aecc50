"""Merge phase: reconcile seams, assign global ids, paint the label pyramid, write the table.

Streaming. The merge never holds every tile's result: one pass over the tile files reads
each nucleus's *record* (tile, row, Cellpose label, centroid, area, box, owned: ~80 bytes)
and keeps the mask crop only of *seam* records, those that can take part in a seam decision
or be painted into another tile's core (seam candidates, nuclei within ``search_radius +
claim_margin`` of a core edge, masks crossing their core). Everything else is read again
from one tile file at a time when painting and when writing the table. Peak memory is
therefore about

    N x ~150 B (records, plan, k-d tree) + seam masks (packed, ~0.35 KB each for ~20-px
    nuclei; a band of ~2 x 56 px along every core edge plus the seam candidates: ~14 % of
    nuclei with 2048-px tiles) + one tile's result file + one output block (a tile core at
    level 0, one shard at the other levels; uint32) and its encoding buffers

independent of the masks of the whole slide (measured by ``benchmarks/merge_memory.py``).

Plan (every merge task computes the same, deterministically):

1. *Kept* = every owned nucleus, minus seam duplicates: two owned nuclei from different
   tiles whose masks overlap by >= half of the smaller one are one nucleus claimed twice
   (sub-pixel centroid differences between the two segmentations); the one from the lower
   tile index is kept.
2. *Orphans*: a seam candidate (centroid just outside its tile's core, see :mod:`.tiling`)
   that overlaps no kept nucleus was claimed by nobody; it is adopted with its own mask.
3. Global ids 1..N in order of (tile index, Cellpose label inside that tile).

Tiles without tissue (``skip``, see :mod:`.tissue`) have no result and own nothing.

Task ``t`` of ``n`` then paints the cores of tiles ``i % n == t`` at level 0 and the shards
``j % n == t`` of every lower level (nearest neighbour: level ``L`` pixel ``(i, j)`` is level-0
pixel ``(i * 2**L, j * 2**L)``, painted straight from the masks), so no two writers touch one
shard. Task 0 writes ``nuclei.parquet`` (atomically), one row group per tile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from hpc_jobs.segmentation import tile_result
from hpc_jobs.segmentation.run_tiles import TileJob
from hpc_jobs.segmentation.stats import STAT_NAMES

TABLE_SCHEMA_VERSION = "1"

Region = tuple[int, int, int, int]  # y0, x0, y1, x1 (half-open), level-0 px


class SeamMasks:
    """Mask crops of some records, packed per tile (no Python object per mask): the record
    indices (sorted), each crop's offset in its tile's buffer, one buffer per tile."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = ()) -> None:
        """``parts``: per tile, in record order, ``(record indices, crop sizes)`` and the
        crops concatenated: ``(indices, sizes, flat)``."""
        self.index = np.concatenate([p[0] for p in parts]).astype(np.int64) if parts else (
            np.zeros(0, np.int64))
        self.offsets = (np.concatenate([np.cumsum(p[1]) - p[1] for p in parts]).astype(np.int64)
                        if parts else np.zeros(0, np.int64))
        self.starts = np.cumsum([0] + [len(p[0]) for p in parts[:-1]]).astype(np.int64)
        self.flats = [p[2] for p in parts]

    def __len__(self) -> int:
        return len(self.index)

    def get(self, rec: int, shape: tuple[int, int]) -> np.ndarray | None:
        """The crop of record ``rec`` (shape of its box), or None if it is not held."""
        k = int(np.searchsorted(self.index, rec))
        if k == len(self.index) or self.index[k] != rec:
            return None
        chunk = int(np.searchsorted(self.starts, k, side="right")) - 1
        o = int(self.offsets[k])
        return self.flats[chunk][o:o + shape[0] * shape[1]].reshape(shape)


@dataclass
class Records:
    """Every nucleus record of every tile result (arrays parallel), masks of seam records."""

    tile: np.ndarray  # int32 tile index
    row: np.ndarray  # int32 row in that tile's result
    local: np.ndarray  # int32 Cellpose label inside the tile
    yx: np.ndarray  # float64 (n, 2) level-0 centroid
    area: np.ndarray  # int32
    bbox: np.ndarray  # int32 (n, 4): y0, x0, y1, x1
    owned: np.ndarray  # bool
    masks: SeamMasks = field(default_factory=SeamMasks)
    dropped_large: int = 0

    def __len__(self) -> int:
        return len(self.tile)

    def shape(self, rec: int) -> tuple[int, int]:
        y0, x0, y1, x1 = (int(v) for v in self.bbox[rec])
        return y1 - y0, x1 - x0

    def mask(self, rec: int) -> np.ndarray:
        """A held crop (every record whose mask a seam decision needs is held)."""
        m = self.masks.get(rec, self.shape(rec))
        if m is None:
            raise KeyError(f"mask of record {rec} (tile {self.tile[rec]}) is not held")
        return m

    @classmethod
    def from_results(cls, results: dict[int, tile_result.TileResult]) -> Records:
        """Records of in-memory tile results, every mask held (tests, small images)."""
        parts = [_tile_records(t, r.local, r.cy, r.cx, r.area, r.bbox, r.owned)
                 for t, r in sorted(results.items())]
        recs = _concat(parts)
        flat = [r.mask_flat for _, r in sorted(results.items())]
        sizes = np.concatenate([np.diff(r.mask_offsets) for _, r in sorted(results.items())])
        recs.masks = SeamMasks([(np.arange(len(recs)), sizes, np.concatenate(flat))])
        return recs


@dataclass
class MergePlan:
    """The kept nuclei in global id order (arrays parallel; id = position + 1)."""

    rec: np.ndarray  # int64 index into the Records
    tile: np.ndarray  # int32 tile index of the segmentation the mask comes from
    row: np.ndarray  # int32 row in that tile's result
    local: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    area: np.ndarray
    bbox: np.ndarray
    duplicates_removed: int
    orphans_adopted: int

    def __len__(self) -> int:
        return len(self.tile)


def _tile_records(tile: int, local: np.ndarray, cy: np.ndarray, cx: np.ndarray,
                  area: np.ndarray, bbox: np.ndarray, owned: np.ndarray) -> Records:
    n = len(local)
    return Records(tile=np.full(n, tile, np.int32), row=np.arange(n, dtype=np.int32),
                   local=np.asarray(local, np.int32),
                   yx=np.stack([np.asarray(cy, np.float64), np.asarray(cx, np.float64)],
                               axis=1).reshape(-1, 2),
                   area=np.asarray(area, np.int32),
                   bbox=np.asarray(bbox, np.int32).reshape(-1, 4),
                   owned=np.asarray(owned, bool))


def _concat(parts: list[Records]) -> Records:
    if not parts:
        parts = [_tile_records(0, *(np.zeros(0),) * 4, np.zeros((0, 4)), np.zeros(0, bool))]
    return Records(
        tile=np.concatenate([p.tile for p in parts]), row=np.concatenate([p.row for p in parts]),
        local=np.concatenate([p.local for p in parts]),
        yx=np.concatenate([p.yx for p in parts]), area=np.concatenate([p.area for p in parts]),
        bbox=np.concatenate([p.bbox for p in parts]),
        owned=np.concatenate([p.owned for p in parts]),
    )


def _seam_distance(yx: np.ndarray, block: int) -> np.ndarray:
    """Distance of each centroid to the nearest core edge line (a multiple of ``block``)."""
    rem = np.mod(yx, block)
    return np.minimum(rem, block - rem).min(axis=1) if len(yx) else np.zeros(0)


def scan(job: TileJob, skip: Collection[int], search_radius: float) -> Records:
    """Read every tile result's records (masks of seam records only); refuse missing or
    stale results with a message naming the fix."""
    grid, key = job.grid, job.config_key()
    paths, missing, stale = {}, [], []
    for t in grid.tiles():
        if t.index in skip:
            continue
        path = tile_result.tile_path(Path(job.tiles_dir), t.ty, t.tx)
        if not path.is_file():
            missing.append(t.name)
        elif tile_result.read_config_key(path) != key:
            stale.append(t.name)
        paths[t.index] = path
    if missing or stale:
        n = len(grid) - len(skip)
        what = (f"{len(missing)} of {n} tiles have no result (e.g. {missing[:3]})"
                if missing else f"{len(stale)} tile results were made with other settings "
                f"(e.g. {stale[:3]})")
        raise RuntimeError(f"cannot merge: {what}; run phase='tiles' (all array tasks) with "
                           "the same params first")
    sizes = {}
    for index, path in paths.items():  # first pass: counts only (small members)
        with np.load(path, allow_pickle=False) as z:
            sizes[index] = len(z["local"])
    n = sum(sizes.values())
    recs = Records(tile=np.empty(n, np.int32), row=np.empty(n, np.int32),
                   local=np.empty(n, np.int32), yx=np.empty((n, 2)), area=np.empty(n, np.int32),
                   bbox=np.empty((n, 4), np.int32), owned=np.empty(n, bool))
    seam_parts, base = [], 0
    reach = search_radius + job.claim_margin
    for index, path in paths.items():
        core = grid.tile(index).core
        part = slice(base, base + sizes[index])
        with np.load(path, allow_pickle=False) as z:
            recs.tile[part] = index
            recs.row[part] = np.arange(sizes[index])
            recs.local[part] = z["local"]
            recs.yx[part, 0], recs.yx[part, 1] = z["cy"], z["cx"]
            recs.area[part] = z["area"]
            recs.bbox[part] = np.asarray(z["bbox"]).reshape(-1, 4)
            recs.owned[part] = z["owned"]
            info = dict(zip([str(k) for k in z["info_keys"]], z["info_values"].tolist(),
                            strict=True))
            b = recs.bbox[part]
            crosses = ((b[:, 0] < core[0]) | (b[:, 1] < core[1]) | (b[:, 2] > core[2])
                       | (b[:, 3] > core[3]))
            seam = np.flatnonzero(~recs.owned[part] | crosses
                                  | (_seam_distance(recs.yx[part], job.block) <= reach))
            if len(seam):  # copied out: the tile's whole mask buffer is dropped
                flat, offsets = z["mask_flat"], z["mask_offsets"]
                seam_parts.append((seam + base, offsets[seam + 1] - offsets[seam],
                                   np.concatenate([flat[offsets[r]:offsets[r + 1]]
                                                   for r in seam.tolist()])))
                del flat
        recs.dropped_large += int(info.get("dropped_large", 0))
        base += sizes[index]
    recs.masks = SeamMasks(seam_parts)
    return recs


def _overlap(recs: Records, i: int, j: int) -> float:
    """|A ∩ B| / min(|A|, |B|) of two nucleus masks (level-0 coordinates)."""
    ay0, ax0, ay1, ax1 = recs.bbox[i]
    by0, bx0, by1, bx1 = recs.bbox[j]
    y0, x0, y1, x1 = max(ay0, by0), max(ax0, bx0), min(ay1, by1), min(ax1, bx1)
    if y0 >= y1 or x0 >= x1:
        return 0.0
    ma = recs.mask(i)[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
    mb = recs.mask(j)[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    return float(np.count_nonzero(ma & mb)) / float(min(recs.area[i], recs.area[j]))


def plan(recs: Records, search_radius: float, block: int) -> MergePlan:
    """Reconcile seams and order the kept nuclei (deterministic; see module docstring).

    Only nuclei within ``search_radius`` of a core edge (a multiple of ``block``) can be
    claimed twice; the duplicate search looks at those only, so it stays cheap on slides
    with hundreds of thousands of nuclei.
    """
    yx, owned = recs.yx, recs.owned
    keep = owned.copy()
    own_idx = np.flatnonzero(owned & (_seam_distance(yx, block) < search_radius))
    duplicates = 0
    if len(own_idx) > 1:
        tree = cKDTree(yx[own_idx])
        for p, q in sorted(tree.query_pairs(search_radius)):
            i, j = own_idx[p], own_idx[q]  # i < j: records are sorted by (tile, row)
            if recs.tile[i] == recs.tile[j] or not keep[i] or not keep[j]:
                continue
            if _overlap(recs, i, j) >= 0.5:
                keep[j] = False
                duplicates += 1
    adopted = 0
    # a candidate lies within claim_margin (< search_radius) of an internal core edge, so
    # the kept nuclei near it lie within 2 x search_radius of one: index only those
    kept_idx = np.flatnonzero(keep & (_seam_distance(yx, block) <= 2 * search_radius))
    tree = cKDTree(yx[kept_idx]) if len(kept_idx) else None
    extra: list[int] = []
    for c in np.flatnonzero(~owned):
        near = list(kept_idx[tree.query_ball_point(yx[c], search_radius)]) if tree else []
        near += [e for e in extra if np.hypot(*(yx[e] - yx[c])) <= search_radius]
        if all(_overlap(recs, int(c), int(k)) < 0.5 for k in near):
            keep[c] = True
            extra.append(int(c))
            adopted += 1
    sel = np.flatnonzero(keep)
    sel = sel[np.lexsort((recs.local[sel], recs.tile[sel]))]
    return MergePlan(
        rec=sel, tile=recs.tile[sel], row=recs.row[sel], local=recs.local[sel],
        cy=yx[sel, 0].copy(), cx=yx[sel, 1].copy(), area=recs.area[sel],
        bbox=recs.bbox[sel].reshape(-1, 4), duplicates_removed=duplicates,
        orphans_adopted=adopted,
    )


class TileMasks:
    """Mask crops of any record: seam masks from memory, others from one tile file at a
    time (the last one read is cached: callers ask in (tile, row) order)."""

    def __init__(self, job: TileJob, recs: Records) -> None:
        self._dir, self._grid, self._recs = Path(job.tiles_dir), job.grid, recs
        self._tile: int | None = None
        self._flat = self._offsets = np.zeros(0)

    def get(self, rec: int) -> np.ndarray:
        m = self._recs.masks.get(rec, self._recs.shape(rec))
        if m is not None:
            return m
        tile, row = int(self._recs.tile[rec]), int(self._recs.row[rec])
        if tile != self._tile:
            t = self._grid.tile(tile)
            with np.load(tile_result.tile_path(self._dir, t.ty, t.tx), allow_pickle=False) as z:
                self._flat, self._offsets = z["mask_flat"], z["mask_offsets"]
            self._tile = tile
        y0, x0, y1, x1 = self._recs.bbox[rec]
        return self._flat[self._offsets[row]:self._offsets[row + 1]].reshape(
            int(y1 - y0), int(x1 - x0))


def paint(region: Region, stride: int, merge_plan: MergePlan, masks: TileMasks) -> np.ndarray:
    """uint32 labels of a level-0 ``region`` sampled every ``stride`` px (nearest neighbour:
    output pixel ``(i, j)`` is level-0 pixel ``(y0 + i * stride, x0 + j * stride)``)."""
    y0, x0, y1, x1 = region
    s = stride
    out = np.zeros((-(-(y1 - y0) // s), -(-(x1 - x0) // s)), np.uint32)
    b = merge_plan.bbox
    hit = np.flatnonzero((b[:, 0] < y1) & (b[:, 2] > y0) & (b[:, 1] < x1) & (b[:, 3] > x0))
    for k in hit.tolist():  # ascending id: deterministic if two masks ever overlap
        by0, bx0, by1, bx1 = (int(v) for v in b[k])
        fy = y0 + -(-(max(by0, y0) - y0) // s) * s  # first sampled row inside the box
        fx = x0 + -(-(max(bx0, x0) - x0) // s) * s
        ey, ex = min(by1, y1), min(bx1, x1)
        if fy >= ey or fx >= ex:
            continue
        sub = masks.get(int(merge_plan.rec[k]))[fy - by0:ey - by0:s, fx - bx0:ex - bx0:s]
        oy, ox = (fy - y0) // s, (fx - x0) // s
        out[oy:oy + sub.shape[0], ox:ox + sub.shape[1]][sub] = k + 1
    return out


def write_table(path: Path, merge_plan: MergePlan, job: TileJob, channels: int,
                metadata: dict[str, str]) -> None:
    """``nuclei.parquet``: one row per nucleus, one row group per tile (its statistics read
    from that tile's file only); schema version in the file metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    grid = job.grid
    fields = [("id", pa.uint32()), ("x", pa.float64()), ("y", pa.float64()),
              ("area", pa.int64()), ("tile", pa.int32()), ("tile_y", pa.int32()),
              ("tile_x", pa.int32())]
    fields += [(f"c{c}_{name}", pa.float64()) for c in range(channels) for name in STAT_NAMES]
    meta = {"omeflow.schema": "nuclei", "omeflow.schema_version": TABLE_SCHEMA_VERSION,
            **metadata}
    schema = pa.schema(fields, metadata={k: str(v) for k, v in meta.items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    bounds = np.flatnonzero(np.diff(merge_plan.tile)) + 1
    with pq.ParquetWriter(tmp, schema) as writer:
        for sel in np.split(np.arange(len(merge_plan)), bounds) if len(merge_plan) else []:
            tile = int(merge_plan.tile[sel[0]])
            t = grid.tile(tile)
            with np.load(tile_result.tile_path(Path(job.tiles_dir), t.ty, t.tx),
                         allow_pickle=False) as z:
                stats = z["stats"][merge_plan.row[sel]]
            cols: list[Any] = [
                (sel + 1).astype(np.uint32), merge_plan.cx[sel], merge_plan.cy[sel],
                merge_plan.area[sel].astype(np.int64), np.full(len(sel), tile, np.int32),
                np.full(len(sel), t.ty, np.int32), np.full(len(sel), t.tx, np.int32)]
            cols += [stats[:, c, s] for c in range(channels) for s in range(len(STAT_NAMES))]
            writer.write_table(pa.Table.from_arrays(
                [pa.array(c, type=f[1]) for c, f in zip(cols, fields, strict=True)],
                schema=schema))
    os.replace(tmp, path)


def level_blocks(shape_yx: tuple[int, int], block: int, level: int, full: tuple[int, int]
                 ) -> list[tuple[Region, Region]]:
    """(level-L block, its level-0 region) for the shard-sized blocks of one level."""
    from hpc_jobs import ngff

    s = 2 ** level
    out = []
    for y0, y1, x0, x1 in ngff.blocks(shape_yx, block):
        out.append(((y0, x0, y1, x1),
                    (y0 * s, x0 * s, min(y1 * s, full[0]), min(x1 * s, full[1]))))
    return out


def merge(job: TileJob, image_zarr: Path, table_path: Path, task_id: int, task_count: int,
          chunks: tuple[int, int], shards: tuple[int, int] | None, metadata: dict[str, str],
          log: Callable[[str], None] = print, skip: Collection[int] = (),
          level_shapes: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Run this task's share of the merge; return counts for the step summary.

    ``skip``: tiles not segmented (no tissue). ``level_shapes``: (y, x) of the image's
    pyramid levels, which the label pyramid copies (default: level 0 only).
    """
    from hpc_jobs.segmentation.labels import ensure_labels

    grid = job.grid
    radius = max(2.0 * job.diameter, 2.0 * job.claim_margin)
    recs = scan(job, set(skip), radius)
    mp = plan(recs, search_radius=radius, block=job.block)
    log(f"merge: {len(mp)} nuclei ({mp.duplicates_removed} seam duplicates removed, "
        f"{mp.orphans_adopted} seam orphans adopted; {len(recs.masks)} of {len(recs)} "
        "masks held in memory)")
    shapes = level_shapes or [(grid.height, grid.width)]
    arrays = ensure_labels(image_zarr, shapes, chunks, shards)
    masks = TileMasks(job, recs)
    mine = grid.for_task(task_id, task_count)
    for t in mine:
        y0, x0, y1, x1 = t.core
        arrays[0][y0:y1, x0:x1] = paint(t.core, 1, mp, masks)
    written = 0
    block = int((shards or chunks)[0])
    for level in range(1, len(arrays)):
        for i, (lb, region) in enumerate(level_blocks(shapes[level], block, level,
                                                      (grid.height, grid.width))):
            if i % task_count == task_id:
                arrays[level][lb[0]:lb[2], lb[1]:lb[3]] = paint(region, 2 ** level, mp, masks)
                written += 1
    log(f"merge: painted {len(mine)} tile cores and {written} blocks of {len(arrays) - 1} "
        f"lower level(s) into {image_zarr / 'labels' / 'nuclei'}")
    if task_id == 0:
        write_table(table_path, mp, job, job.shape[0], metadata)
        log(f"merge: wrote {table_path}")
    if recs.dropped_large:
        log(f"merge: WARNING {recs.dropped_large} objects larger than the halo were dropped; "
            f"raise halo above {job.halo}")
    return {"nuclei": len(mp), "duplicates_removed": mp.duplicates_removed,
            "orphans_adopted": mp.orphans_adopted, "dropped_large": recs.dropped_large,
            "cores_written": len(mine), "label_levels": len(arrays),
            "seam_masks_held": len(recs.masks)}
