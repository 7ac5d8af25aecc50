"""Parallel efficiency of ``segment_nuclei`` inside one node: PEFF = T1 / (p * Tp).

Renders a synthetic slide (``--size`` px square, nuclei ~20 px), writes it as the export
step does (chunks 1024, shards 2048; smaller when ``--block`` is smaller), then for each p
in ``--procs`` runs the tiles phase with p worker processes x ``--threads`` torch threads
each (a fresh result folder per p), then the merge phase, and prints one table: T (tiles
phase wall time), speedup, PEFF, merge time, and the per-tile overhead split (model load
vs read / segment / post / write).

Usage::

    .venv/bin/python benchmarks/segment_peff.py --size 4096 --procs 1,2
    .venv/bin/python benchmarks/segment_peff.py --quick   # 512 px, block 256: seconds (CI)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_jobs import ngff  # noqa: E402
from hpc_jobs.config import SiteConfig  # noqa: E402
from hpc_jobs.protocol import Resources, Secrets  # noqa: E402
from hpc_jobs.steps import segment_nuclei  # noqa: E402
from hpc_jobs.steps.base import StepContext  # noqa: E402

#: ``--quick``: a tiny slide (4 tiles) so CI checks that the benchmark still runs end to end.
QUICK = {"size": 512, "block": 256, "procs": "1,2"}


def _context(root: Path, cpus: int) -> StepContext:
    return StepContext(job_dir=root / "jobs" / "bench", site=SiteConfig.local(root),
                       resources=Resources(cpus=cpus), secrets=Secrets())


def _write_image(ctx: StepContext, size: int, seed: int, block: int) -> int:
    """Render the slide and write it as ``export_zarr`` does (OME-NGFF; shards = ``block``
    up to 2048, chunks up to 1024); returns the true nucleus count."""
    from hpc_jobs.segmentation.synthetic import render_nuclei, write_as_export

    image, truth = render_nuclei((size, size), seed=seed, channels=2)
    shard = min(2048, block)
    write_as_export(ngff.image_zarr_path(ctx.image_dir(1)), image,
                    chunk=min(1024, shard), block=shard, image_id=1)
    return int(truth.max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="image side in px (default 4096)")
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--block", type=int, default=2048, help="tile core size (default 2048)")
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny run for CI: {' '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    procs = [int(p) for p in args.procs.split(",")]
    if 1 not in procs:
        procs = [1, *procs]  # PEFF needs T1
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        print("note: SLURM_CPUS_PER_TASK is set and overrides the per-run CPU count")

    from hpc_jobs.segmentation.bootstrap import ensure_model

    ensure_model()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="segment_peff_"))
    t0 = time.perf_counter()
    n_true = _write_image(_context(root, 1), args.size, args.seed, args.block)
    print(f"image {args.size}x{args.size} x2 channels, {n_true} nuclei, written in "
          f"{time.perf_counter() - t0:.1f}s to {root}; cores on this machine: "
          f"{os.cpu_count()}")
    image_dir = root / "data" / "images" / "1"
    rows = []
    for p in procs:
        shutil.rmtree(image_dir / "segmentation", ignore_errors=True)
        shutil.rmtree(image_dir / "image.zarr" / "labels", ignore_errors=True)
        ctx = _context(root, p * args.threads)
        ctx.log = lambda _msg: None  # type: ignore[method-assign]
        params = dict(image_id=1, block_size=args.block, halo=args.halo, processes=p)
        t = time.perf_counter()
        s = segment_nuclei.run(segment_nuclei.Params(**params, phase="tiles"), ctx)
        tp = time.perf_counter() - t
        t = time.perf_counter()
        m = segment_nuclei.run(segment_nuclei.Params(**params, phase="merge"), ctx)
        rows.append((p, tp, time.perf_counter() - t, s, m))
        print(f"  p={p}: tiles {tp:.1f}s, {m['nuclei']} nuclei", flush=True)
    t1 = rows[0][1]
    print()
    print(f"{'p':>3} {'T_tiles[s]':>10} {'speedup':>8} {'PEFF':>6} {'merge[s]':>9} "
          f"{'tiles':>5} {'load/proc[s]':>12} {'read[s]':>8} {'segment[s]':>10} "
          f"{'post[s]':>8} {'load %':>7} {'nuclei':>7}")
    for p, tp, tm, s, m in rows:
        work = s["read_s"] + s["segment_s"] + s["post_s"] + s["write_s"]
        load = s["model_load_s"]
        print(f"{p:>3} {tp:>10.1f} {t1 / tp:>8.2f} {t1 / (p * tp):>6.2f} {tm:>9.1f} "
              f"{s['tiles']:>5} {load / p:>12.2f} {s['read_s']:>8.1f} {s['segment_s']:>10.1f} "
              f"{s['post_s']:>8.1f} {100 * load / (load + work):>6.1f}% {m['nuclei']:>7}")
    print("\nPEFF = T1 / (p * Tp) on the tiles phase (pool start + model load included); "
          "load % = model load / (load + per-tile work), summed over workers.")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
