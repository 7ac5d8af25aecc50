"""``celldetector_train`` and ``celldetector_predict`` through the real Slurm sandbox.

Airflow (``dag.test()``) → SSH to 127.0.0.1:2222 (the gateway as the sandbox key's forced
command) → ``sbatch`` → slurmd → the job as the unprivileged service user, and back.

Two small synthetic slides with decoys are prepared in the sandbox's store and data root
in-process (:func:`hpc_jobs.classifier.synthetic.prepare_slide`: the real ``export_zarr`` and
``ecdf`` steps, the truth's nuclei instead of Cellpose, whose Slurm run the preprocess DAG's
sandbox tests cover), then handed to the service user. Their labels come from the truth and
live on the Airflow side, in the annotation store of the ``run_dag`` home; the cluster only
sees the label snapshot in the training job's request.

The DAG runs use a copy of the session's migrated ``AIRFLOW_HOME`` of their own, so the model
registry they fill is not the one that the embedded-default DAG tests count and resolve
``current`` in (the session's tests share one ``run_dag`` home).
"""

from __future__ import annotations

import json
import pwd
import shutil
from pathlib import Path
from typing import Any
from uuid import uuid4

import pandas as pd
import pytest

from tests.integration.test_cluster_check_dag import ssh_conn_env
from tests.truth_sets import add_truth_set

pytestmark = [pytest.mark.slow, pytest.mark.sandbox]

#: Two 512x384 slides carry about 9 truth positives each: below the default minimum of 20
#: labels per class, so the DAGs run with this minimum ([omeflow] min_labels_per_class).
MIN_LABELS = 5


@pytest.fixture(scope="module")
def sandbox_dag_home(airflow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                     ) -> Path:
    """An ``AIRFLOW_HOME`` for this module's runs: the session's config and migrated DB."""
    src = Path(airflow_env["AIRFLOW_HOME"])
    home = tmp_path_factory.mktemp("airflow_home_sandbox_classifier")
    shutil.copy(src / "airflow.cfg", home / "airflow.cfg")
    (home / "var").mkdir()
    shutil.copy(src / "var" / "airflow.db", home / "var" / "airflow.db")
    return home


def _slurm_job(sandbox: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """The cluster's record (job.json) of the job a step task ran, checked to be Slurm's."""
    hpc_job = task["hpc_job"]
    assert hpc_job and str(hpc_job["native_id"]).isdigit(), hpc_job  # a Slurm job id
    record = json.loads((Path(sandbox["job_root"]) / hpc_job["job_id"] / "job.json").read_text())
    assert record["scheduler"] == "slurm" and record["native_id"] == hpc_job["native_id"], record
    return record


def _labelled_slides(sandbox: dict[str, Any], annotations: Any, tmp_path: Path
                     ) -> tuple[list[int], list[int], dict[int, pd.DataFrame]]:
    """Two decoy slides in the sandbox, candidate sets labelled from the truth.

    Returns (set ids, image ids, truth table per image)."""
    from hpc_jobs.classifier.synthetic import prepare_slide
    from hpc_jobs.config import SiteConfig
    from hpc_jobs.protocol import Resources, Secrets
    from hpc_jobs.sandbox import fix_permissions
    from hpc_jobs.steps.base import StepContext
    from hpc_jobs.synth import SynthSpec

    site = SiteConfig.load(sandbox["site_config"])
    ctx = StepContext(job_dir=tmp_path / "prep", site=site, resources=Resources(cpus=1),
                      secrets=Secrets())
    set_ids, image_ids, tables = [], [], {}
    tag = uuid4().hex[:8]
    try:
        for seed in (41, 42):
            spec = SynthSpec(width=512, height=384, seed=seed, decoy_fraction=0.5)
            image_id, table = prepare_slide(
                ctx, spec, Path(sandbox["data_root"]) / "truth" / f"pytest-classifier-{tag}-{seed}")
            set_id, _, _ = add_truth_set(annotations, image_id, table, "pytest-sandbox-train",
                                         "truth-bot")
            set_ids.append(set_id)
            image_ids.append(image_id)
            tables[image_id] = table
    finally:
        fix_permissions()  # written as root here; the jobs run as the service user
    return set_ids, image_ids, tables


def test_train_then_predict_dags_run_through_slurm(
    run_dag, sandbox, sandbox_dag_home, tmp_path
) -> None:
    from hooks.annotations import AnnotationStore, sqlite_engine
    from hpc_jobs.config import SiteConfig
    from hpc_jobs.predictions import namespace_for, predictions_path
    from hpc_jobs.stores.local import LocalStore

    annotations = AnnotationStore(
        sqlite_engine(sandbox_dag_home / "var" / "annotations.sqlite"), check_schema=False)
    annotations.migrate()
    set_ids, image_ids, tables = _labelled_slides(sandbox, annotations, tmp_path)
    env = {**ssh_conn_env(sandbox), "AIRFLOW_HOME": str(sandbox_dag_home),
           "AIRFLOW__OMEFLOW__MIN_LABELS_PER_CLASS": str(MIN_LABELS)}
    site = SiteConfig.load(sandbox["site_config"])
    service_uid = pwd.getpwnam(sandbox["user"]).pw_uid

    # -- train: label snapshot here, ResNet-50 on the cluster, registry here
    name = f"pytest-sandbox-{uuid4().hex[:8]}"
    # split_block 128: a 512x384 slide is one block of the default 512 px, and the training
    # image's blocks are what early stopping watches
    conf = {"set_ids": set_ids, "epochs": 2, "patience": 1, "input_size": 32, "name": name,
            "split_block": 128, "device": "cpu"}
    result, output = run_dag("celldetector_train", conf, env=env)
    assert result["state"] == "success", output[-6000:]
    tasks = result["tasks"]
    assert "via ssh" in output, "the gateway was reached over the sandbox's sshd"
    _slurm_job(sandbox, tasks["train_classifier"])
    registered = tasks["register_model"]["xcom"]
    model = annotations.model(registered["model_id"])
    path = Path(model["path"])
    assert path.name == f"{name}.pt"
    assert path.parent == site.models.classifier_dir(site.data_root)
    assert path.is_file() and path.stat().st_uid == service_uid, "written by the job's user"
    snapshot = tasks["label_snapshot"]["xcom"]
    assert model["data_hash"] == snapshot["snapshot_hash"]
    assert {int(i) for i, _, _ in snapshot["labels"]} == set(image_ids)
    assert model["params"]["split"]["kind"] == "by image"
    metrics = model["metrics"]
    assert metrics["model"]["n"] > 0 and "baseline_marker_mean" in metrics
    print(f"\nsandbox model {name}: held-out ROC-AUC {metrics['model']['roc_auc']} vs marker "
          f"mean {metrics['baseline_marker_mean']['roc_auc']} (2 epochs, {metrics['model']['n']}"
          " cells)")

    # -- predict + writeback on one slide with that model, by its registry id
    image_id = image_ids[1]
    conf = {"image_ids": [image_id], "registered_model": registered["model_id"],
            "inference_batch": 16, "device": "cpu"}
    result, output = run_dag("celldetector_predict", conf, env=env)
    assert result["state"] == "success", output[-6000:]
    tasks = result["tasks"]
    assert tasks["resolve_model"]["xcom"]["classifier"] == name
    pred_job = _slurm_job(sandbox, tasks["image.predict[0]"])
    wb_job = _slurm_job(sandbox, tasks["image.writeback[0]"])
    assert pred_job["native_id"] != wb_job["native_id"]

    image_dir = Path(sandbox["data_root"]) / "images" / str(image_id)
    predictions = pd.read_parquet(predictions_path(image_dir, name))
    nuclei = pd.read_parquet(image_dir / "nuclei.parquet")
    assert len(nuclei) == len(tables[image_id])
    assert sorted(predictions["id"]) == sorted(nuclei["id"]), "one row per nucleus"
    assert predictions["probability"].between(0, 1).all()
    positives = int(predictions["positive"].sum())
    assert positives > 0, "the seeded 2-epoch model calls some cells positive (ROIs to check)"
    wb = tasks["image.writeback[0]"]["xcom"]
    assert wb["cells"] == len(nuclei) and wb["positives"] == wb["rois"] == positives, wb
    with LocalStore(Path(sandbox["store"])) as store:
        rois = store.get_rois(image_id, namespace_for(name))
        assert len(rois) == positives
        (ann,) = store.get_map_annotations(image_id, namespace_for(name))
        assert ann.values["run"] == result["run_id"]
    print(f"predicted {len(predictions)} nuclei of image {image_id}: {positives} positive "
          "ROI(s) in the sandbox store")
