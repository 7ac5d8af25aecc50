"""The CellDetector operators' own logic with the gateway hook patched (the style of the
Airflow SSH provider's operator tests): ``execute`` defers with the right trigger, trigger
events fed to the completion methods lead to the next job or the result.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pendulum
import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException, TaskDeferred

from hpc_jobs.protocol import JobState, ResultReply, SubmitReply, job_key_for
from hpc_jobs.registry import SEGMENT_NUCLEI
from operators.celldetector import EcdfOperator, ExportZarrOperator, SegmentNucleiOperator
from operators.triggers import HpcJobTrigger

DAG_ID, RUN_ID = "celldetector_preprocess", "manual__2026-01-01"


def _context(task_id: str, map_index: int = 0, try_number: int = 1) -> dict[str, Any]:
    ti = mock.MagicMock(dag_id=DAG_ID, run_id=RUN_ID, task_id=task_id, map_index=map_index,
                        try_number=try_number)
    return {"ti": ti}


def _submitted(job_id: str, native_id: str = "101") -> SubmitReply:
    return SubmitReply(job_id=job_id, native_id=native_id, created=True, state=JobState.PENDING)


def _event(job_id: str, state: str = "COMPLETED", exit_code: int = 0) -> dict[str, Any]:
    return {"job_id": job_id, "native_id": "101", "state": state, "exit_code": exit_code}


@pytest.fixture
def hook():
    """The gateway hook the operators create, patched: submit answers with the given key."""
    with mock.patch("operators.hpc_step.HpcGatewayHook") as cls:
        instance = cls.return_value
        instance.transport = "local"
        instance.submit.side_effect = lambda step, key, **_: _submitted(key)
        instance.log.return_value = mock.MagicMock(text="job log\n", offset=0)
        yield instance


def test_segment_array_runs_tiles_then_merge_and_returns_the_merge_summary(hook) -> None:
    op = SegmentNucleiOperator(task_id="segment_nuclei", image_id=7, block_size=512,
                               array_tasks=3)
    ctx = _context("segment_nuclei")
    tiles_key = job_key_for(DAG_ID, RUN_ID, "segment_nuclei", 0, 1)
    merge_key = job_key_for(DAG_ID, RUN_ID, "segment_nuclei", 0, 1, "merge")

    with pytest.raises(TaskDeferred) as tiles:
        op.execute(ctx)
    assert isinstance(tiles.value.trigger, HpcJobTrigger)
    assert tiles.value.trigger.job_id == tiles_key and tiles.value.method_name == "execute_complete"
    step, key = hook.submit.call_args.args
    assert (step, key) == (SEGMENT_NUCLEI, tiles_key)
    assert hook.submit.call_args.kwargs["params"] == {"image_id": 7, "block_size": 512,
                                                     "phase": "tiles"}
    assert hook.submit.call_args.kwargs["resources"]["array"] == "0-2"

    # every tiles task finished: a merge job with its own key, deferred again
    with pytest.raises(TaskDeferred) as merge:
        op.execute_complete(ctx, _event(tiles_key))
    assert merge.value.trigger.job_id == merge_key != tiles_key
    assert merge.value.method_name == "execute_merged"
    assert hook.submit.call_args.args == (SEGMENT_NUCLEI, merge_key)
    assert hook.submit.call_args.kwargs["params"] == {"image_id": 7, "block_size": 512,
                                                     "phase": "merge"}
    assert hook.result.call_count == 0, "the tiles job's result is not the task's result"
    assert op.deferred_job_ids(ctx) == [tiles_key, merge_key]

    hook.result.return_value = ResultReply(job_id=merge_key, name="summary.json",
                                           data={"nuclei": 42, "tiles": 4})
    assert op.execute_merged(ctx, _event(merge_key)) == {"nuclei": 42, "tiles": 4}
    assert hook.result.call_args.args == (merge_key,)
    assert hook.submit.call_count == 2


def test_failed_tiles_array_submits_no_merge(hook) -> None:
    op = SegmentNucleiOperator(task_id="segment_nuclei", image_id=7, array_tasks=2)
    ctx = _context("segment_nuclei")
    with pytest.raises(TaskDeferred):
        op.execute(ctx)
    key = job_key_for(DAG_ID, RUN_ID, "segment_nuclei", 0, 1)
    with pytest.raises(AirflowFailException, match="ended FAILED"):
        op.execute_complete(ctx, _event(key, "FAILED", 1))
    assert hook.submit.call_count == 1


def test_single_job_segmentation_defers_once_without_a_phase(hook) -> None:
    op = SegmentNucleiOperator(task_id="segment_nuclei", image_id=7, array_tasks=1)
    ctx = _context("segment_nuclei")
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx)
    assert deferred.value.method_name == "execute_complete"
    assert hook.submit.call_args.kwargs["params"] == {"image_id": 7}
    assert "array" not in hook.submit.call_args.kwargs["resources"]
    hook.result.return_value = ResultReply(job_id=deferred.value.trigger.job_id,
                                           name="summary.json", data={"nuclei": 5})
    assert op.execute_complete(ctx, _event(deferred.value.trigger.job_id)) == {"nuclei": 5}


@pytest.mark.parametrize("enabled", [False, "False", "false", "", None])
def test_deselected_step_is_skipped_without_a_job(hook, enabled: Any) -> None:
    op = EcdfOperator(task_id="ecdf", image_id=3, enabled=enabled)
    with pytest.raises(AirflowSkipException, match="ecdf was not selected"):
        op.execute(_context("ecdf"))
    hook.submit.assert_not_called()


def test_only_the_values_given_are_forwarded(hook) -> None:
    """No restated defaults: the step model's own defaults apply on the cluster."""
    op = ExportZarrOperator(task_id="export_zarr", image_id=3, overwrite=True)
    with pytest.raises(TaskDeferred):
        op.execute(_context("export_zarr"))
    assert hook.submit.call_args.kwargs["params"] == {"image_id": 3, "overwrite": True}


def test_templated_values_render_as_native_values(hook) -> None:
    with DAG("t", schedule=None, start_date=pendulum.datetime(2026, 1, 1),
             render_template_as_native_obj=True):
        op = ExportZarrOperator(task_id="export_zarr", image_id="{{ params.image }}",
                                block_size="{{ params.block_size }}",
                                chunk_size="{{ params.chunk_size }}",
                                enabled="{{ 'export_zarr' in params.steps }}")
    ctx = {**_context("export_zarr"),
           "params": {"image": 9, "block_size": 512, "chunk_size": None, "steps": ["ecdf"]}}
    op.render_template_fields(ctx)
    assert op.step_params == {"image_id": 9, "block_size": 512, "chunk_size": None}
    assert op.enabled is False


def test_unknown_argument_is_refused_at_parse_time_naming_the_valid_ones() -> None:
    with pytest.raises(TypeError) as err:
        ExportZarrOperator(task_id="export_zarr", image_id=1, blocksize=512)
    message = str(err.value)
    assert "'blocksize'" in message and "block_size" in message and "overwrite" in message
    with pytest.raises(TypeError, match="phase"):
        SegmentNucleiOperator(task_id="segment_nuclei", image_id=1, phase="merge")


def test_operator_class_with_an_unregistered_step_fails_at_import() -> None:
    from operators.step import StepOperator

    with pytest.raises(ValueError, match="unknown step 'segment_nucleii'; registered steps"):
        type("TypoOperator", (StepOperator,), {"step_name": "segment_nucleii"})
