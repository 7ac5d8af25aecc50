"""``celldetector_preprocess`` end to end: bad input fails early; the full DAG through Slurm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.integration.test_cluster_check_dag import ssh_conn_env

pytestmark = pytest.mark.slow


def _embedded_store(airflow_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    from hooks.hpc import embedded_site_config
    from hpc_jobs.config import SiteConfig
    from hpc_jobs.stores.local import LocalStore

    monkeypatch.setenv("AIRFLOW_HOME", airflow_env["AIRFLOW_HOME"])
    monkeypatch.delenv("OMEFLOW_SITE_CONFIG", raising=False)
    site = SiteConfig.load(embedded_site_config())
    return LocalStore(site.store.path), site


def test_bad_input_fails_before_any_cluster_work(run_dag, airflow_env, monkeypatch) -> None:
    store, site = _embedded_store(airflow_env, monkeypatch)
    plain = np.full((2, 300, 400), 100, dtype=np.uint16)
    no_tissue = store.add_image("no-tissue", plain, ["DAPI", "CD8"])
    result, output = run_dag(
        "celldetector_preprocess", {"image_ids": [no_tissue, 9999], "dapi_channel": 5}
    )
    assert result["state"] == "failed"
    assert result["tasks"]["check_images"]["state"] == "failed"
    # every problem is reported at once, each naming its fix
    assert "9999" in output and "dapi_channel=5 is out of range" in output, output[-5000:]
    assert "no tissue ROI" in output and "tissue_" in output
    assert not any(
        k.startswith("image.") and v["state"] == "success" for k, v in result["tasks"].items()
    ), "no export ran for bad input"
    assert not (site.data_root / "images" / str(no_tissue) / "image.zarr").exists()


def test_a_dataset_or_tag_picks_the_runs_images(run_dag, airflow_env, monkeypatch) -> None:
    """A lab member picks "the images of dataset 'week 12'", not ids: the run maps over exactly
    the dataset's images, and its first task's log says how many matched and which."""
    store, site = _embedded_store(airflow_env, monkeypatch)
    plain = np.full((2, 128, 160), 100, dtype=np.uint16)
    first, second, outside = (store.add_image(f"pick-{i}", plain, ["DAPI", "CD8"])
                              for i in range(3))
    dataset = store.create_dataset("week 12", [first, second])
    result, output = run_dag("celldetector_preprocess",
                             {"dataset": dataset, "steps": ["export_zarr"]})
    assert result["state"] == "success", output[-5000:]
    check = result["tasks"]["check_images"]["xcom"]
    assert check["image_ids"] == [first, second]
    assert check["matched"] == {f"dataset {dataset}": [first, second]}
    assert f"2 images picked: [{first}, {second}]" in output, output[-5000:]
    exports = {k: v for k, v in result["tasks"].items() if k.startswith("image.export_zarr")}
    assert sorted(v["xcom"]["image_id"] for v in exports.values()) == [first, second]
    assert not (site.data_root / "images" / str(outside) / "image.zarr").exists()


def _sandbox_image(sandbox: dict[str, Any], width: int, height: int, seed: int):
    """A synthetic slide in the sandbox's store, readable by the HPC user."""
    from hpc_jobs.sandbox import fix_permissions
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import SynthSpec, generate

    store = LocalStore(Path(sandbox["store"]))
    truth = Path(sandbox["data_root"]) / "truth" / f"pytest-{width}x{height}-{seed}"
    synth = generate(SynthSpec(width=width, height=height, seed=seed), store, out_truth=truth)
    fix_permissions()
    return store, synth


@pytest.mark.sandbox
def test_full_preprocess_dag_through_slurm(run_dag, sandbox) -> None:
    store, synth = _sandbox_image(sandbox, 1100, 800, seed=11)
    image_id = synth["image_id"]
    result, output = run_dag(
        "celldetector_preprocess", {"image_ids": [image_id]}, env=ssh_conn_env(sandbox)
    )
    assert result["state"] == "success", output[-6000:]
    tasks: dict[str, Any] = result["tasks"]
    seg = tasks["image.segment_nuclei[0]"]["xcom"]
    assert abs(seg["nuclei"] - synth["nuclei"]) <= 0.1 * synth["nuclei"], (seg, synth)
    image_dir = Path(sandbox["data_root"]) / "images" / str(image_id)
    table = pd.read_parquet(image_dir / "nuclei.parquet")
    assert len(table) == seg["nuclei"]
    assert (image_dir / "image.zarr" / "labels" / "nuclei").is_dir()
    summary = json.loads((image_dir / "ecdf" / "summary.json").read_text())
    names = {roi["roi"] for roi in summary["rois"]}
    assert names and all(n.startswith("tissue_") for n in names)
    # the eCDF was attached to the image in the store, under its namespace
    assert any(a.namespace == "omeflow.ecdf" for a in store.list_attachments(image_id))


@pytest.mark.sandbox
def test_segmentation_as_slurm_array_plus_merge(run_dag, sandbox) -> None:
    """Tiles over a 2-task Slurm array, then one merge job: the same nuclei as one job."""
    _, synth = _sandbox_image(sandbox, 1000, 700, seed=5)
    conf = {
        "image_ids": [synth["image_id"]],
        "steps": ["export_zarr", "segment_nuclei"],
        "block_size": 512,
        "segment_array_tasks": 2,
    }
    result, output = run_dag("celldetector_preprocess", conf, env=ssh_conn_env(sandbox))
    assert result["state"] == "success", output[-6000:]
    seg = result["tasks"]["image.segment_nuclei[0]"]["xcom"]
    assert seg["tiles"] == 4, seg  # 2 x 2 tiles of 512 px
    assert "merge job" in output, "the merge ran as its own job after the array"
    assert abs(seg["nuclei"] - synth["nuclei"]) <= 0.1 * synth["nuclei"], (seg, synth)
    table = pd.read_parquet(
        Path(sandbox["data_root"]) / "images" / str(synth["image_id"]) / "nuclei.parquet"
    )
    xy = table[["x", "y"]].to_numpy()
    d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
    assert d.min() > 3, "no nucleus counted twice on a tile seam"


def test_full_preprocess_dag_on_the_embedded_default(run_dag, airflow_env, monkeypatch) -> None:
    """The main job's path: local store, local scheduler; segmentation spawns 2 workers."""
    from hpc_jobs.synth import SynthSpec, generate

    store, site = _embedded_store(airflow_env, monkeypatch)
    synth = generate(
        SynthSpec(width=900, height=700, seed=21),
        store,
        out_truth=site.data_root / "truth" / "pytest-local",
    )
    conf = {"image_ids": [synth["image_id"]], "block_size": 512}
    result, output = run_dag("celldetector_preprocess", conf)
    assert result["state"] == "success", output[-6000:]
    seg = result["tasks"]["image.segment_nuclei[0]"]["xcom"]
    assert seg["tiles"] == 4 and abs(seg["nuclei"] - synth["nuclei"]) <= 0.1 * synth["nuclei"]
    assert "2 process(es)" in output, "segmentation ran its process pool inside the job"
    summary = json.loads(
        (site.data_root / "images" / str(synth["image_id"]) / "ecdf" / "summary.json").read_text()
    )
    assert {r["roi"] for r in summary["rois"]} == {
        r.name for r in store.get_rois(synth["image_id"]) if r.name.startswith("tissue_")
    }
