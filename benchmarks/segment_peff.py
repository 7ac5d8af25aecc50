"""Parallel efficiency of ``segment_nuclei`` inside one node: PEFF = T1 / (p * Tp).

Renders a synthetic slide (``--size`` px square, nuclei ~20 px), writes it as the export
step does (chunks 1024, shards 2048; smaller when ``--block`` is smaller), then for each p
in ``--procs`` runs the tiles phase with p worker processes x ``--threads`` torch threads
each (a fresh result folder per p), then the merge phase, and prints one table: T (tiles
phase wall time), speedup, PEFF, tiles/s, merge time, and the per-tile overhead split (model
load vs read / segment / post / write). The image carries one tissue ROI covering the left
``--tissue`` fraction of the frame: the PEFF runs segment every tile (``tissue_only=false``);
one more run at the largest p segments only the tiles meeting tissue, and the script prints
the tiles skipped and the time saved.

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


def _write_image(ctx: StepContext, size: int, seed: int, block: int, tissue: float) -> int:
    """Render the slide, add it to the store with a tissue ROI over the left ``tissue``
    fraction, and write it as ``export_zarr`` does (OME-NGFF; shards = ``block`` up to 2048,
    chunks up to 1024); returns the true nucleus count."""
    from hpc_jobs.segmentation.synthetic import render_nuclei, write_as_export
    from hpc_jobs.stores.base import PolygonShape

    image, truth = render_nuclei((size, size), seed=seed, channels=2)
    with ctx.open_store() as store:
        image_id = store.add_image("bench", image, ["DAPI", "marker"])
        w = tissue * size
        store.add_roi(image_id, PolygonShape(((0.0, 0.0), (w, 0.0), (w, size), (0.0, size)),
                                             "tissue_bench"))
    shard = min(2048, block)
    write_as_export(ngff.image_zarr_path(ctx.image_dir(image_id)), image,
                    chunk=min(1024, shard), block=shard, image_id=image_id)
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
    ap.add_argument("--tissue", type=float, default=0.3,
                    help="fraction of the width covered by the tissue ROI (default 0.3)")
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
    n_true = _write_image(_context(root, 1), args.size, args.seed, args.block, args.tissue)
    print(f"image {args.size}x{args.size} x2 channels, {n_true} nuclei, written in "
          f"{time.perf_counter() - t0:.1f}s to {root}; cores on this machine: "
          f"{os.cpu_count()}")
    image_dir = root / "data" / "images" / "1"
    def run(p: int, tissue_only: bool) -> tuple[int, float, float, dict, dict]:
        shutil.rmtree(image_dir / "segmentation", ignore_errors=True)
        shutil.rmtree(image_dir / "image.zarr" / "labels", ignore_errors=True)
        ctx = _context(root, p * args.threads)
        ctx.log = lambda _msg: None  # type: ignore[method-assign]
        params = dict(image_id=1, block_size=args.block, halo=args.halo, processes=p,
                      tissue_only=tissue_only)
        t = time.perf_counter()
        s = segment_nuclei.run(segment_nuclei.Params(**params, phase="tiles"), ctx)
        tp = time.perf_counter() - t
        t = time.perf_counter()
        m = segment_nuclei.run(segment_nuclei.Params(**params, phase="merge"), ctx)
        print(f"  p={p}{' tissue only' if tissue_only else ''}: tiles {tp:.1f}s, "
              f"{s['tiles']} tiles, {m['nuclei']} nuclei", flush=True)
        return p, tp, time.perf_counter() - t, s, m

    rows = [run(p, tissue_only=False) for p in procs]
    only = run(procs[-1], tissue_only=True)
    t1 = rows[0][1]
    print()
    print(f"{'p':>3} {'T_tiles[s]':>10} {'speedup':>8} {'PEFF':>6} {'tiles/s':>8} "
          f"{'merge[s]':>9} {'tiles':>5} {'load/proc[s]':>12} {'read[s]':>8} "
          f"{'segment[s]':>10} {'post[s]':>8} {'load %':>7} {'nuclei':>7}")
    for p, tp, tm, s, m in rows:
        work = s["read_s"] + s["segment_s"] + s["post_s"] + s["write_s"]
        load = s["model_load_s"]
        print(f"{p:>3} {tp:>10.1f} {t1 / tp:>8.2f} {t1 / (p * tp):>6.2f} "
              f"{s['tiles'] / tp:>8.3f} {tm:>9.1f} {s['tiles']:>5} {load / p:>12.2f} "
              f"{s['read_s']:>8.1f} {s['segment_s']:>10.1f} {s['post_s']:>8.1f} "
              f"{100 * load / (load + work):>6.1f}% {m['nuclei']:>7}")
    print("\nPEFF = T1 / (p * Tp) on the tiles phase (pool start + model load included); "
          "load % = model load / (load + per-tile work), summed over workers.")
    p, tp, _, s, m = only
    full = next(r for r in rows if r[0] == p)
    print(f"tissue only (p={p}, tissue {100 * args.tissue:.0f}% of the width): "
          f"{s['tiles']} of {s['tiles'] + s['tiles_no_tissue']} tiles segmented, "
          f"{s['tiles_no_tissue']} skipped; T_tiles {tp:.1f}s vs {full[1]:.1f}s for all tiles: "
          f"saving {100 * (1 - tp / full[1]):.0f}%, {m['nuclei']} vs {full[4]['nuclei']} nuclei")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
