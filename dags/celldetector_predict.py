"""celldetector_predict: a registered classifier over every nucleus, results back to the image.

Needs the outputs of ``celldetector_preprocess`` for each image (OME-Zarr, nuclei table and
labels, eCDF per tissue ROI) and a classifier registered by ``celldetector_train``. The run
checks every image in seconds, looks the model up in the annotation store's registry
(``registered_model``: a model id, or ``current``: the one marked current, else the newest),
then per image (mapped):

1. **predict** (on the cluster): the classifier's probability for every nucleus to
   ``predictions/<model>.parquet``; ``predict_array_tasks`` > 1 splits the nuclei over a
   Slurm array, then one merge job concatenates the parts;
2. **writeback** (on the cluster, through the image store): one ROI per predicted positive
   (point or outline) under ``omeflow.celldetector/<model>`` (re-running replaces them; the
   lab's ROIs are never touched), the per-cell table, densities per tissue ROI.

Every form field except ``registered_model``, ``predict_array_tasks`` and ``hpc_resources``
is a field of a step's params model, generated from it with its bounds and default.
"""

from __future__ import annotations

from airflow.sdk import Param, task_group

from hpc_jobs.registry import PREDICT, WRITEBACK
from operators.image_dag import check_images, checked_image_ids, image_dag
from operators.params import form_args, resources_param
from operators.prediction import PredictOperator, ResolveClassifierOperator, WritebackOperator

STEPS = [PREDICT, WRITEBACK]
#: Step fields this DAG fills itself: the mapped image, the resolved classifier, the array
#: phase, the run recorded with the results, and the check's tissue rule (densities need it).
#: (score_nuclei is celldetector_train's active learning, never a form field here.)
FILLED_BY_DAG = ("image_id", "classifier", "phase", "run_label", "need_tissue", "score_nuclei")
DAG_ONLY_PARAMS: dict[str, Param] = {
    "registered_model": Param("current", type=["string", "integer"], pattern=r"^(current|[0-9]+)$",
                   description="registered model id, or 'current' (the model marked "
                   "current in the registry, else the newest)"),
    "predict_array_tasks": Param(1, type="integer", minimum=1, maximum=256,
                                 description="split prediction over this many Slurm array "
                                 "tasks (large slides)"),
    "hpc_resources": resources_param(STEPS),
}

with image_dag(
    "celldetector_predict",
    "A registered classifier over every nucleus; ROIs, per-cell table and densities back "
    "to the image",
    __doc__,
    steps=STEPS,
    filled=FILLED_BY_DAG,
    dag_only_params=DAG_ONLY_PARAMS,
) as dag:
    check = check_images(steps=STEPS, filled=FILLED_BY_DAG, need_tissue="{{ params.densities }}")
    model = ResolveClassifierOperator(task_id="resolve_model",
                                      model="{{ params.registered_model }}")
    check >> model

    @task_group(group_id="image")
    def per_image(image_id: int) -> None:
        """predict → writeback for one image."""
        predict = PredictOperator(
            task_id=PREDICT, image_id=image_id, classifier=model.output["classifier"],
            score_nuclei=None,  # every nucleus (a list is celldetector_train's scoring)
            **form_args(PREDICT, exclude=FILLED_BY_DAG),
            array_tasks="{{ params.predict_array_tasks }}",
            hpc_resources="{{ params.hpc_resources.get('%s', {}) }}" % PREDICT,  # noqa: UP031
            poll_interval=2.0,
        )
        writeback = WritebackOperator(
            task_id=WRITEBACK, image_id=image_id, classifier=model.output["classifier"],
            run_label="{{ run_id }}", **form_args(WRITEBACK, exclude=FILLED_BY_DAG),
            hpc_resources="{{ params.hpc_resources.get('%s', {}) }}" % WRITEBACK,  # noqa: UP031
            poll_interval=2.0,
        )
        predict >> writeback

    per_image.expand(image_id=checked_image_ids(check.output))
