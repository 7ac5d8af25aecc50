"""The HPC jobs page after a lost worker: try 2 reattached to try 1's running job
(``operators/hpc_step.py``), so the page, the job view and Cancel of try 2 must reach try 1's
job — and only a job of the same task instance — through the real local gateway."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from airflow.sdk.exceptions import TaskDeferred

from hooks.hpc import HpcGatewayHook
from tests.unit.test_hpc_step_reattach import _TI, _key, _operator

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))

from hpc_jobs_data import HpcJobRow, live_status, resolve_job_try  # noqa: E402


def _row(try_number: int, task_id: str = "check") -> HpcJobRow:
    return HpcJobRow(dag_id="dag", run_id="manual__1", task_id=task_id, map_index=-1,
                     try_number=try_number, operator="HpcStepOperator", state="deferred",
                     hpc_conn_id="omeflow_hpc", pushed_at=None)


def test_a_reattached_try_shows_and_cancels_the_earlier_tries_job(site) -> None:
    op = _operator(sleep_s=60)
    with pytest.raises(TaskDeferred):
        op.execute({"ti": _TI(1)})  # try 1 submits, then its worker is lost
    with pytest.raises(TaskDeferred):
        op.execute({"ti": _TI(2)})  # try 2 reattaches: no job under its own key
    try:
        live, errors, (first, second) = live_status([_row(1), _row(2)])
        assert errors == []
        assert live[_key(2)].native_id is None  # nothing was submitted for try 2
        assert (first.job_try, second.job_try) == (None, 1)
        assert second.job_id == first.job_id == _key(1)
        assert live[second.job_id].state.value in ("PENDING", "RUNNING")
        viewed = resolve_job_try(_row(2))  # the job view / Cancel route's row
        assert viewed.job_id == _key(1) and "try_number=2" in viewed.log_path()
        # another task instance's job is never taken for this one's
        assert resolve_job_try(_row(2, task_id="other")).job_try is None
    finally:
        HpcGatewayHook().cancel(_key(1))


def test_a_try_with_its_own_job_keeps_it(site) -> None:
    op = _operator(sleep_s=60)
    with pytest.raises(TaskDeferred):
        op.execute({"ti": _TI(1)})
    try:
        assert resolve_job_try(_row(1)).job_id == _key(1)
        assert resolve_job_try(_row(1)).job_try is None
    finally:
        HpcGatewayHook().cancel(_key(1))
