"""Training throughput of the ResNet-50 cell classifier: crops/s per epoch, and its metrics.

Builds synthetic slides with decoys (``--decoys``, default 0.5 of the negatives) in a
throw-away local site: the real ``export_zarr`` and ``ecdf`` steps; the nuclei table from the
synthetic truth (a stand-in for ``segment_nuclei``, see ``hpc_jobs/classifier/synthetic.py``).
Labels = the truth class of every nucleus whose 21 px marker mean passes 200 (the
preselection). Then ``train_classifier`` runs in this process on ``--device`` with
``--threads`` torch threads, and the script prints per epoch the training crops/s (forward +
backward + the BatchNorm recalibration pass), then the held-out metrics next to the marker-mean
baseline's.

    .venv/bin/python benchmarks/train_classifier.py [--slides 4] [--size 1536] [--epochs 10]
        [--input-size 32] [--device auto|cpu|cuda] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpc_jobs.classifier.snapshot import snapshot_hash  # noqa: E402
from hpc_jobs.classifier.synthetic import prepare_slide, truth_labels  # noqa: E402
from hpc_jobs.config import SiteConfig  # noqa: E402
from hpc_jobs.protocol import Resources, Secrets  # noqa: E402
from hpc_jobs.steps import train_classifier as tc  # noqa: E402
from hpc_jobs.steps.base import StepContext  # noqa: E402
from hpc_jobs.synth import SynthSpec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, default=1536, help="slide edge (px)")
    ap.add_argument("--decoys", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--split-block", type=int, default=256,
                    help="spatial block edge (px) of the early-stopping split")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))))
    ap.add_argument("--quick", action="store_true",
                    help="2 slides of 640 px, 2 epochs (CI: checks the script runs)")
    args = ap.parse_args()
    if args.quick:
        args.slides, args.size, args.epochs = 2, 640, 2
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        ctx = StepContext(job_dir=root / "jobs" / "bench", site=SiteConfig.local(root),
                          resources=Resources(cpus=args.threads), secrets=Secrets())
        t0 = time.perf_counter()
        labels: list[list[int]] = []
        for i in range(args.slides):
            spec = SynthSpec(width=args.size, height=args.size, seed=100 + i,
                             decoy_fraction=args.decoys)
            image_id, table = prepare_slide(ctx, spec, root / f"truth{i}")
            labels += truth_labels(image_id, table)
        prep_s = time.perf_counter() - t0
        params = tc.Params(labels=labels, snapshot_hash=snapshot_hash(labels),
                           epochs=args.epochs, patience=args.epochs, device=args.device,
                           input_size=args.input_size, batch_size=args.batch_size,
                           split_block=args.split_block)
        os.environ["SLURM_CPUS_PER_TASK"] = str(args.threads)  # ctx.cpus -> torch threads
        summary = tc.run(params, ctx)
    split = summary["split"]
    print(f"\nslides {args.slides} x {args.size}^2 px (decoys {args.decoys}), {len(labels)} "
          f"labelled cells, prepared in {prep_s:.1f}s; split {split['kind']}: {split['cells']}")
    print(f"device {summary['device']}, threads {summary['threads']}, input "
          f"{args.input_size} px, batch {args.batch_size}")
    print("epoch  crops  seconds  crops/s")
    for h in summary["training"]["history"]:
        n = split["cells"]["train"]
        print(f"{h['epoch']:5d}  {n:5d}  {h['seconds']:7.2f}  {h['crops_per_s']:7.1f}")
    m, b = summary["metrics"]["model"], summary["metrics"]["baseline_marker_mean"]
    print(f"train crops/s per epoch (median): {summary['crops_per_s']} on {summary['device']}")
    print(f"held-out ROC-AUC classifier {m['roc_auc']} vs marker mean {b['roc_auc']}; "
          f"PR-AUC {m['pr_auc']} vs {b['pr_auc']}; F1 {m['f1']} vs {b['f1']}")
    print(f"crops read: {summary['crops_s']}s, training {summary['train_s']}s, total "
          f"{summary['seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
