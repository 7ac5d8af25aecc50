"""``ArrayMergeStepOperator``: a step that runs as a Slurm job array, then a merge job.

Steps with phases ``all`` / ``tiles`` / ``merge`` (``segment_nuclei``: tiles of the image;
``predict``: ranges of the nuclei table) share this pattern: with ``array_tasks`` > 1 the
first job is an array (``phase="tiles"``, ``array=0-(n-1)``); when every task finished, the
operator submits the merge (``phase="merge"``, its own job key) and defers again; the merge's
summary is the task's result (the merge is an array of the same size unless
``merge_as_array`` is False). With ``array_tasks`` = 1 one job runs ``phase="all"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from airflow.sdk import Context

from operators.hpc_step import MERGE_PHASE, HpcStepOperator, task_job_key
from operators.step import StepOperator

#: The phase of the array's tasks (the steps' ``Params.phase`` value).
ARRAY_PHASE = "tiles"


class ArrayMergeStepOperator(StepOperator):
    """A :class:`StepOperator` whose step may run as an array + merge.

    :param array_tasks: > 1 splits the step's work over that many array tasks, then submits
        the merge job (``phase="merge"``) whose summary is the task's result; 1 runs
        everything in one job. Templated.
    """

    fills: ClassVar[frozenset[str]] = frozenset({"phase"})
    template_fields: Sequence[str] = (*StepOperator.template_fields, "array_tasks")
    #: Whether the merge runs as an array of the same size (segmentation: task t paints its
    #: tiles' cores) or as one job (``predict``: concatenates the parts).
    merge_as_array: ClassVar[bool] = True

    def __init__(self, *, array_tasks: Any = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.array_tasks = array_tasks

    def _tasks(self) -> int:
        return int(self.array_tasks or 1)

    def execute(self, context: Context) -> Any:
        tasks = self._tasks()
        if tasks > 1:
            self.step_params = {**self.step_params, "phase": ARRAY_PHASE}
            self.hpc_resources = {**self.hpc_resources, "array": f"0-{tasks - 1}"}
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        if self._tasks() <= 1:
            return super().execute_complete(context, event)
        self.raise_for_state(event)  # every array task finished
        params = {**self.prepare_params(context), "phase": MERGE_PHASE}
        if not self.merge_as_array:
            self.hpc_resources = {k: v for k, v in self.hpc_resources.items() if k != "array"}
        reply = self.submit_job(context, self.merge_job_key(context), params)
        self.log.info("array done; merge job %s (native id %s)", reply.job_id, reply.native_id)
        self.defer(trigger=self.trigger_for(reply.job_id, reply.native_id),
                   method_name="execute_merged")

    def merge_job_key(self, context: Context, try_number: int | None = None) -> str:
        """The merge job's own key (the array job has :meth:`job_key`)."""
        ti = context["ti"]
        return task_job_key(ti.dag_id, ti.run_id, ti.task_id, ti.map_index,
                            ti.try_number if try_number is None else try_number, MERGE_PHASE)

    def job_keys_of_try(self, context: Context, try_number: int) -> list[tuple[str, str]]:
        """The array job, then its merge job (resumed in :meth:`execute_merged`): a retry
        reattaches to whichever of an earlier try's two is still running (never both: the
        merge is submitted once the array ended)."""
        keys = super().job_keys_of_try(context, try_number)
        if self._tasks() <= 1:
            return keys
        return [*keys, (self.merge_job_key(context, try_number), "execute_merged")]

    def execute_merged(self, context: Context, event: dict[str, Any]) -> Any:
        """The merge job ended: its summary is the task's result."""
        return HpcStepOperator.execute_complete(self, context, event)
