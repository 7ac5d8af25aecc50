"""eCDF throughput vs a decode-and-bincount lower bound on the same Zarr.

Creates a synthetic OME-Zarr (default 8192 x 8192 x 2 uint16, chunks 1024, shards 2048) with
numpy + zarr, draws a large irregular tissue polygon (2000 vertices) with two holes plus a
second smaller ROI, then measures in one run:

- lower bound: read every shard-block of level 0 and ``np.bincount`` every channel (no mask);
- eCDF: :func:`hpc_jobs.ecdf_core.region_histograms` over the same array, blocks and workers;

and prints both throughputs (Mpx/s of channel-pixels read) and their ratio.

    .venv/bin/python benchmarks/ecdf_throughput.py [--size 8192] [--channels 2] [--workers 2]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon
from synthetic_pixels import image_args, synthetic_block  # noqa: E402  (benchmarks/ is on sys.path)

from hpc_jobs import ecdf_core, ngff
from hpc_jobs.steps.export_zarr import run_blocks


def make_zarr(path: Path, size: int, channels: int, workers: int) -> object:
    """The synthetic image as an omeflow OME-Zarr (level 0 only is needed here); shards of
    2048 px (the export's default), or one shard of ``size`` for a smaller image."""
    block = min(ngff.DEFAULT_BLOCK, size)
    if size % block:
        raise SystemExit(f"--size {size}: use a multiple of {block} (the throughput counts "
                         "whole blocks)")
    group = ngff.create_image(
        path, size_c=channels, shape_yx=(size, size), dtype="uint16",
        channel_names=[f"c{i}" for i in range(channels)],
        chunk=min(ngff.DEFAULT_CHUNK, block), block=block,
    )
    arr = group["0"]

    def write(blk: tuple[int, int, int, int]) -> int:
        data = np.stack([synthetic_block(c, *blk) for c in range(channels)])
        arr[:, blk[0] : blk[1], blk[2] : blk[3]] = data
        return data.nbytes

    run_blocks(ngff.blocks((size, size), block), write, lambda b: None, workers)
    return arr


def regions(size: int) -> list[tuple[object, object | None]]:
    """A wobbly tissue outline over most of the image with two holes, and a small ROI."""
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    r = 0.45 * size * (1 + 0.08 * np.sin(7 * t) + 0.03 * np.sin(31 * t))
    tissue = Polygon(np.c_[size / 2 + r * np.cos(t), size / 2 + 0.9 * r * np.sin(t)] + 0.37)
    holes = shapely.union_all(
        [
            shapely.Point(size * 0.4, size * 0.45).buffer(size * 0.06, 64),
            shapely.Point(size * 0.62, size * 0.6).buffer(size * 0.04, 64),
        ]
    )
    corners = [(0.05, 0.02), (0.3, 0.05), (0.1, 0.2)]
    small = Polygon([(x * size, y * size) for x, y in corners])
    return [(tissue, holes), (small, None)]


def lower_bound(arr, block: int, workers: int) -> tuple[float, int]:
    """Seconds to read every block and bincount every channel (no mask); pixels read."""
    channels = arr.shape[0]

    def one(blk: tuple[int, int, int, int]) -> int:
        data = np.asarray(arr[:, blk[0] : blk[1], blk[2] : blk[3]])
        for c in range(channels):
            np.bincount(data[c].ravel(), minlength=65536)
        return data.size

    t0 = time.perf_counter()
    px = run_blocks(ngff.blocks(tuple(arr.shape[1:]), block), one, lambda b: None, workers)
    return time.perf_counter() - t0, px


def main() -> None:
    args = image_args(__doc__.split("\n")[0])
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        arr = make_zarr(Path(tmp) / "image.zarr", args.size, args.channels, args.workers)
        print(f"wrote {args.channels}x{args.size}x{args.size} uint16 in "
              f"{time.perf_counter() - t0:.1f}s ({ngff.describe_layout(arr)})")
        block = int(arr.shards[1])
        geoms = regions(args.size)
        # warm the page cache / codecs once so both measurements see the same state
        lower_bound(arr, block, args.workers)
        t_lb, px_lb = lower_bound(arr, block, args.workers)

        def read_block(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            return np.asarray(arr[:, y0:y1, x0:x1])

        t0 = time.perf_counter()
        hists, stats = ecdf_core.region_histograms(
            read_block, tuple(arr.shape[1:]), arr.dtype, geoms, args.channels, block,
            args.workers,
        )
        t_ecdf = time.perf_counter() - t0
        px_ecdf = stats["blocks"] * block * block * args.channels  # all blocks are full-size
        region_px = int(hists[:, 0].sum())
        print(f"lower bound (decode + bincount, no mask): {t_lb:.2f}s "
              f"{px_lb / t_lb / 1e6:.1f} Mpx/s over {px_lb / 1e6:.0f} Mpx")
        print(f"eCDF ({len(geoms)} ROIs, {stats['blocks']} blocks, {stats['blocks_full']} "
              f"block-ROI pairs fully inside, {region_px / 1e6:.1f} Mpx in regions per channel): "
              f"{t_ecdf:.2f}s {px_ecdf / t_ecdf / 1e6:.1f} Mpx/s")
        print(f"ratio eCDF / lower-bound throughput: {(px_ecdf / t_ecdf) / (px_lb / t_lb):.2f} "
              f"(workers={args.workers})")


if __name__ == "__main__":
    main()
