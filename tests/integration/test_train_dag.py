"""``celldetector_train`` end to end on the embedded default, with ``dag.test()``.

Two small synthetic slides with decoys are prepared on the embedded site's data folder (the
real export and eCDF steps; the nuclei table from the synthetic truth instead of Cellpose, see
``hpc_jobs/classifier/synthetic.py``); their preselected nuclei are stored as candidate sets
and labelled from the truth in the embedded annotation store (a stand-in for people). The DAG
then builds the snapshot, trains through the gateway (local transport, local scheduler) and
registers the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.truth_sets import add_truth_set

pytestmark = pytest.mark.slow


def _labelled_sets(site: Any, store: Any) -> tuple[list[int], Any, Any]:
    from hpc_jobs.classifier.synthetic import prepare_slide
    from hpc_jobs.protocol import Resources, Secrets
    from hpc_jobs.steps.base import StepContext
    from hpc_jobs.synth import SynthSpec

    ctx = StepContext(job_dir=site.job_root / "pytest-train-prep", site=site,
                      resources=Resources(cpus=2), secrets=Secrets())
    set_ids = []
    for seed in (21, 22):
        spec = SynthSpec(width=640, height=512, seed=seed, decoy_fraction=0.5)
        image_id, table = prepare_slide(ctx, spec, site.data_root / "truth" / f"train-{seed}")
        set_id, cands, labels = add_truth_set(store, image_id, table, "pytest-train", "truth-bot")
        store.label(cands[labels[0][1]], "second-bot", "unsure")  # left out of the snapshot
        set_ids.append(set_id)
    return set_ids, store, site


def test_train_dag_snapshots_trains_registers_and_refuses_too_few_labels(
    run_dag, airflow_env, monkeypatch, embedded_site, embedded_annotations
) -> None:
    set_ids, store, site = _labelled_sets(embedded_site, embedded_annotations)
    conf = {"set_ids": set_ids, "epochs": 2, "patience": 1, "input_size": 32}
    result, output = run_dag("celldetector_train", conf)
    assert result["state"] == "success", output[-6000:]
    (model,) = store.models()
    assert model["current"] and store.current_model()["id"] == model["id"]  # none was current
    path = Path(model["path"])
    assert path.is_file() and path.parent == site.models.classifier_dir(site.data_root)
    from hpc_jobs.classifier.model import load_classifier
    from hpc_jobs.classifier.snapshot import snapshot_hash

    _, meta = load_classifier(path)
    expected = sorted([lab["image_id"], lab["nucleus_id"], int(lab["label"] == "positive")]
                      for sid in set_ids for lab in store.labels(set_id=sid)
                      if lab["annotator"] == "truth-bot")
    assert model["data_hash"] == meta["snapshot_hash"] == snapshot_hash(expected)
    assert model["labels_at"] is not None and model["params"]["set_ids"] == set_ids
    assert model["metrics"]["model"]["n"] > 0 and "baseline_marker_mean" in model["metrics"]
    assert model["params"]["split"]["kind"] == "by image"
    print(f"\nDAG model: held-out ROC-AUC {model['metrics']['model']['roc_auc']} vs marker "
          f"mean {model['metrics']['baseline_marker_mean']['roc_auc']} (2 epochs)")

    # a second model is compared with the current one on the same held-out cells, and
    # becomes current only if it beats it
    result, output = run_dag("celldetector_train", {**conf, "name": "second"})
    assert result["state"] == "success", output[-6000:]
    second, first = store.models()
    other = second["metrics"]["compare_with"]
    assert other["name"] == first["name"] and other["path"] == first["path"]
    assert other["n"] == second["metrics"]["model"]["n"] == first["metrics"]["model"]["n"]
    assert other["roc_auc"] == first["metrics"]["model"]["roc_auc"]  # same cells, same model
    wins = (second["metrics"]["model"]["roc_auc"], second["metrics"]["model"]["pr_auc"]) > (
        other["roc_auc"], other["pr_auc"])
    assert store.current_model()["id"] == (second["id"] if wins else first["id"])

    # too few labels: refused before any job, naming how many are missing
    result, output = run_dag("celldetector_train", {**conf, "set_ids": [set_ids[0]]},
                             env={"AIRFLOW__OMEFLOW__MIN_LABELS_PER_CLASS": "500"})
    assert result["state"] == "failed"
    assert "need 500 per class ([omeflow] min_labels_per_class)" in output
    pos = sum(1 for lab in store.labels(set_id=set_ids[0]) if lab["label"] == "positive")
    assert f"{500 - pos} more positive" in output
    assert len(store.models()) == 2
