"""Positive cells per mm² in each tissue ROI (holes subtracted): the writeback's densities.

Regions are :func:`hpc_jobs.ecdf_core.tissue_regions` (``tissue_`` shapes minus the ``hole_``
shapes meeting them, clipped to the image: the same rule as the eCDF). A nucleus belongs to a
region when its centre lies inside it; nucleus coordinates are pixel indices, whose centres
lie at ``index + 0.5`` in ROI coordinates (the convention of ``ecdf_core.rasterize``).
Areas come from the polygons and the physical pixel size (µm, from the image store).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from hpc_jobs.stores.base import ImageInfo, Roi

#: Columns of the densities CSV, in order.
COLUMNS = ("roi_id", "name", "cells", "positives", "area_px", "area_mm2", "positives_per_mm2")


class PixelSizeMissing(ValueError):
    """The image has no physical pixel size, so no area in mm²."""


@dataclass(frozen=True)
class RegionDensity:
    """Counts and density of one tissue region."""

    roi_id: int
    name: str
    #: Nuclei whose centre lies in the region (holes excluded), and the positive ones.
    cells: int
    positives: int
    area_px: float
    area_mm2: float
    positives_per_mm2: float

    def row(self) -> dict[str, object]:
        return asdict(self)


def mm2_per_px(info: ImageInfo) -> float:
    """Area of one level-0 pixel in mm²; :class:`PixelSizeMissing` names the fix."""
    if not info.pixel_size_um or min(info.pixel_size_um) <= 0:
        raise PixelSizeMissing(
            f"image {info.image_id} ({info.name!r}) has no physical pixel size, so densities "
            "per mm² cannot be computed: set the pixel size in OMERO (or the OME metadata of "
            "the file before import), or run writeback with densities=false"
        )
    px, py = info.pixel_size_um
    return float(px) * float(py) * 1e-6


def region_densities(info: ImageInfo, rois: Sequence[Roi], x: np.ndarray, y: np.ndarray,
                     positive: np.ndarray) -> list[RegionDensity]:
    """One :class:`RegionDensity` per tissue ROI from nucleus centres ``x``, ``y`` (level-0
    pixel indices) and their ``positive`` flags. Raises ``ecdf_core.RegionError`` without a
    tissue ROI and :class:`PixelSizeMissing` without a pixel size."""
    import shapely
    from shapely.geometry import box

    from hpc_jobs.ecdf_core import tissue_regions

    scale = mm2_per_px(info)
    regions = tissue_regions(rois, info.size_x, info.size_y)
    frame = box(0, 0, info.size_x, info.size_y)
    cx = np.asarray(x, dtype=np.float64) + 0.5
    cy = np.asarray(y, dtype=np.float64) + 0.5
    pos = np.asarray(positive, dtype=bool)
    out = []
    for r in regions:
        geom = r.geometry.intersection(frame)
        inside = shapely.contains_xy(geom, cx, cy) if len(cx) else np.zeros(0, dtype=bool)
        area_px = float(geom.area)
        area_mm2 = area_px * scale
        positives = int(np.count_nonzero(inside & pos))
        out.append(RegionDensity(
            roi_id=r.roi_id, name=r.name, cells=int(np.count_nonzero(inside)),
            positives=positives, area_px=area_px, area_mm2=area_mm2,
            positives_per_mm2=positives / area_mm2 if area_mm2 > 0 else 0.0,
        ))
    return out
