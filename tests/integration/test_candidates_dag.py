"""``celldetector_candidates`` end to end on the embedded default, with ``dag.test()``.

The image is preprocessed first (the real export, Cellpose segmentation and eCDF steps, run
directly on the embedded site's data folder: small sizes); then the DAG runs
``select_candidates`` through the gateway (local transport, local scheduler), fetches the crop
chunks with the gateway's ``result`` verb and loads them into the embedded annotation store.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _preprocessed_image(site: Any) -> tuple[int, Any]:
    """A synthetic slide in the embedded store with its export, nuclei and eCDF."""
    from hpc_jobs.protocol import Resources, Secrets
    from hpc_jobs.steps import ecdf, export_zarr, segment_nuclei
    from hpc_jobs.steps.base import StepContext
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import SynthSpec, generate

    with LocalStore(site.store.path) as store:
        image_id = generate(SynthSpec(width=768, height=384, seed=1), store,
                            out_truth=site.data_root / "truth" / "pytest-candidates")["image_id"]
    ctx = StepContext(job_dir=site.job_root / "pytest-preprocess", site=site,
                      resources=Resources(cpus=2), secrets=Secrets())
    export_zarr.run(export_zarr.Params(image_id=image_id, block_size=256), ctx)
    segment_nuclei.run(segment_nuclei.Params(image_id=image_id, block_size=256, window=21), ctx)
    ecdf.run(ecdf.Params(image_id=image_id, attach=False), ctx)
    return image_id, site


def _link_xcom(airflow_env: dict[str, str], run_id: str) -> Any:
    """The extra link's value the worker stored for the load task (read from Airflow's DB)."""
    code = (
        "import json, sys\n"
        "from airflow.models.xcom import XComModel\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    rows = s.execute(XComModel.get_many(key='_link_AnnotationPageLink', "
        "run_id=sys.argv[1], dag_ids='celldetector_candidates', "
        "task_ids='image.load_candidates').with_only_columns(XComModel.value)).all()\n"
        "print('LINKS ' + json.dumps([r[0] for r in rows], default=str))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, run_id], env=airflow_env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LINKS ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line[0].split(" ", 1)[1])


def test_candidates_dag_loads_the_set_and_crops_into_the_annotation_store(
    run_dag, airflow_env, monkeypatch, embedded_site
) -> None:
    from hooks.annotations import AnnotationStore, sqlite_engine
    from operators.candidates import ANNOTATE_PATH

    image_id, site = _preprocessed_image(embedded_site)
    # 128 px crops: several chunks for a small slide
    conf = {"image_ids": [image_id], "rule": "quantile", "quantile": 0.5, "crop_size": 128}
    result, output = run_dag("celldetector_candidates", conf)
    assert result["state"] == "success", output[-6000:]
    tasks = result["tasks"]
    selected = tasks["image.select_candidates[0]"]["xcom"]
    loaded = tasks["image.load_candidates[0]"]["xcom"]
    chunks = selected["crops"]["chunks"]
    assert selected["rule"] == "quantile" and selected["rule_params"]["quantile"] == 0.5
    assert len(chunks) >= 2, "the crops cross the gateway in more than one chunk"
    assert loaded["chunks"] == len(chunks) and loaded["candidates"] == selected["candidates"] > 5

    # what the store holds equals the chunks the job wrote on the cluster side
    outputs = site.job_root / selected["job_id"] / "outputs"
    rows = [r for name in chunks for r in json.loads((outputs / name).read_text())["candidates"]]
    store = AnnotationStore(sqlite_engine(Path(airflow_env["AIRFLOW_HOME"]) / "var"
                                          / "annotations.sqlite"))
    (cset,) = store.candidate_sets(image_id=image_id)
    assert cset["id"] == loaded["set_id"] and cset["rule"] == "quantile"
    assert cset["run_id"] == result["run_id"] and cset["dag_id"] == "celldetector_candidates"
    assert cset["thresholds"] == {t["roi"]: t["threshold"] for t in selected["thresholds"]}
    stored = {c["nucleus_id"]: c for c in store.candidates(cset["id"])}
    assert set(stored) == {r["id"] for r in rows}
    row = rows[len(rows) // 2]
    cand = store.candidate(stored[row["id"]]["id"])
    assert {(c["kind"], c["zoom"]) for c in cand["crops"]} == {
        (kind, int(zoom)) for zoom, kinds in row["crops"].items() for kind in kinds
    } >= {("composite", 1), ("composite", 2), ("dapi", 1), ("marker", 2)}
    png = base64.b64decode(row["crops"]["2"]["composite"])
    assert store.crop(cand["id"], "composite", 2) == png
    assert stored[row["id"]]["stats"]["marker_value"] == row["marker_value"]

    # the task log and its extra link name the annotation page of the set
    path = ANNOTATE_PATH.format(set_id=cset["id"])
    assert path == f"/omeflow/annotate?set={cset['id']}"
    assert f"annotation page: {loaded['url']}" in output, output[-3000:]
    assert loaded["url"].endswith(path)
    links = _link_xcom(airflow_env, result["run_id"])
    assert any(str(link).endswith(path) for link in links), (
        links, [ln for ln in output.splitlines() if "link" in ln.lower()][-10:])
