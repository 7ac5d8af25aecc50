"""Peak memory of the segmentation merge on a synthetic slide with many nuclei.

Writes tile result files as the tiles phase does (``segmentation/tiles/<ty>_<tx>.npz``): one
nucleus per 30-px grid cell (disks of radius 7-10 px, so ~0.3-0.4 KB of mask each), every
tile recording its own nuclei and, as seam candidates, its neighbours' nuclei within the claim
margin. Then runs the merge phase (:func:`hpc_jobs.segmentation.merge.merge`: plan, label
pyramid, nuclei table) in a fresh child process and prints its peak RSS, next to the
child's RSS after imports only and the total size of all masks (what a merge that loads
every tile's masks holds at least).

Usage::

    .venv/bin/python benchmarks/merge_memory.py                 # 10^6 nuclei, 2048-px tiles
    .venv/bin/python benchmarks/merge_memory.py --quick         # 2 x 10^4 nuclei: seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_jobs import ngff  # noqa: E402
from hpc_jobs.segmentation import tile_result  # noqa: E402
from hpc_jobs.segmentation.run_tiles import TileJob  # noqa: E402

QUICK = {"nuclei": 20_000, "block": 512}
SPACING = 30
CHANNELS = 2


def _job(root: Path, side: int, block: int) -> TileJob:
    return TileJob(array_path=str(root / "image.zarr" / "0"), tiles_dir=str(root / "tiles"),
                   model_path="synthetic", model_sha256="0" * 64,
                   shape=(CHANNELS, side, side), block=block, halo=64)


def write_tiles(job: TileJob, n: int, seed: int) -> int:
    """Tile result files for ``n`` nuclei on a jittered grid; returns the mask bytes."""
    rng = np.random.default_rng(seed)
    per_row = math.ceil(math.sqrt(n))
    idx = np.arange(n)
    cy = SPACING / 2 + (idx // per_row) * SPACING + rng.uniform(-3, 3, n)
    cx = SPACING / 2 + (idx % per_row) * SPACING + rng.uniform(-3, 3, n)
    radius = rng.integers(7, 11, n)
    disks = {}
    for r in range(7, 11):
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disks[r] = (yy * yy + xx * xx <= r * r)
    iy, ix = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)
    m = job.claim_margin
    total = 0
    for t in job.grid.tiles():
        y0, x0, y1, x1 = t.core
        sel = np.flatnonzero((cy >= y0 - m) & (cy < y1 + m) & (cx >= x0 - m) & (cx < x1 + m))
        owned = (iy[sel] >= y0) & (iy[sel] < y1) & (ix[sel] >= x0) & (ix[sel] < x1)
        r = radius[sel]
        bbox = np.stack([iy[sel] - r, ix[sel] - r, iy[sel] + r + 1, ix[sel] + r + 1], axis=1)
        masks = [disks[int(v)].ravel() for v in r]
        offsets = np.zeros(len(sel) + 1, np.int64)
        offsets[1:] = np.cumsum([mk.size for mk in masks])
        area = np.array([int(disks[int(v)].sum()) for v in r], np.int64)
        res = tile_result.TileResult(
            tile=t.index, ty=t.ty, tx=t.tx, config_key=job.config_key(),
            local=np.arange(1, len(sel) + 1, dtype=np.int32),
            cy=iy[sel] + 0.0, cx=ix[sel] + 0.0, area=area, bbox=bbox, owned=owned,
            mask_flat=np.concatenate(masks) if masks else np.zeros(0, bool),
            mask_offsets=offsets, stats=rng.random((len(sel), CHANNELS, 4)), info={})
        tile_result.save(res, tile_result.tile_path(Path(job.tiles_dir), t.ty, t.tx))
        total += int(offsets[-1])
    return total


def child(args: argparse.Namespace) -> int:
    """The merge itself (or imports only, for the baseline), in its own process."""
    import pyarrow.parquet  # noqa: F401  (what the merge imports, in the baseline too)
    import zarr  # noqa: F401

    from hpc_jobs.segmentation.labels import ensure_labels  # noqa: F401
    from hpc_jobs.segmentation.merge import merge

    if args.child == "imports":
        return 0
    job = _job(args.workdir, args.side, args.block)
    chunk = args.block // 2
    shapes = ngff.level_shapes((args.side, args.side), stop_at=chunk)
    t = time.perf_counter()
    stages = []

    def log(msg: str) -> None:  # the peak so far at each stage the merge reports
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        stages.append(f"{msg.split(':')[1].split()[0]} {rss:.0f}")

    s = merge(job, args.workdir / "image.zarr", args.workdir / "nuclei.parquet", 0, 1,
              (chunk, chunk), (args.block, args.block), {}, log=log, level_shapes=shapes)
    s["stages"] = ", ".join(stages)
    s["merge_s"] = time.perf_counter() - t
    print(json.dumps(s))
    return 0


def run_child(args: argparse.Namespace, what: str) -> tuple[float, dict]:
    """Run ``child`` in a fresh interpreter; its peak RSS (MiB) and summary."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, "--workdir", str(args.workdir),
         "--side", str(args.side), "--block", str(args.block)],
        check=True, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak < before:  # ru_maxrss of children is the max over all of them so far
        peak = before
    return peak / 1024, (json.loads(out.stdout.strip().splitlines()[-1]) if what == "merge"
                         else {})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nuclei", type=int, default=1_000_000)
    ap.add_argument("--block", type=int, default=2048, help="tile core size (default 2048)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny run for CI: {' '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    ap.add_argument("--child", choices=["imports", "merge"], help=argparse.SUPPRESS)
    ap.add_argument("--side", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        vars(args).update(QUICK)
    keep = args.workdir is not None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge_memory_"))
    args.side = math.ceil(math.sqrt(args.nuclei)) * SPACING
    job = _job(args.workdir, args.side, args.block)
    t = time.perf_counter()
    mask_bytes = write_tiles(job, args.nuclei, args.seed)
    print(f"{args.nuclei} nuclei on {args.side}x{args.side} px, {len(job.grid)} tiles of "
          f"{args.block} px; all masks {mask_bytes / 2**20:.1f} MiB; tile files written in "
          f"{time.perf_counter() - t:.1f}s")
    # the imports-only baseline must run first: RUSAGE_CHILDREN keeps the maximum
    base, _ = run_child(args, "imports")
    peak, s = run_child(args, "merge")
    print(f"merge: {s['nuclei']} nuclei, {s['label_levels']} label levels, "
          f"{s['seam_masks_held']} seam masks held, {s['merge_s']:.1f}s")
    print(f"peak RSS [MiB] after each merge stage (plan, paint, table): {s['stages']}")
    used = max(1e-9, peak - base)
    print(f"peak RSS: merge {peak:.0f} MiB, imports only {base:.0f} MiB, merge - imports "
          f"{used:.0f} MiB = {used * 2**20 / max(1, args.nuclei):.0f} B per nucleus; "
          f"all masks / (merge - imports) = {mask_bytes / 2**20 / used:.2f}")
    if not keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
