"""One DAPI normalisation range per image, so that a nucleus's mask does not depend on the
tile it falls in.

Cellpose normalises every image it is given to its own 1st..99th percentiles. Run per tile,
that makes masks depend on the block size (an engineering parameter). Instead the step
computes the 1st and 99th percentiles of DAPI once per image and passes them to every tile
(Cellpose 3: ``normalize={"lowhigh": [low, high]}``).

Source: the exact histogram of DAPI over the tissue regions (holes excluded; the whole plane
when the image has no tissue ROI), computed with :func:`hpc_jobs.ecdf_core.region_histograms`
(the eCDF's own code) on the finest pyramid level with at most :data:`MAX_PIXELS` pixels:
level 0, hence exact, for images up to 8192 x 8192, a bounded read for larger ones. It is
computed here rather than read from the ``ecdf`` step's output so the range never depends on
whether, or at which level, the eCDF ran before, and the DAG order stays free; reading at
most 64 Mpx of one channel costs seconds, next to minutes of Cellpose per tile.

Percentiles are taken of the raw values (the inverse eCDF, an integer) and then transformed
like the pixels (``log(1 + v)`` when ``log_transform``): the transform is monotonic, so this
equals the percentile of the transformed values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_jobs.segmentation.tissue import RegionGeometry

#: The finest pyramid level with at most this many pixels is histogrammed (8192 x 8192).
MAX_PIXELS = 1 << 26
LOW_Q, HIGH_Q = 0.01, 0.99


@dataclass(frozen=True)
class NormRange:
    """The DAPI range mapped to 0..1 for every tile, in the values Cellpose is given."""

    low: float
    high: float
    raw_low: int
    raw_high: int
    level: int
    source: str  # "tissue" or "image"
    pixels: int

    def metadata(self) -> dict[str, str]:
        """Entries of the nuclei table's Parquet metadata."""
        return {"dapi_norm_low": repr(self.low), "dapi_norm_high": repr(self.high),
                "dapi_norm_raw_low": str(self.raw_low), "dapi_norm_raw_high": str(self.raw_high),
                "dapi_norm_percentiles": f"{LOW_Q * 100:g},{HIGH_Q * 100:g}",
                "dapi_norm_level": str(self.level), "dapi_norm_source": self.source}


def choose_level(shapes: Sequence[tuple[int, int]]) -> int:
    """The finest level with at most :data:`MAX_PIXELS` pixels (the coarsest if none)."""
    for level, (ny, nx) in enumerate(shapes):
        if ny * nx <= MAX_PIXELS:
            return level
    return len(shapes) - 1


def transform(value: float, log_transform: bool) -> float:
    """A raw DAPI value as the tiles see it (float32 ``log1p``, like ``model.preprocess``)."""
    v = np.float32(value)
    return float(np.log1p(v) if log_transform else v)


def dapi_range(image_zarr: Path, dapi_channel: int, regions: Sequence[RegionGeometry],
               log_transform: bool) -> NormRange:
    """The slide-wide normalisation range of the DAPI channel (see the module docstring)."""
    from shapely.geometry import box

    from hpc_jobs import ecdf_core, ngff

    group = ngff.open_image(image_zarr)
    datasets = ngff.multiscale(group)["datasets"]
    shapes = [tuple(int(s) for s in group[d["path"]].shape[-2:]) for d in datasets]
    level = choose_level(shapes)
    arr = group[datasets[level]["path"]]
    ny, nx = shapes[level]
    blk = int((arr.shards or arr.chunks)[-1])

    def read_block(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(arr[dapi_channel:dapi_channel + 1, y0:y1, x0:x1])

    def histogram(geoms: Sequence[RegionGeometry]) -> np.ndarray:
        hists, _ = ecdf_core.region_histograms(read_block, (ny, nx), arr.dtype, geoms, 1, blk)
        return hists.sum(axis=0)[0]

    offset, _ = ecdf_core.histogram_bins(arr.dtype)
    scale = 2.0 ** -level
    source = "tissue"
    hist = histogram([(ecdf_core.scale_geometry(t, scale), ecdf_core.scale_geometry(h, scale))
                      for t, h in regions]) if regions else np.zeros(0, np.int64)
    if int(hist.sum()) == 0:  # no tissue ROI, or none of it inside the image
        source = "image"
        hist = histogram([(box(0, 0, nx, ny), None)])
    lo = ecdf_core.quantile_from_hist(hist, LOW_Q, offset)
    hi = ecdf_core.quantile_from_hist(hist, HIGH_Q, offset)
    if lo is None or hi is None:
        raise ValueError(f"{image_zarr} level {level} has no pixels; rerun export_zarr")
    if hi <= lo:  # a flat image: any non-empty range; Cellpose finds nothing there anyway
        hi = lo + 1
    return NormRange(transform(lo, log_transform), transform(hi, log_transform), lo, hi,
                     level, source, int(hist.sum()))
