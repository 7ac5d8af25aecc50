"""Prediction throughput (crops/s) and the PEFF of a 2-task ``predict`` array vs one job.

Generates a synthetic slide (``--width`` x ``--height``, ~0.6 nuclei per 36 px cell inside
tissue), exports it with the real ``export_zarr``, takes the truth's nuclei as the nuclei
table (segmentation is not what is measured) and runs the real ``ecdf``; saves an untrained
ResNet-50 classifier (``save_classifier``: the same network and crops as a trained one, so
the same cost). Then, each in a fresh process (model load included, as in a job):

- one job (``phase=all``) with ``--threads`` torch threads: T1, crops/s;
- a 2-task array (``phase=tiles``, both tasks at once, ``--threads`` each) + the merge:
  T2 = the slower task + the merge; PEFF = T1 / (2 * T2).

Usage::

    .venv/bin/python benchmarks/predict_classifier.py --width 2048 --height 2048
    .venv/bin/python benchmarks/predict_classifier.py --quick   # a tiny slide (CI)
    .venv/bin/python benchmarks/predict_classifier.py --device cuda   # on a GPU node
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_jobs.config import SiteConfig  # noqa: E402
from hpc_jobs.protocol import Resources, Secrets  # noqa: E402
from hpc_jobs.steps.base import StepContext  # noqa: E402

MODEL = "bench-r50"
QUICK = {"width": 384, "height": 256, "batch": 8, "threads": 1, "crop": 32}


def _context(root: Path, job: str, cpus: int, task: tuple[int, int] | None = None
             ) -> StepContext:
    return StepContext(job_dir=root / "jobs" / job, site=SiteConfig.local(root),
                       resources=Resources(cpus=cpus), secrets=Secrets(),
                       array_task_id=task[0] if task else None,
                       array_task_count=task[1] if task else None)


def prepare(root: Path, width: int, height: int, crop: int) -> tuple[int, int]:
    """The preprocessed slide and the classifier; returns (image id, nuclei)."""
    import numpy as np
    import pandas as pd
    import torch
    import zarr

    from hpc_jobs import ngff
    from hpc_jobs.classifier.data import display_rule
    from hpc_jobs.classifier.model import resnet50, save_classifier
    from hpc_jobs.steps import ecdf, export_zarr
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import SynthSpec, generate

    ctx = _context(root, "prep", 1)
    with LocalStore(ctx.site.store.path) as store:
        image_id = int(generate(SynthSpec(width=width, height=height, seed=1), store,
                                out_truth=root / "truth")["image_id"])
    export_zarr.run(export_zarr.Params(image_id=image_id, block_size=256), ctx)
    image_dir = ctx.image_dir(image_id)
    truth = pd.read_parquet(root / "truth" / "nuclei.parquet")
    truth[["id", "x", "y"]].to_parquet(image_dir / "nuclei.parquet", index=False)
    labels = np.asarray(zarr.open_array(str(root / "truth" / "labels.zarr"), mode="r")[...])
    zarr.create_array(store=str(ngff.image_zarr_path(image_dir) / "labels" / "nuclei" / "0"),
                      data=labels, chunks=(256, 256), zarr_format=3)
    ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    torch.manual_seed(0)
    meta = {"arch": "resnet50", "channels": [0, 1], "crop_size": crop,
            "display": display_rule(), "class_names": ["negative", "positive"],
            "threshold": 0.5}
    save_classifier(ctx.site.models.classifier_dir(ctx.site.data_root) / f"{MODEL}.pt",
                    resnet50(2, 2), meta)
    return image_id, len(truth)


def _job(root: str, image_id: int, phase: str, task: tuple[int, int] | None, threads: int,
         batch: int, device: str, out: Any) -> None:
    """One predict job in this (fresh) process; puts (wall seconds, summary) on ``out``."""
    from hpc_jobs.steps import predict

    t0 = time.perf_counter()
    params = predict.Params(image_id=image_id, classifier=MODEL, device=device,
                            inference_batch=batch, phase=phase)
    job = f"{phase}-{task[0] if task else 'all'}"
    summary = predict.run(params, _context(Path(root), job, threads, task))
    out.put((time.perf_counter() - t0, summary))


def run_jobs(root: Path, image_id: int, phase: str, tasks: list[tuple[int, int] | None],
             threads: int, batch: int, device: str) -> tuple[float, list[tuple[float, Any]]]:
    """Run one process per entry of ``tasks`` at once; (wall seconds, per-job results)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_job, args=(str(root), image_id, phase, t, threads, batch,
                                            device, out)) for t in tasks]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a {phase} job failed (exit {p.exitcode})")
    return time.perf_counter() - t0, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job / task")
    ap.add_argument("--crop", type=int, default=64, help="crop size (px)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--quick", action="store_true", help="a tiny slide, seconds (CI)")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    with tempfile.TemporaryDirectory(prefix="omeflow-predict-bench-") as tmp:
        root = Path(tmp)
        image_id, n = prepare(root, args.width, args.height, args.crop)
        print(f"slide {args.width}x{args.height}: {n} nuclei, crops {args.crop}px, batch "
              f"{args.batch}, {args.threads} thread(s) per job, device {args.device}")
        t1, ((_, one),) = run_jobs(root, image_id, "all", [None], args.threads, args.batch,
                                   args.device)
        print(f"one job:   {t1:.2f}s wall, {one['crops_per_s']:.1f} crops/s "
              f"(read {one['read_s']}s, infer {one['infer_s']}s, model load "
              f"{one['model_load_s']}s) on {one['device']}")
        ta, parts = run_jobs(root, image_id, "tiles", [(0, 2), (1, 2)], args.threads,
                             args.batch, args.device)
        tm, ((_, merged),) = run_jobs(root, image_id, "merge", [None], args.threads,
                                      args.batch, args.device)
        assert merged["crops"] == n, merged
        t2 = ta + tm
        rates = ", ".join(f"{s['crops_per_s']:.1f}" for _, s in parts)
        print(f"2-task array: {ta:.2f}s wall (tasks {rates} crops/s) + merge {tm:.2f}s")
        print(f"prediction crops/s on {one['device']}: {n / t1:.1f} (1 job, wall), "
              f"{n / t2:.1f} (2-task array + merge, wall)")
        print(f"PEFF = T1 / (2 * T2) = {t1:.2f} / (2 * {t2:.2f}) = {t1 / (2 * t2):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
