"""The main job: the whole loop, end to end on the embedded defaults (local store, local
scheduler, SQLite annotation store).

1. generates three synthetic slides with decoys (marker signal that passes the candidates'
   rule but is not a marker-positive cell) into the local store, each with its ground truth;
   the first two are for training, the third is held out;
2. ``celldetector_preprocess`` (``dag.test()``) on all three: export_zarr → segment_nuclei
   (Cellpose) → ecdf, each step a job submitted through the gateway;
3. ``celldetector_candidates`` on the two training slides: candidates and their crops in the
   annotation store;
4. :func:`auto_annotate_from_truth` labels the first three quarters of each set (in the
   annotation queue's order) from the synthetic truth under the annotator ``auto-truth``: a
   STAND-IN FOR PEOPLE, who label on the annotation page; the last quarter is left for
   active learning;
5. ``celldetector_train``: label snapshot → ResNet-50 on the cluster side → registry, then
   active learning scores what is left unlabelled;
6. ``celldetector_predict`` on the held-out slide only (never seen in training): every
   nucleus classified, ROIs of the positives, per-cell table and densities written back;
7. prints the held-out metrics against the truth (ROC-AUC, PR-AUC, F1) next to the
   marker-mean baseline's on the same cells, where the results are and how to open the UI.

Run through ``make demo`` (which sets up the venv, the Airflow DB and the Cellpose model);
``--small`` is the CI-sized run (``tests/integration/test_demo.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: segment_nuclei's statistics window and the candidates' eCDF quantile used by the demo.
WINDOW, QUANTILE = 21, 0.8
#: Share of the synthetic negatives that get decoy marker signal.
DECOYS = 0.5
#: The auto-annotator's name in the annotation store (a stand-in for people).
AUTO_ANNOTATOR = "auto-truth"
#: A segmented nucleus is a truth nucleus when their centres are this close (px).
MATCH_PX = 6.0
#: Share of each candidate set the auto-annotator labels (the rest: active learning).
LABEL_FRACTION = 0.75


def auto_annotate_from_truth(store: Any, set_id: int, truth: Any,
                             fraction: float = 1.0) -> dict[str, int]:
    """Label the first ``fraction`` of the candidates of ``set_id`` (queue order) from the
    synthetic truth, as ``auto-truth``.

    A STAND-IN FOR PEOPLE (only synthetic slides have a truth): a candidate whose centre is
    within :data:`MATCH_PX` of a truth nucleus gets that nucleus's class (``positive`` /
    ``negative``); one that matches none (a segmentation error) gets ``unsure``, which the
    training snapshot leaves out. Returns the counts per label.
    """
    counts = {"positive": 0, "negative": 0, "unsure": 0}
    rows = store.candidates(set_id)
    rows = rows[: round(len(rows) * fraction)]
    if not rows:
        return counts
    positive, matched = _match(truth, [(c["x"], c["y"]) for c in rows])
    for c, pos, ok in zip(rows, positive, matched, strict=True):
        label = ("positive" if pos else "negative") if ok else "unsure"
        store.label(c["id"], AUTO_ANNOTATOR, label)
        counts[label] += 1
    return counts


def _match(truth: Any, xy: Any) -> tuple[Any, Any]:
    """(truth class, matched?) of each point: its nearest truth nucleus within MATCH_PX."""
    import numpy as np
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(truth[["x", "y"]].to_numpy()).query(np.asarray(xy, dtype=float))
    return truth["positive"].to_numpy(bool)[idx], dist < MATCH_PX


def held_out_metrics(predictions: Any, nuclei: Any, truth: Any) -> dict[str, Any]:
    """Model vs marker-mean baseline on the held-out slide's nuclei that match a truth
    nucleus. The model uses its own decision threshold; the baseline its best-F1 threshold
    on these same cells (an optimistic baseline)."""
    import re

    from hpc_jobs.classifier import metrics

    marker = max((c for c in nuclei.columns if re.fullmatch(r"c\d+_mean", c)),
                 key=lambda c: int(c[1:-5]))
    df = predictions.merge(nuclei[["id", marker]], on="id")
    positive, ok = _match(truth, df[["x", "y"]].to_numpy())
    unmatched_positive = int(df["positive"].to_numpy(bool)[~ok].sum())
    y, df = positive[ok].astype(int), df[ok]
    model = metrics.summary(y, df["probability"].to_numpy(), float(_threshold(df)))
    base = df[marker].to_numpy()
    baseline = metrics.summary(y, base, float(metrics.best_f1_threshold(y, base)))
    return {"model": model, "baseline_marker_mean": baseline, "unmatched": int((~ok).sum()),
            "unmatched_positive": unmatched_positive, "marker_column": marker}


def _threshold(df: Any) -> float:
    """The model's decision threshold, as ``predict`` applied it."""
    pos, neg = df[df["positive"]], df[~df["positive"]]
    if len(pos) and len(neg):
        return float((pos["probability"].min() + neg["probability"].max()) / 2)
    return 0.5


def _run(bag: Any, dag_id: str, conf: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    started = time.time()
    run = bag.get_dag(dag_id).test(run_conf=conf)
    tis = {ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]": ti
           for ti in run.get_task_instances()}
    print(f"   {dag_id}: {run.state} in {time.time() - started:.0f} s: "
          f"{ {k: str(ti.state) for k, ti in tis.items()} }", flush=True)
    return (run, tis) if str(run.state) == "success" else None


def _xcom(ti: Any) -> Any:
    return ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--small", action="store_true",
                        help="CI size: 1024 x 768 slides, 3 epochs")
    args = parser.parse_args()
    if args.small:
        args.width, args.height, args.epochs = 1024, 768, 3
    os.environ.setdefault("AIRFLOW_HOME", str(REPO))
    t_start = time.time()

    import logging

    import pandas as pd

    from hooks.hpc import embedded_site_config
    from hpc_jobs.config import SiteConfig
    from hpc_jobs.predictions import namespace_for, predictions_path
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import SynthSpec, generate
    from operators.candidates import open_annotation_store

    site = SiteConfig.load(embedded_site_config())
    assert site.store.path is not None
    store = LocalStore(site.store.path)
    print(f"== 1. three synthetic slides {args.width} x {args.height} with decoys "
          f"({DECOYS:.0%} of negatives) into the local store {site.store.path}", flush=True)
    slides = []
    for k in range(3):
        seed = args.seed + k
        truth_dir = site.data_root / "truth" / f"seed{seed}-{args.width}x{args.height}-decoys"
        synth = generate(SynthSpec(width=args.width, height=args.height, seed=seed,
                                   decoy_fraction=DECOYS), store, out_truth=truth_dir)
        role = "held out" if k == 2 else "training"
        slides.append({"image_id": synth["image_id"], "truth": truth_dir, "role": role})
        print(f"   image {synth['image_id']} ({role}): {synth['nuclei']} nuclei, "
              f"{synth['positives']} marker-positive; truth in {truth_dir}", flush=True)
    train_ids = [s["image_id"] for s in slides[:2]]
    held = slides[2]

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO / "dags"))
    if bag.import_errors:
        print(bag.import_errors, file=sys.stderr)
        return 1
    print("== 2. celldetector_preprocess on all three (export_zarr, segment_nuclei, ecdf)",
          flush=True)
    # a 21 px statistics window (the lab used 101): there a positive's marker mean stands far
    # above its tissue's background, so the candidates' eCDF-quantile rule can find it
    if not _run(bag, "celldetector_preprocess",
                {"image_ids": [s["image_id"] for s in slides], "window": WINDOW}):
        return 1
    for s in slides:
        nuclei = pd.read_parquet(site.data_root / "images" / str(s["image_id"])
                                 / "nuclei.parquet")
        print(f"   image {s['image_id']}: {len(nuclei)} nuclei segmented")

    print("== 3. celldetector_candidates on the training slides", flush=True)
    done = _run(bag, "celldetector_candidates", {"image_ids": train_ids, "quantile": QUANTILE})
    if not done:
        return 1
    loaded = [_xcom(ti) for k, ti in sorted(done[1].items())
              if k.startswith("image.load_candidates[")]
    ann = open_annotation_store("omeflow_annotations", logging.getLogger("demo"))
    print(f"== 4. {AUTO_ANNOTATOR}: labels from the synthetic truth (auto_annotate_from_truth,"
          " a stand-in for people)", flush=True)
    set_ids = []
    for got in loaded:
        truth_dir = next(s["truth"] for s in slides if s["image_id"] == got["image_id"])
        counts = auto_annotate_from_truth(ann, got["set_id"],
                                          pd.read_parquet(truth_dir / "nuclei.parquet"),
                                          LABEL_FRACTION)
        set_ids.append(got["set_id"])
        print(f"   set {got['set_id']} (image {got['image_id']}, {got['candidates']} "
              f"candidates): {counts}, the rest left for active learning")

    print("== 5. celldetector_train (ResNet-50, split by image) + active learning", flush=True)
    done = _run(bag, "celldetector_train", {"set_ids": set_ids, "epochs": args.epochs,
                                            "patience": 3, "random_seed": 3})
    if not done:
        return 1
    reg = _xcom(done[1]["register_model"])
    m = reg["metrics"]
    print(f"   model {reg['model_id']} {reg['path']}: current={reg['current']} "
          f"({reg['reason']}); the train DAG's own validation image: ROC-AUC "
          f"{m['model']['roc_auc']} vs marker mean {m['baseline_marker_mean']['roc_auc']}")
    scored = _xcom(done[1]["apply_scores"]) if "apply_scores" in done[1] else None
    print(f"   active learning: {sum(r['scored'] for r in scored or [])} unlabelled "
          "candidates scored by uncertainty")

    print(f"== 6. celldetector_predict on the held-out image {held['image_id']}", flush=True)
    done = _run(bag, "celldetector_predict", {"image_ids": [held["image_id"]],
                                              "registered_model": str(reg["model_id"])})
    if not done:
        return 1
    wb = _xcom(done[1]["image.writeback[0]"])
    classifier = Path(reg["path"]).stem
    image_dir = site.data_root / "images" / str(held["image_id"])
    preds = pd.read_parquet(predictions_path(image_dir, classifier))
    nuclei = pd.read_parquet(image_dir / "nuclei.parquet")
    res = held_out_metrics(preds, nuclei, pd.read_parquet(held["truth"] / "nuclei.parquet"))

    print(f"== 7. held-out image {held['image_id']} (not used in training) against the truth "
          f"({res['model']['n']} matched nuclei, {res['model']['positives']} positive; "
          f"{res['unmatched']} unmatched left out)")
    print(f"   {'':<22}{'ROC-AUC':>9}{'PR-AUC':>9}{'F1':>8}")
    for name, key in (("classifier", "model"),
                      (f"marker mean ({res['marker_column']})", "baseline_marker_mean")):
        r = res[key]
        print(f"   {name:<22}{r['roc_auc']:>9.3f}{r['pr_auc']:>9.3f}{r['f1']:>8.3f}")
    print("   (the baseline at its best-F1 threshold on these very cells: optimistic)")
    print("\nresults:")
    print(f"   predictions   {predictions_path(image_dir, classifier)}")
    print(f"   ROIs          {wb['rois']} under namespace {namespace_for(classifier)} "
          f"(image {held['image_id']} in {site.store.path})")
    dens = "; ".join(f"{d['name']} {d['positives_per_mm2']:.0f}/mm² ({d['positives']} of "
                     f"{d['cells']} cells)" for d in wb.get("densities", []))
    print(f"   cells table   {classifier}.cells (table {wb['table_id']})")
    print(f"   densities     {dens or 'none'}: map annotation + {classifier}.densities.csv "
          f"+ .png on image {held['image_id']}")
    print(f"   model         {reg['path']} (registry id {reg['model_id']})")
    url = loaded[0]["url"]
    if url.startswith("/"):
        url = "http://127.0.0.1:8080" + url  # `make ui`'s default address
    print(f"   annotation    {url} (order: most uncertain first)")
    print(f"\nstart the UI: make ui   (login printed there)\n"
          f"demo took {time.time() - t_start:.0f} s")
    print("OMEFLOW_DEMO " + json.dumps({"held_out": res, "model_id": reg["model_id"],
                                        "rois": wb["rois"], "scored": scored}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
