"""Tile decoding: omero-py's struct.unpack path vs numpy.frombuffer, one 2048 x 2048 uint16 tile.

The bytes are what OMERO's ``RawPixelsStore.getTile`` returns (big-endian). The "before" path
is omero-py's ``_PixelsWrapper.getTiles`` decode, step for step:
``struct.unpack('>%dH', raw)`` into a tuple, ``numpy.array(tuple, dtype)``, ``resize``. The
"after" path is :func:`hpc_jobs.stores.omero_pixels.decode_tile`
(``numpy.frombuffer(raw, '>u2')`` + one copy to native order). Prints the best time of each,
peak extra memory and the ratio; both results are checked equal first.

    .venv/bin/python benchmarks/omero_tile_decode.py [--quick] [--size 2048] [--repeat 5]
"""

from __future__ import annotations

import argparse
import struct
import time
import tracemalloc

import numpy as np

from hpc_jobs.stores.omero_pixels import decode_tile


def struct_path(raw: bytes, size: int) -> np.ndarray:
    """omero-py getTiles: unpack to a tuple of Python ints, then numpy.array, then resize."""
    converted = struct.unpack(f">{size * size}H", raw)
    plane = np.array(converted, np.uint16)
    plane.resize(size, size)
    return plane


def numpy_path(raw: bytes, size: int) -> np.ndarray:
    """omeflow: a big-endian view of the bytes, one copy into native order."""
    return decode_tile(raw, np.dtype("uint16"), size, size)


def measure(fn, raw: bytes, size: int, repeat: int) -> tuple[float, float]:
    """Best wall time (s) over ``repeat`` runs and peak traced memory (MB) of one run."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(raw, size)
        best = min(best, time.perf_counter() - t)
    tracemalloc.start()
    fn(raw, size)
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return best, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="tile edge (px)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per path (best counts)")
    ap.add_argument("--quick", action="store_true", help="one run per path")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 65535, size=(args.size, args.size), dtype=np.uint16)
    raw = tile.astype(">u2").tobytes()
    a, b = struct_path(raw, args.size), numpy_path(raw, args.size)
    assert np.array_equal(a, tile) and np.array_equal(b, tile), "decoders disagree"
    t_struct, m_struct = measure(struct_path, raw, args.size, repeat)
    t_numpy, m_numpy = measure(numpy_path, raw, args.size, repeat)
    print(f"tile {args.size}x{args.size} uint16 ({len(raw) / 1e6:.1f} MB), best of {repeat}")
    print(f"struct.unpack path : {t_struct * 1e3:9.2f} ms   peak {m_struct:8.1f} MB")
    print(f"numpy.frombuffer   : {t_numpy * 1e3:9.2f} ms   peak {m_numpy:8.1f} MB")
    ratio_t, ratio_m = t_struct / t_numpy, m_struct / m_numpy
    print(f"ratio (struct / numpy): time {ratio_t:.0f}x, memory {ratio_m:.0f}x")


if __name__ == "__main__":
    main()
