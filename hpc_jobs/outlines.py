"""Nucleus outlines from the level-0 label image, as polygons in ROI coordinates.

The outline of nucleus ``id`` is the longest iso-contour at 0.5 of ``labels == id`` in a window
around its centre (grown until the nucleus does not touch the window's edge), simplified to
within half a pixel. Pixel ``i`` covers ``[i, i + 1)`` in ROI coordinates, so contour points
(in pixel-index coordinates) are shifted by 0.5.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import zarr

#: First half-width of the window read around a nucleus; doubled up to :data:`MAX_RADIUS`.
START_RADIUS = 32
MAX_RADIUS = 1024

Outline = tuple[tuple[float, float], ...]


def labels_level0(image_dir: Path) -> zarr.Array:
    """The level-0 nuclei label array; a missing one names the fix (segment_nuclei)."""
    import zarr

    from hpc_jobs import ngff

    path = ngff.image_zarr_path(Path(image_dir)) / "labels" / "nuclei" / "0"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run segment_nuclei for this image first "
                                "(celldetector_preprocess)")
    return zarr.open_array(str(path), mode="r")


def outline_in(mask: np.ndarray, y0: int, x0: int) -> Outline | None:
    """The outline of ``mask`` (a window whose top-left pixel is ``(y0, x0)``)."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return None
    c = approximate_polygon(max(contours, key=len), tolerance=0.5)
    if len(c) > 1 and np.array_equal(c[0], c[-1]):
        c = c[:-1]
    if len(c) < 3:
        return None
    # -1 undoes the padding, +0.5 moves pixel indices to ROI coordinates
    return tuple((float(x0 + col - 0.5), float(y0 + row - 0.5)) for row, col in c)


def nucleus_outlines(image_dir: Path, ids: Sequence[int], xs: Sequence[float],
                     ys: Sequence[float]) -> Iterator[tuple[int, Outline | None]]:
    """``(id, outline or None)`` for each nucleus, in the order given."""
    labels = labels_level0(image_dir)
    height, width = int(labels.shape[0]), int(labels.shape[1])
    for nid, x, y in zip(ids, xs, ys, strict=True):
        nid, cx, cy = int(nid), int(round(float(x))), int(round(float(y)))
        r = START_RADIUS
        while True:
            y0, y1 = max(0, cy - r), min(height, cy + r + 1)
            x0, x1 = max(0, cx - r), min(width, cx + r + 1)
            mask = np.asarray(labels[y0:y1, x0:x1]) == nid
            touches = (mask[0].any() and y0 > 0) or (mask[-1].any() and y1 < height) or \
                (mask[:, 0].any() and x0 > 0) or (mask[:, -1].any() and x1 < width)
            if not touches or r >= MAX_RADIUS:
                break
            r *= 2
        yield nid, (outline_in(mask, y0, x0) if mask.any() else None)
