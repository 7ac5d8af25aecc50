"""PredictOperator: the array over nucleus ranges, then ONE merge job (not an array)."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import TaskDeferred

from hpc_jobs.protocol import ResultReply, job_key_for
from hpc_jobs.registry import PREDICT
from operators.prediction import PredictOperator
from tests.unit.test_celldetector_operators import DAG_ID, RUN_ID, _context, _event, hook

__all__ = ["hook"]  # the patched gateway hook fixture


def test_predict_array_then_a_single_merge_job(hook) -> None:  # noqa: F811
    op = PredictOperator(task_id="predict", image_id=3, classifier="m1", array_tasks=2)
    ctx = _context("predict")
    array_key = job_key_for(DAG_ID, RUN_ID, "predict", 0, 1)
    merge_key = job_key_for(DAG_ID, RUN_ID, "predict", 0, 1, "merge")
    with pytest.raises(TaskDeferred):
        op.execute(ctx)
    assert hook.submit.call_args.args == (PREDICT, array_key)
    assert hook.submit.call_args.kwargs["params"] == {"image_id": 3, "classifier": "m1",
                                                     "phase": "tiles"}
    assert hook.submit.call_args.kwargs["resources"]["array"] == "0-1"
    with pytest.raises(TaskDeferred) as merge:
        op.execute_complete(ctx, _event(array_key))
    assert merge.value.method_name == "execute_merged"
    assert hook.submit.call_args.args == (PREDICT, merge_key)
    assert hook.submit.call_args.kwargs["params"]["phase"] == "merge"
    assert "array" not in hook.submit.call_args.kwargs["resources"]  # one job concatenates
    hook.result.return_value = ResultReply(job_id=merge_key, name="summary.json",
                                           data={"parts": 2, "crops": 10})
    assert op.execute_merged(ctx, _event(merge_key)) == {"parts": 2, "crops": 10}


def test_predict_refuses_phase_as_an_argument() -> None:
    with pytest.raises(Exception, match="phase"):
        PredictOperator(task_id="predict", image_id=3, classifier="m1", phase="merge")


def test_model_lookup_current_newest_or_by_id() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from operators.prediction import resolve_classifier

    rows = [{"id": 5, "path": "/m/cd8-b.pt"}, {"id": 2, "path": "/m/cd8-a.pt"}]  # newest first
    assert resolve_classifier(rows, "current")["classifier"] == "cd8-b"
    marked = resolve_classifier(rows, "current", current=rows[1])
    assert (marked["model_id"], marked["classifier"]) == (2, "cd8-a")
    assert resolve_classifier(rows, 2)["classifier"] == "cd8-a"
    with pytest.raises(AirflowFailException, match=r"model 9 is not registered.*\[2, 5\]"):
        resolve_classifier(rows, "9")
    with pytest.raises(AirflowFailException, match="train one with celldetector_train"):
        resolve_classifier([], "current")
