"""Which tiles meet tissue: the tissue-only speed-up of ``segment_nuclei``.

Tissue regions are the image's ``tissue_`` ROIs minus its ``hole_`` shapes, built by
:func:`hpc_jobs.ecdf_core.tissue_regions` (the same rule as the eCDF). A tile is segmented
when its *window* (core + halo) contains the centre of at least one tissue pixel: a nucleus
whose centroid lies in tissue lies in its owner's core, hence in that window, so skipping
the other tiles never loses a nucleus inside tissue. Without any tissue ROI every tile is
segmented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hpc_jobs.segmentation.tiling import TileGrid

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from hpc_jobs.stores.base import Roi

#: (tissue, holes) of one region in level-0 pixels (x = column, y = row), as ``ecdf_core``.
RegionGeometry = tuple["BaseGeometry", "BaseGeometry | None"]


def tissue_geometries(rois: Sequence[Roi], width: int, height: int) -> list[RegionGeometry]:
    """``(tissue, holes)`` of every tissue region of the image; empty without tissue ROIs."""
    from hpc_jobs import ecdf_core

    try:
        regions = ecdf_core.tissue_regions(rois, width, height)
    except ecdf_core.RegionError:
        return []
    return [(r.tissue, r.holes) for r in regions if not r.tissue.is_empty]


def tiles_without_tissue(grid: TileGrid, regions: Sequence[RegionGeometry]) -> set[int]:
    """Indices of the tiles whose window holds no tissue pixel centre (holes excluded)."""
    if not regions:
        return set()
    import shapely
    from shapely.geometry import box

    shapes = []
    for tissue, holes in regions:
        shapes.append(tissue if holes is None else tissue.difference(holes))
    area = shapely.union_all(shapes)
    shapely.prepare(area)
    out = set()
    for t in grid.tiles():
        wy0, wx0, wy1, wx1 = t.window
        centres = box(wx0 + 0.5, wy0 + 0.5, wx1 - 0.5, wy1 - 0.5)  # hull of pixel centres
        if not area.intersects(centres):
            out.add(t.index)
    return out
