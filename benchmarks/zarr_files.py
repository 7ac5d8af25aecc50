"""Files per image and write time: sharded (omeflow layout) vs unsharded Zarr, same image.

Writes the same synthetic image (default 8192 x 8192 x 2 uint16, chunks 1024, full pyramid)
twice, block-parallel like ``export_zarr``: once with shards ``(1, 2048, 2048)`` (the omeflow
layout) and once with no shards (one file per chunk). Prints files, bytes and seconds of each
and the ratios, measured in one run.

    .venv/bin/python benchmarks/zarr_files.py [--size 8192] [--channels 2] [--workers 2]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from synthetic_pixels import image_args, synthetic_block  # noqa: E402  (benchmarks/ is on sys.path)
from zarr.codecs import BloscCodec

from hpc_jobs import ngff
from hpc_jobs.steps.export_zarr import run_blocks


def source(size: int, channels: int, workers: int, path: Path) -> zarr.Array:
    """The pixels, generated once into a scratch array so both writes copy the same data."""
    arr = zarr.create_array(
        str(path), shape=(channels, size, size), dtype="uint16", chunks=(1, 2048, 2048),
        compressors=None,
    )

    def gen(blk: tuple[int, int, int, int]) -> int:
        arr[:, blk[0] : blk[1], blk[2] : blk[3]] = np.stack(
            [synthetic_block(c, *blk) for c in range(channels)]
        )
        return 0

    run_blocks(ngff.blocks((size, size), 2048), gen, lambda b: None, workers)
    return arr


def write_image(src: zarr.Array, path: Path, sharded: bool, workers: int) -> float:
    """Copy ``src`` + its mean pyramid into a new NGFF group; seconds taken."""
    channels, ny, nx = src.shape
    t0 = time.perf_counter()
    if sharded:
        group = ngff.create_image(
            path, size_c=channels, shape_yx=(ny, nx), dtype="uint16",
            channel_names=[f"c{i}" for i in range(channels)],
        )
    else:  # same metadata, codecs and chunks; no sharding codec
        group = zarr.create_group(str(path), zarr_format=3)
        for level, shape in enumerate(ngff.level_shapes((ny, nx))):
            group.create_array(
                str(level), shape=(channels, *shape), dtype="uint16", chunks=(1, 1024, 1024),
                compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=2)],
                fill_value=0, dimension_names=("c", "y", "x"),
            )
    levels = len(ngff.level_shapes((ny, nx)))
    block = ngff.DEFAULT_BLOCK
    for level in range(levels):
        dst = group[str(level)]
        prev = src if level == 0 else group[str(level - 1)]

        def task(blk: tuple[int, int, int, int], dst=dst, prev=prev, level=level) -> int:
            if level == 0:
                data = np.asarray(prev[:, blk[0] : blk[1], blk[2] : blk[3]])
            else:
                y0, y1, x0, x1 = ngff.source_region(blk, tuple(prev.shape[1:]))
                data = ngff.downsample_mean(np.asarray(prev[:, y0:y1, x0:x1]))
            dst[:, blk[0] : blk[1], blk[2] : blk[3]] = data
            return data.nbytes

        run_blocks(ngff.blocks(tuple(dst.shape[1:]), block), task, lambda b: None, workers)
    return time.perf_counter() - t0


def main() -> None:
    args = image_args(__doc__.split("\n")[0])
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = source(args.size, args.channels, args.workers, Path(tmp) / "src.zarr")
        results = {}
        for sharded in (True, False):  # and once more each, to even out cache effects
            for attempt in range(2):
                path = Path(tmp) / f"{'sharded' if sharded else 'unsharded'}-{attempt}.zarr"
                seconds = write_image(src, path, sharded, args.workers)
                files = [p for p in path.rglob("*") if p.is_file()]
                results.setdefault(sharded, []).append(
                    (seconds, len(files), sum(p.stat().st_size for p in files))
                )
        for sharded, runs in results.items():
            best = min(r[0] for r in runs)
            _, files, nbytes = runs[-1]
            print(f"{'sharded  ' if sharded else 'unsharded'}: {files:5d} files "
                  f"{nbytes / 2**20:7.1f} MiB, write {best:.2f}s (best of {len(runs)})")
        (ts, fs, bs), (tu, fu, bu) = (
            (min(r[0] for r in results[k]), *results[k][-1][1:]) for k in (True, False)
        )
        print(f"files unsharded / sharded: {fu / fs:.2f}; write time sharded / unsharded: "
              f"{ts / tu:.2f}; bytes sharded / unsharded: {bs / bu:.3f} "
              f"({args.channels}x{args.size}x{args.size}, workers={args.workers})")


if __name__ == "__main__":
    main()
