"""celldetector_candidates: candidate nuclei for annotation, with their crops, per image.

Needs the outputs of ``celldetector_preprocess`` for each image (OME-Zarr, nuclei table and
labels, eCDF per tissue ROI). The run first checks every image in seconds (exists, channels
in range, a tissue ROI), then per image (mapped):

1. **select_candidates** (on the cluster): nuclei in a tissue ROI (holes excluded) whose
   marker statistic is above the ROI's eCDF quantile (``rule=quantile``, default q = 0.95) or
   a fixed threshold (``rule=fixed``, the original used 200); at most ``max_candidates``
   (a seeded sample). Renders 8-bit crops per channel plus a composite with the nucleus
   outline at two zooms, display range from the ROI's eCDF.
2. **load_candidates** (here): fetches the crop chunks through the gateway and stores the
   candidate set and its crops in the annotation store; its extra link "Annotate candidates"
   opens the annotation page (``/omeflow/annotate?set=<id>``).

Every form field except ``hpc_resources`` is a field of a step's params model, generated from
it with its bounds and default.
"""

from __future__ import annotations

from airflow.sdk import Param, task_group

from hpc_jobs.registry import SELECT_CANDIDATES
from operators.candidates import LoadCandidatesOperator
from operators.image_dag import check_images, checked_image_ids, image_dag
from operators.params import form_args, resources_param
from operators.step import StepOperator

#: Step fields this DAG fills itself: ``image_id`` (the mapped image), ``need_tissue``
#: (always: candidates are nuclei in tissue).
FILLED_BY_DAG = ("image_id", "need_tissue")
#: The form params that are not step fields.
DAG_ONLY_PARAMS: dict[str, Param] = {"hpc_resources": resources_param([SELECT_CANDIDATES])}

with image_dag(
    "celldetector_candidates",
    "Candidate nuclei (marker above a per-ROI eCDF quantile) with crops, loaded "
    "for annotation",
    __doc__,
    steps=[SELECT_CANDIDATES],
    filled=FILLED_BY_DAG,
    dag_only_params=DAG_ONLY_PARAMS,
) as dag:
    check = check_images(steps=[SELECT_CANDIDATES], filled=FILLED_BY_DAG, need_tissue=True)

    @task_group(group_id="image")
    def per_image(image_id: int) -> None:
        """select_candidates on the cluster → candidate set + crops in the annotation store."""
        select = StepOperator(
            task_id=SELECT_CANDIDATES,
            step=SELECT_CANDIDATES,
            image_id=image_id,
            **form_args(SELECT_CANDIDATES, exclude=FILLED_BY_DAG),
            hpc_resources="{{ params.hpc_resources.get('%s', {}) }}" % SELECT_CANDIDATES,  # noqa: UP031
            poll_interval=2.0,
        )
        LoadCandidatesOperator(task_id="load_candidates", summary=select.output)

    per_image.expand(image_id=checked_image_ids(check.output))
