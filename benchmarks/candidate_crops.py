"""Time to serve candidate crops: rendered on the cluster, fetched through the gateway, loaded.

Builds a synthetic slide (default 8192 x 8192, 2 channels, tissue ROIs with holes) in a
throw-away embedded site: the real ``export_zarr`` and ``ecdf`` steps; the nuclei table and
label image come from the synthetic truth (a stand-in for ``segment_nuclei``, whose cost is
measured by ``segment_peff.py``: here only the crops path is timed; marker mean = 1000 for
truth positives, 100 otherwise). Then:

1. **render** (cluster side): ``select_candidates`` submitted through the gateway (local
   scheduler, a job like any other), ``rule=fixed`` with ``threshold=500`` (the truth
   positives), capped at ``--candidates``; its summary's ``render_s`` gives candidates/s;
2. **fetch**: every ``crops.<n>.json`` chunk through the gateway's ``result`` verb, one gateway
   process per call as the hook's local transport does (over SSH add the round trip);
3. **load**: the candidate set and every chunk's PNGs into an annotation store (SQLite);
4. **serve from the store**: every crop of one candidate read back (what the page does).

    .venv/bin/python benchmarks/candidate_crops.py [--size 8192] [--candidates 5000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hooks.annotations import AnnotationStore
from hooks.hpc import _local_argv, decode_reply, gateway_env
from hpc_jobs.config import SiteConfig
from hpc_jobs.embedded import embedded_site_file
from hpc_jobs.protocol import JobState, Resources, Secrets, job_key_for
from hpc_jobs.registry import SELECT_CANDIDATES
from hpc_jobs.step_cli import _Gateway
from hpc_jobs.steps import ecdf, export_zarr
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.local import LocalStore
from hpc_jobs.synth import SynthSpec, generate
from operators.candidates import candidate_record, crop_items

QUICK_SIZE, QUICK_CANDIDATES = 1024, 60


def prepare(var: Path, size: int, workers: int) -> tuple[Path, int]:
    """An embedded site under ``var`` with one exported slide, its eCDF, nuclei and labels."""
    import pandas as pd
    import zarr

    from hpc_jobs import ngff
    from hpc_jobs.segmentation.labels import ensure_labels

    site_path = embedded_site_file(var)
    site = SiteConfig.load(site_path)
    truth = var / "truth"
    with LocalStore(site.store.path) as store:
        image_id = generate(SynthSpec(width=size, height=size, seed=3), store,
                            out_truth=truth)["image_id"]
    ctx = StepContext(job_dir=site.job_root / "bench-prepare", site=site,
                      resources=Resources(cpus=workers), secrets=Secrets())
    export_zarr.run(export_zarr.Params(image_id=image_id, block_size=2048 if size >= 2048
                                       else size), ctx)
    ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    image_zarr = ngff.image_zarr_path(ctx.image_dir(image_id))
    levels = [tuple(ngff.open_level(image_zarr, i).shape[1:])
              for i in range(ngff.level_count(image_zarr))]
    level0 = ngff.open_level(image_zarr, 0)
    arrays = ensure_labels(image_zarr, levels, tuple(level0.chunks[1:]),
                           tuple((level0.shards or level0.chunks)[1:]))
    src = zarr.open_array(truth / "labels.zarr", mode="r")
    step = 2048
    for y in range(0, size, step):
        for x in range(0, size, step):
            arrays[0][y:y + step, x:x + step] = src[y:y + step, x:x + step]
    nuclei = pd.read_parquet(truth / "nuclei.parquet")
    marker = np.where(nuclei.positive.to_numpy(), 1000.0, 100.0)
    pd.DataFrame({
        "id": nuclei.id.to_numpy(np.uint32), "x": nuclei.x.to_numpy(float),
        "y": nuclei.y.to_numpy(float), "area": np.pi * nuclei.radius_x * nuclei.radius_y,
        "c0_mean": 500.0, "c1_mean": marker,
    }).to_parquet(ctx.image_dir(image_id) / "nuclei.parquet")
    return site_path, image_id


def render(site_path: Path, image_id: int, candidates: int) -> dict[str, Any]:
    """Run select_candidates as a gateway job; its summary."""
    gateway = _Gateway(site_path)
    key = job_key_for("bench", SELECT_CANDIDATES, time.strftime("%Y%m%dT%H%M%S"), image_id)
    params = {"image_id": image_id, "rule": "fixed", "threshold": 500.0,
              "max_candidates": candidates}
    job_id = gateway.call("submit", {"step": SELECT_CANDIDATES, "job_key": key,
                                     "params": params, "resources": {}})["job_id"]
    while not (status := gateway.status(job_id)).state.terminal:
        time.sleep(0.5)
    if status.state is not JobState.COMPLETED:
        log = gateway.log(job_id, -4000).text
        raise SystemExit(f"select_candidates ended {status.state.value}:\n{log}")
    return gateway.call("result", {"job_id": job_id, "name": "summary.json"})["data"]


def fetch(site_path: Path, job_id: str, name: str) -> dict[str, Any]:
    """One ``result`` call in its own gateway process (the hook's local transport)."""
    body = json.dumps({"job_id": job_id, "name": name}).encode()
    proc = subprocess.run(_local_argv(site_path, None), input=body, capture_output=True,
                          env=gateway_env("result"), timeout=120, check=False)
    return decode_reply("result", proc.returncode, proc.stdout, proc.stderr)["data"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--candidates", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help=f"--size {QUICK_SIZE} --candidates {QUICK_CANDIDATES} (CI)")
    args = ap.parse_args()
    if args.quick:
        args.size, args.candidates = QUICK_SIZE, QUICK_CANDIDATES
    with tempfile.TemporaryDirectory(prefix="omeflow-bench-crops-") as tmp:
        var = Path(tmp) / "var"
        t0 = time.perf_counter()
        site_path, image_id = prepare(var, args.size, args.workers)
        print(f"slide {args.size} x {args.size} x 2 prepared in {time.perf_counter() - t0:.1f}s",
              flush=True)

        t0 = time.perf_counter()
        summary = render(site_path, image_id, args.candidates)
        job_s = time.perf_counter() - t0
        n = summary["candidates"]
        if n == 0:
            raise SystemExit("no candidates: nothing to measure (a larger --size)")
        chunks = summary["crops"]["chunks"]
        pngs = n * len(summary["crops"]["zooms"]) * (len(summary["channel_names"]) + 1)
        render_s = summary["render_s"]

        store = AnnotationStore.from_url(f"sqlite:///{Path(tmp) / 'annotations.sqlite'}",
                                         check_schema=False)
        store.migrate()
        fetch_s = load_s = 0.0
        nbytes, rows, cache = 0, [], Path(tmp) / "cache"
        cache.mkdir()
        for name in chunks:
            t = time.perf_counter()
            data = fetch(site_path, summary["job_id"], name)
            fetch_s += time.perf_counter() - t
            text = json.dumps(data)
            nbytes += len(text)
            (cache / name).write_text(text)
            rows += [candidate_record(r) for r in data["candidates"]]
        t = time.perf_counter()
        set_id = store.add_candidate_set(image_id, "bench", "fixed", {"threshold": 500.0},
                                         {}, rows)
        for name in chunks:
            store.add_crops(set_id, crop_items(json.loads((cache / name).read_text())
                                               ["candidates"]))
        load_s = time.perf_counter() - t

        cands = store.candidates(set_id)
        t = time.perf_counter()
        served = 0
        for cand in cands[: min(50, len(cands))]:
            for crop in store.candidate(cand["id"])["crops"]:
                served += len(store.crop(cand["id"], crop["kind"], crop["zoom"]))
        serve_s = (time.perf_counter() - t) / min(50, len(cands))

    per = {k: 1000 * v / n for k, v in
           (("render", render_s), ("fetch", fetch_s), ("load", load_s))}
    cold = sum(per.values())
    print(f"render on the cluster: {n} candidates, {pngs} PNGs in {render_s:.2f}s "
          f"(job {job_s:.1f}s incl. selection and start): {n / render_s:.1f} candidates/s, "
          f"{pngs / render_s:.0f} PNGs/s")
    mb = nbytes / 1e6
    print(f"fetch through the gateway: {len(chunks)} chunks, {mb:.1f} MB in {fetch_s:.2f}s: "
          f"{len(chunks) / fetch_s:.2f} chunks/s, {mb / fetch_s:.1f} MB/s")
    print(f"load into the annotation store: {len(chunks)} chunks in {load_s:.2f}s: "
          f"{len(chunks) / load_s:.2f} chunks/s")
    print(f"one candidate's crops: render {per['render']:.1f} ms + fetch {per['fetch']:.1f} ms "
          f"+ load {per['load']:.1f} ms = {cold:.1f} ms cold; from the store "
          f"{1000 * serve_s:.2f} ms cached")
    print(f"ratio cold / cached: {cold / (1000 * serve_s):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
