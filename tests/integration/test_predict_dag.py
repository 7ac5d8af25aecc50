"""``celldetector_predict`` end to end on the embedded default, with ``dag.test()``.

A small synthetic slide is prepared in the embedded site (export + eCDF by the real steps; the
truth's nuclei and labels stand in for Cellpose, which the preprocess DAG's tests cover), an
untrained ResNet-50 is saved with ``save_classifier`` and registered in the embedded annotation
store (plumbing: accuracy is the training tests' business). The DAG resolves ``current``,
predicts on a 2-task array + merge and writes back through the gateway (local scheduler).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_predict_dag_predicts_every_nucleus_and_writes_back_once(
    run_dag, airflow_env, monkeypatch, tmp_path, embedded_site, embedded_annotations
) -> None:
    from hpc_jobs.predictions import namespace_for
    from hpc_jobs.protocol import Resources, Secrets
    from hpc_jobs.steps.base import StepContext
    from hpc_jobs.stores.local import LocalStore
    from tests.science.predict_slide import prepare_slide
    from tests.science.test_predict import save_untrained

    site = embedded_site
    ctx = StepContext(job_dir=site.job_root / "pytest-predict-prep", site=site,
                      resources=Resources(cpus=1), secrets=Secrets())
    slide = prepare_slide(tmp_path, ctx)
    image_id, n_nuclei = slide["image_id"], len(slide["truth"])
    # threshold 0: every nucleus counts as positive, so every one gets an ROI
    path = save_untrained(site.models.classifier_dir(site.data_root), "dagtest", threshold=0.0)
    store = embedded_annotations
    older = store.add_model(str(path.with_name("older.pt")), {}, "x", {})
    newest = store.add_model(str(path), {"arch": "resnet50"}, "hash", {"roc_auc": 0.5})
    assert newest > older

    conf = {"image_ids": [image_id], "registered_model": "current", "predict_array_tasks": 2,
            "inference_batch": 4, "device": "cpu"}
    for attempt in (1, 2):  # a second run replaces, never duplicates
        result, output = run_dag("celldetector_predict", conf)
        assert result["state"] == "success", output[-6000:]
        tasks = result["tasks"]
        assert tasks["resolve_model"]["xcom"]["model_id"] == newest
        pred, wb = tasks["image.predict[0]"]["xcom"], tasks["image.writeback[0]"]["xcom"]
        assert pred["parts"] == 2 and pred["crops"] == n_nuclei, attempt
        assert wb["cells"] == wb["positives"] == wb["rois"] == n_nuclei
        assert {d["name"] for d in wb["densities"]} == {"tissue_1", "tissue_2"}
    with LocalStore(site.store.path) as images:
        assert len(images.get_rois(image_id, namespace_for("dagtest"))) == n_nuclei
        (ann,) = images.get_map_annotations(image_id, namespace_for("dagtest"))
        assert ann.values["run"] == result["run_id"]
