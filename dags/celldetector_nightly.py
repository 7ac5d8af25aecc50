"""celldetector_nightly: new images of a dataset or tag → preprocess → predict → writeback.

Runs on ``[omeflow] nightly_cron`` (default ``0 2 * * *``, 02:00 UTC), one run at a time, no
catch-up. Each run:

1. **current_model**: the classifier marked current in the registry (``celldetector_train``
   marks a model current when it beats the current one; an engineer may promote one). With
   none, the run ends here (the rest skipped) with a message saying how to mark one;
2. **find_images** (on the cluster): the images of ``[omeflow] nightly_dataset`` and/or
   ``nightly_tag`` (the DAG params of the same names: a manual run's conf may override them) that
   have no results for that model (no map annotation under ``omeflow.celldetector/<model>``),
   at most ``nightly_max_images``; its summary says why each other image was skipped;
3. per image (a mapped task group): **check_images** (channels, tissue ROI) → **export_zarr**
   → **segment_nuclei** → **ecdf** → **predict** → **writeback**, the same operators as
   ``celldetector_preprocess`` and ``celldetector_predict``. An image that fails stops only
   its own group; the others go on. writeback writes the densities map annotation that marks
   the image done, so a second run the same night finds nothing to do.

Why one DAG with a mapped task group rather than Assets or ``TriggerDagRunOperator`` starting
the existing DAGs: those DAGs open with a whole-run ``check_images`` (one bad image fails the
batch) and would each be one run per stage, chained by run-level events; here each image's
chain is its own group of tasks, so a failure is isolated per image, the run's record shows
every image of the night in one place, the model is resolved once for the whole batch, and
the operators and the step-generated form fields (so the settings) are the ones the other
DAGs use. The stages chain by task dependencies: nothing polls.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, task, task_group

from hpc_jobs.registry import (
    CHECK_IMAGES,
    ECDF,
    EXPORT_ZARR,
    FIND_IMAGES,
    PREDICT,
    SEGMENT_NUCLEI,
    WRITEBACK,
)
from operators.celldetector import EcdfOperator, ExportZarrOperator, SegmentNucleiOperator
from operators.nightly import CurrentModelOperator, FindImagesOperator, nightly_settings
from operators.params import form_args, resources_param, step_form
from operators.prediction import PredictOperator, WritebackOperator
from operators.step import StepOperator

#: The per-image steps, in order.
PIPELINE = [CHECK_IMAGES, EXPORT_ZARR, SEGMENT_NUCLEI, ECDF, PREDICT, WRITEBACK]
#: Step fields this DAG fills itself: the image (list), the model, the array phase, the run
#: recorded with the results, the tissue rule and the densities (their map annotation marks
#: an image done), and the selection (the DAG params ``nightly_*``, defaults from the
#: settings of the same names). ``score_nuclei`` is celldetector_train's active learning.
FILLED_BY_DAG = ("image_id", "image_ids", "classifier", "phase", "run_label", "need_tissue",
                 "densities", "dataset", "tag", "max_images", "score_nuclei")
SETTINGS = nightly_settings()
DAG_ONLY_PARAMS: dict[str, Param] = {
    "nightly_dataset": Param(SETTINGS.dataset, type=["integer", "null"], minimum=1,
                     description="dataset id whose new images to process "
                     "(default: [omeflow] nightly_dataset)"),
    "nightly_tag": Param(SETTINGS.tag, type=["integer", "string", "null"],
                 description="tag (annotation id or text) whose new images to process "
                 "(default: [omeflow] nightly_tag)"),
    "nightly_max_images": Param(SETTINGS.max_images, type=["integer", "null"], minimum=1,
                        description="at most this many images per run "
                        "(default: [omeflow] nightly_max_images)"),
    "segment_array_tasks": Param(1, type="integer", minimum=1, maximum=256,
                                 description="split segmentation over this many Slurm array "
                                 "tasks (large images)"),
    "predict_array_tasks": Param(1, type="integer", minimum=1, maximum=256,
                                 description="split prediction over this many Slurm array "
                                 "tasks (large images)"),
    "hpc_resources": resources_param(PIPELINE),
}


def _step_args(step: str) -> dict[str, str]:
    """The run's values for ``step`` and its resource overrides."""
    return {**form_args(step, exclude=FILLED_BY_DAG),
            "hpc_resources": "{{ params.hpc_resources.get('%s', {}) }}" % step,  # noqa: UP031
            "poll_interval": 2.0}


@task
def found_image_ids(summary: dict) -> list[int]:
    """The image ids find_images picked (the map over images; empty: nothing to do)."""
    return [int(i) for i in summary["image_ids"]]


@task
def one_image(image_id: int) -> list[int]:
    """``[image_id]``: check_images takes a list."""
    return [int(image_id)]


with DAG(
    dag_id="celldetector_nightly",
    description="New images of a dataset or tag: preprocess, predict with the current model, "
    "write back",
    doc_md=__doc__,
    schedule=SETTINGS.cron,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["omeflow", "celldetector"],
    params={**step_form([FIND_IMAGES, *PIPELINE], exclude=FILLED_BY_DAG), **DAG_ONLY_PARAMS},
) as dag:
    model = CurrentModelOperator(task_id="current_model")
    find = FindImagesOperator(
        task_id=FIND_IMAGES, classifier=model.output["classifier"],
        dataset="{{ params.nightly_dataset }}", tag="{{ params.nightly_tag }}",
        max_images="{{ params.nightly_max_images }}", **_step_args(FIND_IMAGES),
    )
    model >> find

    @task_group(group_id="image")
    def per_image(image_id: int) -> None:
        """check → export → segment → ecdf → predict → writeback for one image."""
        check = StepOperator(task_id=CHECK_IMAGES, step=CHECK_IMAGES,
                             image_ids=one_image(image_id), dataset=None, tag=None,
                             need_tissue=True,
                             **_step_args(CHECK_IMAGES))
        export = ExportZarrOperator(task_id=EXPORT_ZARR, image_id=image_id,
                                    **_step_args(EXPORT_ZARR))
        segment = SegmentNucleiOperator(task_id=SEGMENT_NUCLEI, image_id=image_id,
                                        array_tasks="{{ params.segment_array_tasks }}",
                                        **_step_args(SEGMENT_NUCLEI))
        ecdf = EcdfOperator(task_id=ECDF, image_id=image_id, **_step_args(ECDF))
        predict = PredictOperator(task_id=PREDICT, image_id=image_id,
                                  classifier=model.output["classifier"],
                                  array_tasks="{{ params.predict_array_tasks }}",
                                  score_nuclei=None, **_step_args(PREDICT))
        writeback = WritebackOperator(task_id=WRITEBACK, image_id=image_id,
                                      classifier=model.output["classifier"],
                                      run_label="{{ run_id }}", densities=True,
                                      **_step_args(WRITEBACK))
        check >> export >> segment >> ecdf >> predict >> writeback

    per_image.expand(image_id=found_image_ids(find.output))
