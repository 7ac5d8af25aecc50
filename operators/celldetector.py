"""The CellDetector preprocessing operators: thin, typed subclasses of HpcStepOperator.

Each one only names its step and turns its typed arguments into the step's params; the
cluster side validates them with the step's model. ``enabled`` (templated) lets a DAG skip a
step the user deselected in the trigger form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from hpc_jobs.protocol import job_key_for
from operators.hpc_step import HpcStepOperator
from operators.triggers import HpcJobTrigger


class _ImageStepOperator(HpcStepOperator):
    """A step on one image; skipped when ``enabled`` renders false."""

    template_fields: Sequence[str] = (*HpcStepOperator.template_fields, "image_id", "enabled")
    step_name = ""

    def __init__(self, *, image_id: Any, enabled: Any = True, **kwargs: Any) -> None:
        super().__init__(step=self.step_name, **kwargs)
        self.image_id = image_id
        self.enabled = enabled

    def prepare_params(self, context: Context) -> dict[str, Any]:
        return {**self.step_params, "image_id": int(self.image_id)}

    def execute(self, context: Context) -> Any:
        if self.enabled in (False, "False", "false", 0, None, ""):
            raise AirflowSkipException(f"{self.step_name} was not selected for this run")
        return super().execute(context)


class ExportZarrOperator(_ImageStepOperator):
    """Export an image from the store to OME-Zarr (NGFF 0.5) on cluster storage.

    :param image_id: image in the store (templated).
    :param overwrite: export again even if a complete Zarr exists.
    :param block_size: shard edge = the block one writer (and one Cellpose tile) owns.
    :param chunk_size: chunk edge inside shards (divides ``block_size``).
    """

    step_name = "export_zarr"

    def __init__(self, *, overwrite: bool = False, block_size: Any = 2048,
                 chunk_size: Any = 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_params = {"overwrite": overwrite, "block_size": block_size,
                            "chunk_size": chunk_size, **self.step_params}


class SegmentNucleiOperator(_ImageStepOperator):
    """Tiled Cellpose segmentation of one image, optionally as a Slurm array + merge.

    :param image_id: image (its Zarr must exist: run ExportZarrOperator first). Templated.
    :param dapi_channel: nuclear stain channel. :param diameter: nucleus diameter in px.
    :param model: Cellpose model name or a file in the site's model folders (default: the
        site's model, else the bootstrapped one).
    :param block_size: tile core edge; equals the Zarr shard edge of the export.
    :param array_tasks: > 1 splits the tiles over that many array tasks (one node each),
        followed by a merge job; 1 runs everything in one job (processes inside the node).
    """

    step_name = "segment_nuclei"
    template_fields: Sequence[str] = (*_ImageStepOperator.template_fields, "array_tasks")

    def __init__(self, *, dapi_channel: Any = 0, diameter: Any = 20.0, model: Any = None,
                 block_size: Any = 2048, array_tasks: Any = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_params = {"dapi_channel": dapi_channel, "diameter": diameter, "model": model,
                            "block_size": block_size, **self.step_params}
        self.array_tasks = array_tasks

    def execute(self, context: Context) -> Any:
        tasks = int(self.array_tasks or 1)
        if tasks > 1:
            self.step_params = {**self.step_params, "phase": "tiles"}
            self.hpc_resources = {**self.hpc_resources, "array": f"0-{tasks - 1}"}
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        if int(self.array_tasks or 1) <= 1:
            return super().execute_complete(context, event)
        self.raise_for_state(event)  # every array task finished
        # the tiles are done on every node: one merge job writes labels + the nuclei table
        ti = context["ti"]
        key = job_key_for(ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.try_number, "merge")
        params = {**self.prepare_params(context), "phase": "merge"}
        reply = self.hook.submit(self.step, key, params=params, resources=self.hpc_resources,
                                 secrets=self.mint_secrets(context))
        self.log.info("tiles done; merge job %s (native id %s)", reply.job_id, reply.native_id)
        self.defer(
            trigger=HpcJobTrigger(job_id=reply.job_id, hpc_conn_id=self.hpc_conn_id,
                                  poll_interval=self.poll_interval, native_id=reply.native_id),
            method_name="execute_merged",
        )

    def execute_merged(self, context: Context, event: dict[str, Any]) -> Any:
        """The merge job ended: its summary is the task's result."""
        return HpcStepOperator.execute_complete(self, context, event)


class EcdfOperator(_ImageStepOperator):
    """Histograms, eCDFs and quantiles per tissue ROI (holes subtracted) and channel.

    :param image_id: image (its Zarr must exist). Templated.
    :param channels: channels to measure (default: all).
    """

    step_name = "ecdf"

    def __init__(self, *, channels: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_params = {"channels": channels, **self.step_params}
