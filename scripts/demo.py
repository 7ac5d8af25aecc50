"""The main job, end to end on the embedded defaults (local store, local scheduler, SQLite).

1. generates a synthetic whole-slide image (DAPI nuclei, a marker, tissue polygons with a
   hole) into the local store, with its ground truth beside it;
2. runs the ``celldetector_preprocess`` DAG with ``dag.test()``: check → export_zarr →
   segment_nuclei → ecdf, each step a job submitted through the gateway;
3. prints where the outputs are and what they contain: nuclei found vs. the truth, and the
   eCDF quantiles per tissue ROI;
4. runs ``celldetector_candidates``: candidates selected and their crops rendered on the
   cluster side, fetched through the gateway into the annotation store (embedded SQLite);
   prints how many of them are marker-positive in the truth, the annotation page's URL and
   the command that starts the UI (``make ui``).

Run through ``make demo`` (which sets up the venv, the Airflow DB and the Cellpose model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: segment_nuclei's statistics window and the candidates' eCDF quantile used by the demo.
WINDOW, QUANTILE = 21, 0.9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--height", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW_HOME", str(REPO))

    import pandas as pd

    from hooks.hpc import embedded_site_config
    from hpc_jobs.config import SiteConfig
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import SynthSpec, generate

    site = SiteConfig.load(embedded_site_config())
    assert site.store.path is not None
    store = LocalStore(site.store.path)
    truth_dir = site.data_root / "truth" / f"seed{args.seed}-{args.width}x{args.height}"
    print(f"== 1. synthetic image {args.width} x {args.height} (seed {args.seed}) "
          f"into the local store {site.store.path}", flush=True)
    synth = generate(SynthSpec(width=args.width, height=args.height, seed=args.seed), store,
                     out_truth=truth_dir)
    image_id = synth["image_id"]
    print(f"   image id {image_id}: {synth['nuclei']} nuclei, {synth['positives']} marker-positive,"
          f" truth in {truth_dir}", flush=True)

    print("== 2. celldetector_preprocess (dag.test, local scheduler)", flush=True)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO / "dags"))
    if bag.import_errors:
        print(bag.import_errors, file=sys.stderr)
        return 1
    started = time.time()
    # a 21 px statistics window (the lab used 101): there a positive's marker mean stands far
    # above its tissue's background, so the candidates' eCDF-quantile rule can find it
    run = bag.get_dag("celldetector_preprocess").test(
        run_conf={"image_ids": [image_id], "window": WINDOW})
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print(f"   run {run.state} in {time.time() - started:.0f} s: {states}", flush=True)
    if str(run.state) != "success":
        return 1

    print("== 3. outputs", flush=True)
    image_dir = site.data_root / "images" / str(image_id)
    nuclei = pd.read_parquet(image_dir / "nuclei.parquet")
    print(f"   {image_dir / 'image.zarr'}: OME-NGFF 0.5 image + labels/nuclei")
    print(f"   {image_dir / 'nuclei.parquet'}: {len(nuclei)} nuclei found "
          f"(truth: {synth['nuclei']}); columns {list(nuclei.columns)[:8]}...")
    summary = json.loads((image_dir / "ecdf" / "summary.json").read_text())
    print(f"   {image_dir / 'ecdf'}: eCDF per tissue ROI and channel")
    for roi in summary["rois"]:
        for ch in roi["channels"]:
            q = ch["quantiles"]
            print(f"     {roi['roi']:<10} {ch['channel_name']:<5} pixels={ch['pixels']:>9} "
                  f"q05={q['0.05']:>6.0f} q50={q['0.5']:>6.0f} q95={q['0.95']:>6.0f}")

    print("== 4. celldetector_candidates (dag.test): candidates + crops -> annotation store",
          flush=True)
    started = time.time()
    run = bag.get_dag("celldetector_candidates").test(
        run_conf={"image_ids": [image_id], "quantile": QUANTILE})
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    print(f"   run {run.state} in {time.time() - started:.0f} s: "
          f"{ {k: str(ti.state) for k, ti in tis.items()} }", flush=True)
    if str(run.state) != "success":
        return 1
    selected = tis["image.select_candidates"].xcom_pull(
        task_ids="image.select_candidates", map_indexes=0)
    loaded = tis["image.load_candidates"].xcom_pull(
        task_ids="image.load_candidates", map_indexes=0)
    thresholds = ", ".join(f"{t['roi']} > {t['threshold']}" for t in selected["thresholds"])
    print(f"   rule {selected['rule']} {selected['rule_params']}: thresholds {thresholds}")
    print(f"   {selected['eligible']} nuclei above, {loaded['candidates']} candidates with "
          f"{loaded['crops']} crops in {loaded['chunks']} chunk(s) fetched through the gateway")
    truth = pd.read_parquet(truth_dir / "nuclei.parquet")
    print(f"   marker-positive in the truth: {_positive_share(selected, site, truth)}")
    url = loaded["url"]
    if url.startswith("/"):
        url = "http://127.0.0.1:8080" + url  # `make ui`'s default address
    print(f"\nannotation page: {url}\nstart the UI first: make ui   (login printed there)")
    return 0


def _positive_share(selected: dict, site, truth) -> str:
    """How many candidates are truth marker-positives (nearest truth nucleus within 6 px)."""
    import numpy as np
    from scipy.spatial import cKDTree

    outputs = site.job_root / selected["job_id"] / "outputs"
    rows = [r for name in selected["crops"]["chunks"]
            for r in json.loads((outputs / name).read_text())["candidates"]]
    if not rows:
        return "no candidates"
    dist, idx = cKDTree(truth[["x", "y"]].to_numpy()).query(
        np.array([[r["x"], r["y"]] for r in rows]))
    positive = truth["positive"].to_numpy()[idx] & (dist < 6)
    return f"{int(positive.sum())} of {len(rows)} ({positive.mean():.0%})"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
