"""celldetector_train: labels in the annotation store → a trained classifier in the registry.

1. **label_snapshot** (here): the current labels of the chosen candidate sets (``set_ids``)
   and/or images (``labelled_image_ids``) as a compact snapshot ``[image, nucleus, 1|0]``
   (unsure and conflicting labels left out) with its sha256. Refuses with fewer than
   ``[omeflow] min_labels_per_class`` (default 20) labels of a class, naming how many are
   missing. The model current in the registry (if any) is compared with.
2. **train_classifier** (on the cluster): ResNet-50, split by image, metrics on the held-out
   images next to the marker-mean baseline's (and the current model's); weights under the
   site's model folder.
3. **register_model** (here): the model in the annotation store's registry (path, params,
   snapshot hash and time, metrics, git commit); it becomes current when none is, when it
   beats the current one on the same held-out cells, or with ``promote``.
4. **Active learning** (``operators/scoring.py``): the new model scores the unlabelled
   candidates of every candidate set of the images whose labels trained it: **score_plan**
   lists them, **score_candidates** (``predict`` with ``score_nuclei``, one job per image,
   mapped) classifies only those nuclei on the cluster, and **apply_scores** fetches their
   probabilities through the gateway and stores the uncertainty ``1 - |2p - 1|`` with
   ``set_scores``: the annotation page's "most uncertain first" order serves them next.

Every form field except those in ``DAG_ONLY_PARAMS`` is a field of ``train_classifier``'s
params model, generated from it with its bounds and default.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, Param, task

from hpc_jobs.registry import PREDICT, TRAIN_CLASSIFIER
from operators.image_dag import IMAGE_DAG_SETTINGS
from operators.params import form_args, resources_param, step_form
from operators.step import StepOperator

#: Step fields this DAG fills itself (from the snapshot and the registry).
FILLED_BY_DAG = ("labels", "snapshot_hash", "compare_with")
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 1000}
#: The form params that are not step fields.
DAG_ONLY_PARAMS: dict[str, Param] = {
    "set_ids": Param([], **_IDS, description="candidate sets whose labels train the model"),
    "labelled_image_ids": Param([], **_IDS, description="images whose labels (in any set) "
                                "train the model"),
    "promote": Param(False, type="boolean", description="make the new model current even "
                     "if it does not beat the current one"),
    "annotations_conn_id": Param("omeflow_annotations", type="string", maxLength=250,
                                 description="Airflow connection of the annotation store"),
    "hpc_resources": resources_param([TRAIN_CLASSIFIER]),
}

with DAG(
    dag_id="celldetector_train",
    description="Train a cell classifier on the labels of candidate sets; register it",
    doc_md=__doc__,
    params={**step_form([TRAIN_CLASSIFIER], exclude=FILLED_BY_DAG), **DAG_ONLY_PARAMS},
    **{**IMAGE_DAG_SETTINGS, "tags": ["omeflow", "celldetector", "classifier"]},
) as dag:

    @task(task_id="label_snapshot")
    def label_snapshot(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The label snapshot and the current model it is compared with."""
        from airflow.sdk import get_current_context

        from operators.candidates import open_annotation_store
        from operators.training import build_snapshot, min_labels_per_class

        params = params or get_current_context()["params"]
        import logging

        store = open_annotation_store(params["annotations_conn_id"], logging.getLogger(__name__))
        snap = build_snapshot(store, params["set_ids"], params["labelled_image_ids"],
                              min_labels_per_class())
        current = store.current_model()
        snap["current_id"] = current["id"] if current else None
        snap["compare_with"] = current["name"] if current else None
        print(f"label snapshot {snap['snapshot_hash']}: {snap['counts']}; unsure dropped "
              f"{snap['unsure_dropped']}, conflicts dropped {snap['conflicts_dropped']}; "
              f"current model: {snap['compare_with']}")
        return snap

    snapshot = label_snapshot()
    xcom = "ti.xcom_pull(task_ids='label_snapshot')"
    train = StepOperator(
        task_id=TRAIN_CLASSIFIER,
        step=TRAIN_CLASSIFIER,
        labels="{{ %s['labels'] }}" % xcom,  # noqa: UP031 - Jinja
        snapshot_hash="{{ %s['snapshot_hash'] }}" % xcom,  # noqa: UP031 - Jinja
        compare_with="{{ %s['compare_with'] }}" % xcom,  # noqa: UP031 - Jinja
        **form_args(TRAIN_CLASSIFIER, exclude=FILLED_BY_DAG),
        hpc_resources="{{ params.hpc_resources.get('%s', {}) }}" % TRAIN_CLASSIFIER,  # noqa: UP031
        poll_interval=2.0,
    )
    snapshot >> train

    @task(task_id="register_model")
    def register(summary: dict[str, Any], snap: dict[str, Any],
                 params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The trained model in the registry; current by the rule in the module docs."""
        import logging

        from airflow.sdk import get_current_context

        from operators.candidates import open_annotation_store
        from operators.training import register_model

        params = params or get_current_context()["params"]
        store = open_annotation_store(params["annotations_conn_id"], logging.getLogger(__name__))
        out = register_model(store, summary, snap, promote=bool(params["promote"]),
                             current_id=snap.get("current_id"))
        m = summary["metrics"]
        print(f"model {out['model_id']} ({summary['path']}): current={out['current']} "
              f"({out['reason']}); held-out ROC-AUC {m['model']['roc_auc']} vs marker mean "
              f"{m['baseline_marker_mean']['roc_auc']}")
        return out

    registered = register(train.output, snapshot)

    @task(task_id="score_plan")
    def score_plan(registered: dict[str, Any], snap: dict[str, Any],
                   params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One ``predict`` job's arguments per image with unlabelled candidates."""
        import logging

        from airflow.sdk import get_current_context

        from operators.candidates import open_annotation_store
        from operators.scoring import scoring_plan

        params = params or get_current_context()["params"]
        store = open_annotation_store(params["annotations_conn_id"], logging.getLogger(__name__))
        plan = scoring_plan(store, {int(i) for i, _, _ in snap["labels"]}, registered["path"])
        print(f"active learning: {sum(len(p['score_nuclei']) for p in plan)} unlabelled "
              f"candidates of {len({p['image_id'] for p in plan})} image(s) to score")
        return plan

    scoring = StepOperator.partial(
        task_id="score_candidates", step=PREDICT, poll_interval=2.0,
    ).expand_kwargs(score_plan(registered, snapshot))

    @task(task_id="apply_scores")
    def apply(summaries: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Fetch the probabilities; store each unlabelled candidate's uncertainty."""
        import logging

        from airflow.sdk import get_current_context

        from hooks.hpc import HpcGatewayHook
        from operators.candidates import open_annotation_store
        from operators.scoring import score_all

        params = params or get_current_context()["params"]
        store = open_annotation_store(params["annotations_conn_id"], logging.getLogger(__name__))
        out = score_all(store, HpcGatewayHook(), list(summaries))
        for row in out:
            print(f"image {row['image_id']}: {row['scored']} candidates scored in sets "
                  f"{row['sets']}")
        return out

    apply(scoring.output)
