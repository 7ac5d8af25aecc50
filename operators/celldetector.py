"""The CellDetector preprocessing operators: :class:`~operators.step.StepOperator` with the
step fixed. Their arguments are exactly the fields of the step's ``Params`` model
(``hpc_jobs/steps/<step>.py``), and only the values given are sent: the model's defaults apply
to the rest. Only segmentation adds behaviour of its own (tiles on a job array, then a merge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from hpc_jobs.registry import ECDF, EXPORT_ZARR, SEGMENT_NUCLEI
from operators.hpc_step import MERGE_PHASE, HpcStepOperator, task_job_key
from operators.step import StepOperator


class ExportZarrOperator(StepOperator):
    """Export an image from the store to OME-Zarr (NGFF 0.5) on cluster storage.

    Arguments: the fields of ``hpc_jobs.steps.export_zarr.Params`` (``image_id``,
    ``block_size``, ``chunk_size``, ``overwrite``, ``workers``), templated.
    """

    step_name = EXPORT_ZARR


class EcdfOperator(StepOperator):
    """Histograms, eCDFs and quantiles per tissue ROI (holes subtracted) and channel.

    Arguments: the fields of ``hpc_jobs.steps.ecdf.Params``, templated.
    """

    step_name = ECDF


class SegmentNucleiOperator(StepOperator):
    """Tiled Cellpose segmentation of one image, optionally as a Slurm array + merge.

    Arguments: the fields of ``hpc_jobs.steps.segment_nuclei.Params`` except ``phase`` (set
    here), templated, and:

    :param array_tasks: > 1 splits the tiles over that many array tasks (one node each), then
        a merge array (``phase="merge"``, its own job key: task t paints the cores of its
        tiles, task 0 writes the table) whose summary is the task's result; 1 runs everything
        in one job. Templated.
    """

    step_name = SEGMENT_NUCLEI
    fills = frozenset({"phase"})
    template_fields: Sequence[str] = (*StepOperator.template_fields, "array_tasks")

    def __init__(self, *, array_tasks: Any = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.array_tasks = array_tasks

    def _tasks(self) -> int:
        return int(self.array_tasks or 1)

    def execute(self, context: Context) -> Any:
        tasks = self._tasks()
        if tasks > 1:
            self.step_params = {**self.step_params, "phase": "tiles"}
            self.hpc_resources = {**self.hpc_resources, "array": f"0-{tasks - 1}"}
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        if self._tasks() <= 1:
            return super().execute_complete(context, event)
        self.raise_for_state(event)  # every array task finished
        # the tiles are done on every node: the merge writes labels + the nuclei table
        params = {**self.prepare_params(context), "phase": MERGE_PHASE}
        reply = self.submit_job(context, self.merge_job_key(context), params)
        self.log.info("tiles done; merge job %s (native id %s)", reply.job_id, reply.native_id)
        self.defer(trigger=self.trigger_for(reply.job_id, reply.native_id),
                   method_name="execute_merged")

    def merge_job_key(self, context: Context) -> str:
        """The merge job's own key (the tiles job has :meth:`job_key`)."""
        ti = context["ti"]
        return task_job_key(ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.try_number,
                            MERGE_PHASE)

    def deferred_job_ids(self, context: Context) -> list[str]:
        """The tiles job, and the merge job when there is one."""
        keys = super().deferred_job_ids(context)
        return [*keys, self.merge_job_key(context)] if self._tasks() > 1 else keys

    def execute_merged(self, context: Context, event: dict[str, Any]) -> Any:
        """The merge job ended: its summary is the task's result."""
        return HpcStepOperator.execute_complete(self, context, event)
