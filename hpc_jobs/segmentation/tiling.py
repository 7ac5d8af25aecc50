"""Shard-aligned tiles with a halo, and which tile owns a nucleus.

Layout
------
The level-0 plane (y, x) is cut into *cores* of ``block`` x ``block`` pixels aligned with
the Zarr shards (``block`` must be a multiple of the shard size, so a core is a whole number
of shards and no two writers ever touch one shard). Cellpose runs on the core grown by a
``halo`` on every side (clipped at the image border): the *window*.

Ownership (each nucleus kept exactly once)
------------------------------------------
A nucleus belongs to the tile whose core contains its centroid (centroid rounded down to a
pixel). The halo must exceed the largest nucleus radius (default 64 px vs. radius ~10), so a
nucleus whose centroid lies in a core is entirely inside that tile's window and is
segmented with full context. A mask that touches the window's *outer* edge (not the image
border) is cut off and its centroid is biased: the tile discards it. For a nucleus owned by
the tile this can only happen when the object is larger than the halo; such objects are
counted (``dropped_large``) and logged, and the fix is a larger ``halo``.

Two tiles segment a nucleus near their common core edge independently, with slightly
different context (Cellpose places its own 224 px sub-tiles in each window; the intensity
range is the same for all tiles, see :mod:`.normalise`), so
its mask, hence its centroid, can differ by a fraction of a pixel: it might be claimed by
both tiles or by neither. Each tile therefore also records *candidates*: nuclei whose
centroid lies outside its core but within ``claim_margin`` px of it. The merge
(:mod:`.merge`) keeps one of two overlapping owned nuclei from different tiles (duplicate)
and adopts a candidate that no owned nucleus overlaps (orphan), deterministically.

Compared with cellpose's ``contrib/distributed_segmentation.distributed_eval``
--------------------------------------------------------------------------------
``distributed_eval`` segments overlapping blocks on a dask cluster, then relabels: it
trims/keeps the overlaps, finds label pairs that touch across block faces, builds a graph
of "same object" pairs and merges connected components into one global label, rewriting
every block. That needs a dask scheduler alive for the whole job, a global union-find step,
and a second pass that rewrites all blocks; merging by adjacency can also glue two touching
nuclei from different blocks into one object. Centroid ownership needs no communication
between tiles at all: each Slurm array task segments its tiles and writes self-contained
results; ownership is a pure function of the centroid, the merge touches only the thin
seam zones, and every object keeps the mask of a single segmentation (never a union of two
half-masks). Tiles are independently resumable files, which fits a job array on a shared
cluster better than a long-lived dask cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil


@dataclass(frozen=True)
class Tile:
    """One tile: grid position, core (owned pixels) and window (pixels Cellpose sees)."""

    index: int
    ty: int
    tx: int
    core: tuple[int, int, int, int]  # y0, x0, y1, x1 (half-open), level-0 px
    window: tuple[int, int, int, int]  # core grown by the halo, clipped to the image

    @property
    def name(self) -> str:
        return f"{self.ty}_{self.tx}"

    def in_core(self, y: float, x: float) -> bool:
        """Whether a centroid belongs to this tile's core (floor semantics)."""
        y0, x0, y1, x1 = self.core
        return y0 <= int(y // 1) < y1 and x0 <= int(x // 1) < x1

    def near_core(self, y: float, x: float, margin: float) -> bool:
        """Whether a centroid lies within ``margin`` px of the core (or inside it)."""
        y0, x0, y1, x1 = self.core
        return y0 - margin <= y < y1 + margin and x0 - margin <= x < x1 + margin


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one (y, x) plane."""

    height: int
    width: int
    block: int
    halo: int

    def __post_init__(self) -> None:
        if self.block <= 0 or self.halo < 0:
            raise ValueError(f"block_size must be > 0 and halo >= 0 (got {self.block}, "
                             f"{self.halo})")

    @property
    def ny(self) -> int:
        return ceil(self.height / self.block)

    @property
    def nx(self) -> int:
        return ceil(self.width / self.block)

    def __len__(self) -> int:
        return self.ny * self.nx

    def tile(self, index: int) -> Tile:
        """Tile ``index`` (row-major)."""
        ty, tx = divmod(index, self.nx)
        y0, x0 = ty * self.block, tx * self.block
        y1, x1 = min(y0 + self.block, self.height), min(x0 + self.block, self.width)
        h = self.halo
        window = (max(0, y0 - h), max(0, x0 - h), min(self.height, y1 + h),
                  min(self.width, x1 + h))
        return Tile(index, ty, tx, (y0, x0, y1, x1), window)

    def tiles(self) -> list[Tile]:
        return [self.tile(i) for i in range(len(self))]

    def owner(self, y: float, x: float) -> int:
        """Index of the tile whose core contains the centroid (y, x)."""
        ty = min(max(int(y // self.block), 0), self.ny - 1)
        tx = min(max(int(x // self.block), 0), self.nx - 1)
        return ty * self.nx + tx

    def for_task(self, task_id: int, task_count: int) -> list[Tile]:
        """Tiles of array task ``task_id`` of ``task_count``: tile i when i % count == id."""
        if task_count < 1 or not 0 <= task_id < task_count:
            raise ValueError(f"array task {task_id} of {task_count} is out of range")
        return [self.tile(i) for i in range(len(self)) if i % task_count == task_id]


def check_alignment(block: int, shard: tuple[int, int]) -> None:
    """Refuse a block size that would let two writers share a shard (error names the fix)."""
    sy, sx = shard
    if block % sy or block % sx:
        raise ValueError(
            f"block_size={block} is not a multiple of the Zarr shard size {sy}x{sx}; "
            f"use block_size={max(sy, sx)} (or a multiple) so each tile writes whole shards"
        )
