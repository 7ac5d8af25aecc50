"""Reproducible tissue-like uint16 pixels for the Zarr benchmarks (no files, no truth)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

#: ``--quick``: a tiny image so CI checks that a benchmark still runs end to end (seconds).
QUICK_SIZE = 2048


def image_args(description: str) -> argparse.Namespace:
    """The options every Zarr benchmark takes: image size, channels, workers, scratch dir,
    and ``--quick`` (``--size`` 2048: prints the same lines in seconds, for CI)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    ap.add_argument("--quick", action="store_true", help=f"--size {QUICK_SIZE} (CI)")
    args = ap.parse_args()
    if args.quick:
        args.size = QUICK_SIZE
    return args


def synthetic_block(c: int, y0: int, y1: int, x0: int, x1: int, seed: int = 0) -> np.ndarray:
    """Smooth blobs + noise for block ``[y0:y1, x0:x1]`` of channel ``c``, same every run."""
    rng = np.random.default_rng([seed, c, y0, x0])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    base = 800 + 600 * np.sin(xx / (97 + 13 * c)) * np.cos(yy / 131) + 400 * np.sin(
        (xx + yy) / 53
    )
    return np.clip(base + rng.normal(0, 120, size=base.shape), 0, 65535).astype(np.uint16)
