"""Per-nucleus window statistics: the original CellDetector measurement.

For every nucleus and channel: mean, median, variance (population, ddof=0) and skewness
(biased, as ``scipy.stats.skew``) of the pixels in a ``window`` x ``window`` square centred
on the nucleus centroid (rounded to the nearest pixel), clipped at the image border.
"""

from __future__ import annotations

import numpy as np

STAT_NAMES: tuple[str, ...] = ("mean", "median", "var", "skew")


def window_bounds(cy: float, cx: float, window: int, shape: tuple[int, int]
                  ) -> tuple[int, int, int, int]:
    """Level-0 (y0, x0, y1, x1) of the window around a centroid, clipped to ``shape``."""
    half = window // 2
    y, x = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
    return (max(0, y - half), max(0, x - half), min(shape[0], y + half + 1),
            min(shape[1], x + half + 1))


def window_stats(pixels: np.ndarray, origin: tuple[int, int], centroids: np.ndarray,
                 window: int, image_shape: tuple[int, int]) -> np.ndarray:
    """Statistics array (n, channels, 4) for ``centroids`` (n, 2: y, x) in level-0 px.

    ``pixels`` (channels, h, w) is a region of the image whose top-left corner is ``origin``;
    it must contain every (clipped) window.
    """
    n, c = len(centroids), pixels.shape[0]
    out = np.zeros((n, c, len(STAT_NAMES)), np.float64)
    oy, ox = origin
    for i, (cy, cx) in enumerate(centroids):
        y0, x0, y1, x1 = window_bounds(cy, cx, window, image_shape)
        if y0 < oy or x0 < ox or y1 > oy + pixels.shape[1] or x1 > ox + pixels.shape[2]:
            raise ValueError(f"window around ({cy:.1f}, {cx:.1f}) leaves the pixels read")
        block = pixels[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox].reshape(c, -1).astype(np.float64)
        mean = block.mean(axis=1)
        dev = block - mean[:, None]
        m2 = (dev * dev).mean(axis=1)
        m3 = (dev * dev * dev).mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            skew = np.where(m2 > 0, m3 / np.power(m2, 1.5), 0.0)
        out[i, :, 0] = mean
        out[i, :, 1] = np.median(block, axis=1)
        out[i, :, 2] = m2
        out[i, :, 3] = skew
    return out
