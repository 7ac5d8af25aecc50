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

import pendulum
from airflow.sdk import DAG, Param, task, task_group

from hpc_jobs.registry import CHECK_IMAGES, SELECT_CANDIDATES
from operators.candidates import LoadCandidatesOperator
from operators.params import form_args, form_checker, resources_param, step_form
from operators.step import StepOperator

#: Step fields this DAG fills itself: ``image_id`` (the mapped image), ``need_tissue``
#: (always: candidates are nuclei in tissue).
FILLED_BY_DAG = ("image_id", "need_tissue")
#: The form params that are not step fields.
DAG_ONLY_PARAMS: dict[str, Param] = {"hpc_resources": resources_param([SELECT_CANDIDATES])}

with DAG(
    dag_id="celldetector_candidates",
    description="Candidate nuclei (marker above a per-ROI eCDF quantile) with crops, loaded "
    "for annotation",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,
    max_active_runs=4,
    tags=["omeflow", "celldetector"],
    doc_md=__doc__,
    params={
        **step_form([CHECK_IMAGES, SELECT_CANDIDATES], exclude=FILLED_BY_DAG,
                    defaults={"image_ids": [1]}),
        **DAG_ONLY_PARAMS,
    },
) as dag:
    check = StepOperator(
        task_id="check_images",
        step=CHECK_IMAGES,
        **form_args(CHECK_IMAGES, exclude=FILLED_BY_DAG),
        need_tissue=True,
        pre_execute=form_checker([CHECK_IMAGES, SELECT_CANDIDATES], exclude=FILLED_BY_DAG),
        poll_interval=2.0,
    )

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

    @task
    def checked_image_ids(summary: dict) -> list[int]:
        """The image ids that passed the check (the map over images)."""
        return [int(i) for i in summary["image_ids"]]

    per_image.expand(image_id=checked_image_ids(check.output))
