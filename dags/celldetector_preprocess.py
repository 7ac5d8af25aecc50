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
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, task, task_group

from hpc_jobs.steps import check_images, segment_nuclei
from operators.celldetector import EcdfOperator, ExportZarrOperator, SegmentNucleiOperator
from operators.hpc_step import HpcStepOperator
from operators.params import param_from

STEPS = ["export_zarr", "segment_nuclei", "ecdf"]

with DAG(
    dag_id="celldetector_preprocess",
    description="Export to OME-Zarr, segment nuclei (Cellpose), eCDF per tissue ROI",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,
    max_active_runs=4,
    tags=["omeflow", "celldetector"],
    doc_md=__doc__,
    params={
        "image_ids": Param(
            [1], type="array", items={"type": "integer", "minimum": 1}, minItems=1, maxItems=1000,
            description="OMERO image ids to process",
        ),
        "dapi_channel": param_from(check_images.Params, "dapi_channel"),
        "marker_channel": param_from(check_images.Params, "marker_channel"),
        "steps": Param(
            STEPS, type="array", items={"type": "string", "enum": STEPS}, minItems=1,
            uniqueItems=True, description="which steps to run",
        ),
        "diameter": param_from(segment_nuclei.Params, "diameter"),
        "model": Param(
            None, type=["null", "string"],
            description="Cellpose model file or name on the cluster (empty: the site's model)",
        ),
        "block_size": Param(
            2048, type="integer", minimum=256, maximum=16384, multipleOf=256,
            description="edge (px) of the blocks one writer / one Cellpose tile owns "
            "(= the Zarr shard); 2048 suits whole slides",
        ),
        "segment_array_tasks": Param(
            1, type="integer", minimum=1, maximum=256,
            description="split segmentation over this many Slurm array tasks (large images)",
        ),
    },
) as dag:
    check = HpcStepOperator(
        task_id="check_images",
        step="check_images",
        step_params={
            "image_ids": "{{ params.image_ids }}",
            "dapi_channel": "{{ params.dapi_channel }}",
            "marker_channel": "{{ params.marker_channel }}",
            "need_tissue": "{{ 'ecdf' in params.steps }}",
        },
        poll_interval=2.0,
    )

    @task_group(group_id="image")
    def per_image(image_id: int) -> None:
        """export → segment → ecdf for one image."""
        export = ExportZarrOperator(
            task_id="export_zarr", image_id=image_id,
            block_size="{{ params.block_size }}",
            chunk_size="{{ [1024, params.block_size] | min }}",
            enabled="{{ 'export_zarr' in params.steps }}", poll_interval=2.0,
        )
        segment = SegmentNucleiOperator(
            task_id="segment_nuclei", image_id=image_id,
            dapi_channel="{{ params.dapi_channel }}", diameter="{{ params.diameter }}",
            model="{{ params.model }}", block_size="{{ params.block_size }}",
            array_tasks="{{ params.segment_array_tasks }}",
            enabled="{{ 'segment_nuclei' in params.steps }}", trigger_rule="none_failed",
            poll_interval=2.0,
        )
        ecdf = EcdfOperator(
            task_id="ecdf", image_id=image_id,
            enabled="{{ 'ecdf' in params.steps }}", trigger_rule="none_failed",
            poll_interval=2.0,
        )
        export >> segment >> ecdf

    @task
    def checked_image_ids(summary: dict) -> list[int]:
        """The image ids that passed the check (the map over images)."""
        return [int(i) for i in summary["image_ids"]]

    per_image.expand(image_id=checked_image_ids(check.output))
