"""celldetector_preprocess: OMERO image → OME-Zarr → Cellpose nuclei → eCDF per tissue ROI.

Pick images and channels in the trigger form (or REST ``conf``). The run first checks every
image in seconds (exists, channels in range, tissue ROI present when eCDF is selected) and
fails with a message naming the fix; then, per image (a mapped task group), the steps run
in order on the cluster:

1. **export_zarr**: the image as OME-NGFF 0.5 on cluster storage (later steps read it, not OMERO);
2. **segment_nuclei**: tiled parallel Cellpose on log(1+DAPI); labels + a Parquet nuclei table
   with per-channel window statistics;
3. **ecdf**: exact histograms, eCDFs and quantiles per tissue ROI (holes subtracted), attached
   to the image.

Deselected steps are skipped (their outputs from an earlier run are reused).

Every form field except ``steps``, ``segment_array_tasks`` and ``hpc_resources`` is a field of
a step's params model (``hpc_jobs/steps/<step>.py``), generated from it with its bounds and
default; ``hpc_resources`` overrides a step's cluster resources, e.g.
``{"segment_nuclei": {"time_min": 600, "mem_mb": 32000}}``.
"""

from __future__ import annotations

from airflow.sdk import Param, task_group

from hpc_jobs.registry import ECDF, EXPORT_ZARR, SEGMENT_NUCLEI
from operators.celldetector import EcdfOperator, ExportZarrOperator, SegmentNucleiOperator
from operators.image_dag import check_images, checked_image_ids, image_dag
from operators.params import form_args, resources_param

#: The per-image steps, in order (the ``steps`` param selects among them).
PIPELINE = [EXPORT_ZARR, SEGMENT_NUCLEI, ECDF]
#: Step fields this DAG fills itself, so they are not in the form: ``image_id`` (the mapped
#: image), ``phase`` (SegmentNucleiOperator), ``need_tissue`` (whether ecdf is selected).
FILLED_BY_DAG = ("image_id", "phase", "need_tissue")
#: The form params that are not step fields (every other one is generated from a step model).
DAG_ONLY_PARAMS: dict[str, Param] = {
    "steps": Param(
        PIPELINE, type="array", items={"type": "string", "enum": PIPELINE}, minItems=1,
        uniqueItems=True, description="which steps to run (deselected ones reuse earlier outputs)",
    ),
    "segment_array_tasks": Param(
        1, type="integer", minimum=1, maximum=256,
        description="split segmentation over this many Slurm array tasks (large images)",
    ),
    "hpc_resources": resources_param(PIPELINE),
}

with image_dag(
    "celldetector_preprocess",
    "Export to OME-Zarr, segment nuclei (Cellpose), eCDF per tissue ROI",
    __doc__,
    steps=PIPELINE,
    filled=FILLED_BY_DAG,
    dag_only_params=DAG_ONLY_PARAMS,
) as dag:
    check = check_images(
        steps=PIPELINE, filled=FILLED_BY_DAG,
        need_tissue="{{ '%s' in params.steps }}" % ECDF,  # noqa: UP031 - Jinja braces
    )

    def _step_args(step: str) -> dict[str, str]:
        """The form's values for ``step``, whether it runs, and its resource overrides."""
        return {
            **form_args(step, exclude=FILLED_BY_DAG),
            "enabled": "{{ '%s' in params.steps }}" % step,  # noqa: UP031
            "hpc_resources": "{{ params.hpc_resources.get('%s', {}) }}" % step,  # noqa: UP031
        }

    @task_group(group_id="image")
    def per_image(image_id: int) -> None:
        """export → segment → ecdf for one image."""
        export = ExportZarrOperator(
            task_id=EXPORT_ZARR, image_id=image_id, **_step_args(EXPORT_ZARR), poll_interval=2.0
        )
        segment = SegmentNucleiOperator(
            task_id=SEGMENT_NUCLEI, image_id=image_id, **_step_args(SEGMENT_NUCLEI),
            array_tasks="{{ params.segment_array_tasks }}", trigger_rule="none_failed",
            poll_interval=2.0,
        )
        ecdf = EcdfOperator(
            task_id=ECDF, image_id=image_id, **_step_args(ECDF), trigger_rule="none_failed",
            poll_interval=2.0,
        )
        export >> segment >> ecdf

    per_image.expand(image_id=checked_image_ids(check.output))
