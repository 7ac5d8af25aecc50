"""A retry reattaches to a job an earlier try left running; a rerun after a real failure or a
clear submits anew; the end-of-job accounting line.

The reattach tests run the real gateway (embedded default: local scheduler, one subprocess per
job) through ``HpcGatewayHook``'s local transport; Airflow's part is played by a task instance
with the fields the worker gets (try number, ``max_tries``, XCom push).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR, TriggerFailureReason
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from hooks.hpc import HpcGatewayHook
from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import EXIT_RETRY_LATER, JobState, JobStatus, job_key_for
from operators.array_merge import ArrayMergeStepOperator
from operators.hpc_step import HpcStepOperator, accounting_line

RETRIES = 1


class _TI:
    """What the worker's task instance tells the operator: its try and ``max_tries`` (Airflow
    sets ``retries`` at creation and ``try_number + retries`` on a clear)."""

    dag_id, run_id, task_id, map_index = "dag", "manual__1", "check", -1

    def __init__(self, try_number: int, max_tries: int = RETRIES) -> None:
        self.try_number, self.max_tries = try_number, max_tries
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


def _key(try_number: int) -> str:
    return job_key_for("dag", "manual__1", "check", -1, try_number)


def _operator(**step_params: Any) -> HpcStepOperator:
    return HpcStepOperator(task_id="check", step="cluster_check", step_params=step_params,
                           retries=RETRIES)


def _run_try(op: HpcStepOperator, ti: _TI) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})  # type: ignore[arg-type]
    return deferred.value


def _job_dirs(site: SiteConfig) -> list[str]:
    """One directory per job the gateway created."""
    return sorted(p.name for p in site.job_root.iterdir() if p.is_dir() and p.name[0] != ".")


def _wait_state(job_id: str, until: Any, timeout: float = 60) -> JobState:
    hook = HpcGatewayHook()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = hook.status([job_id])[0].state
        if until(state):
            return state
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {state} after {timeout} s")


@pytest.fixture()
def cleanup(site: SiteConfig) -> Any:
    """Cancel whatever job the test left running (before tmp_path goes)."""
    yield
    hook = HpcGatewayHook()
    for job_id in _job_dirs(site):
        if not hook.status([job_id])[0].state.terminal:
            hook.cancel(job_id)


def test_retry_after_a_lost_worker_reattaches_to_the_running_job(
    site: SiteConfig, cleanup: None
) -> None:
    """Try 1's worker died right after submit (Airflow fails the try by heartbeat timeout):
    try 2 waits for try 1's job, which is still running, and submits nothing."""
    first = _run_try(_operator(sleep_s=60), _TI(1))
    assert first.trigger.job_id == _key(1)
    _wait_state(_key(1), lambda s: s is JobState.RUNNING)

    ti = _TI(2)
    second = _run_try(_operator(sleep_s=60), ti)
    assert second.trigger.job_id == _key(1), "try 2 waits for try 1's job"
    assert second.method_name == "execute_complete"
    assert ti.xcoms["hpc_job"]["job_id"] == _key(1), "links and the jobs page follow it"
    assert _job_dirs(site) == [_key(1)], "one job for two tries"


def test_a_failed_wait_cancels_the_reattached_job(site: SiteConfig, cleanup: None) -> None:
    """The deferral of try 2 (reattached to try 1's job) times out: the job it waited for,
    under try 1's key, is cancelled, so that try 3 does not run beside it."""
    _run_try(_operator(sleep_s=60), _TI(1))
    _run_try(_operator(sleep_s=60), _TI(2))
    op = _operator(sleep_s=60)
    with pytest.raises(AirflowException):
        op.resume_execution(TRIGGER_FAIL_REPR, {"error": TriggerFailureReason.TRIGGER_FAILURE},
                            {"ti": _TI(2)})  # type: ignore[arg-type]
    assert _wait_state(_key(1), lambda s: s.terminal) is JobState.CANCELLED


def test_retry_after_a_real_failure_submits_anew(site: SiteConfig, cleanup: None) -> None:
    """Try 1's job ended FAILED with exit code 75 (EXIT_RETRY_LATER): try 2 runs a job of its
    own (a failed earlier job is never reused)."""
    op = _operator(exit_code=EXIT_RETRY_LATER)
    _run_try(op, _TI(1))
    assert _wait_state(_key(1), lambda s: s.terminal) is JobState.FAILED

    second = _run_try(_operator(exit_code=EXIT_RETRY_LATER), _TI(2))
    assert second.trigger.job_id == _key(2)
    assert _job_dirs(site) == sorted([_key(1), _key(2)]), "a second job for the retry"


def test_a_retry_after_the_job_completed_takes_its_result(
    site: SiteConfig, cleanup: None
) -> None:
    """Try 1's job COMPLETED but the try failed in Airflow afterwards (its worker lost while
    resuming, or Airflow 3.3's stale defer-exit event, apache/airflow#72716): try 2 returns
    that job's result at once, without a second job (hours of segmentation are not redone)."""
    _run_try(_operator(sleep_s=0), _TI(1))
    assert _wait_state(_key(1), lambda s: s.terminal) is JobState.COMPLETED

    ti = _TI(2)
    result = _operator(sleep_s=0).execute({"ti": ti})  # type: ignore[arg-type]
    assert result["hostname"] and result["store"] == "local", result
    assert ti.xcoms["hpc_job"]["job_id"] == _key(1)
    assert _job_dirs(site) == [_key(1)], "no second job"


def test_a_cleared_task_runs_a_new_job_and_ends_the_old_one(
    site: SiteConfig, cleanup: None
) -> None:
    """The user cleared the task while try 1's job ran (Airflow: ``max_tries = 1 + retries``):
    try 2 is a new run, so it submits its own job and cancels the one nobody waits for."""
    _run_try(_operator(sleep_s=60), _TI(1))
    second = _run_try(_operator(sleep_s=60), _TI(2, max_tries=1 + RETRIES))
    assert second.trigger.job_id == _key(2), "a rerun is a new job"
    assert _job_dirs(site) == sorted([_key(1), _key(2)])
    assert _wait_state(_key(1), lambda s: s.terminal) is JobState.CANCELLED


class _ArrayStatusHook:
    """A gateway whose only live job is ``live`` (status answers; submits are recorded)."""

    transport = "local"

    def __init__(self, live: str) -> None:
        self.live = live
        self.calls: list[tuple[str, Any]] = []

    def status(self, job_ids: list[str]) -> list[JobStatus]:
        self.calls.append(("status", list(job_ids)))
        return [JobStatus(job_id=j, native_id="7" if j == self.live else None,
                          state=JobState.RUNNING if j == self.live else JobState.UNKNOWN)
                for j in job_ids]

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("submit", args))
        raise AssertionError("a reattaching retry must not submit")


@pytest.mark.parametrize(("phase", "method"), [(None, "execute_complete"),
                                               ("merge", "execute_merged")])
def test_array_retry_reattaches_to_the_array_or_its_merge(phase: str | None, method: str) -> None:
    """An array step's try 1 was lost while its array (or its merge job) ran: try 2 waits for
    that job and resumes where try 1 would have (after the array: submit the merge; after the
    merge: the result). One status call asks about both."""
    live = job_key_for("dag", "manual__1", "check", -1, 1, *([phase] if phase else []))
    hook = _ArrayStatusHook(live)
    op = ArrayMergeStepOperator(task_id="check", step="cluster_check", array_tasks=4,
                                retries=RETRIES)
    op.__dict__["hook"] = hook
    deferred = _run_try(op, _TI(2))
    assert (deferred.trigger.job_id, deferred.method_name) == (live, method)
    assert hook.calls == [("status", [_key(1), job_key_for("dag", "manual__1", "check", -1, 1,
                                                           "merge")])]


def test_the_task_log_gets_the_jobs_accounting_line(capsys: pytest.CaptureFixture[str]) -> None:
    """At the end of a job the task log says where it ran, for how long of its limit, its
    exit code and peak memory (what sacct / the local scheduler report)."""
    event = {"job_id": "job-1", "native_id": "42", "state": "COMPLETED", "exit_code": 0,
             "node": "c1", "elapsed_s": 42.4, "time_limit_s": 600.0, "max_rss_mb": 12.5}

    class Hook:
        def log(self, *args: Any, **kwargs: Any) -> Any:
            raise OSError("no log")

    op = _operator()
    op.__dict__["hook"] = Hook()
    op.raise_for_state(event)
    assert ("cluster job job-1 COMPLETED: node c1, elapsed 0:00:42 of 0:10:00 limit, "
            "exit code 0, MaxRSS 12.5 MiB") in capsys.readouterr().out
    unknown = accounting_line({"job_id": "j", "state": "FAILED", "exit_code": 75})
    assert unknown == "cluster job j FAILED: node ?, elapsed ? of ? limit, exit code 75, MaxRSS ?"


def test_a_reattaching_retry_mints_no_omero_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image step's retry that reattaches sends nothing to the cluster: no new OMERO session
    is minted (the running job keeps the one it got)."""
    import hooks.omero
    from hpc_jobs.registry import EXPORT_ZARR
    from tests.unit.test_omero_session_minting import Cluster, Minter

    Minter.minted, Minter.closed = [], []
    monkeypatch.setattr(hooks.omero, "OmeroSessionHook", Minter)
    op = HpcStepOperator(task_id="check", step=EXPORT_ZARR, step_params={"image_id": 1},
                         omero_conn_id="omero_site", retries=RETRIES)
    assert op.needs_session(), "a step that would get a session on submit"
    cluster = Cluster(existing=(_key(1),))
    op.__dict__["hook"] = cluster
    deferred = _run_try(op, _TI(2))
    assert deferred.trigger.job_id == _key(1)
    assert (cluster.submits, Minter.minted) == ([], [])


def test_cluster_steps_are_retried_by_default_and_a_dag_can_say_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reattaching needs a retry: cluster-step tasks get ``[omeflow] hpc_task_retries`` (2) and
    ``hpc_retry_delay_s`` unless the Dag's default_args or the task set their own."""
    from datetime import timedelta

    import pendulum
    from airflow.sdk import DAG

    with DAG("site_default", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):
        site_default = HpcStepOperator(task_id="a", step="cluster_check")
        own = HpcStepOperator(task_id="b", step="cluster_check", retries=0)
    with DAG("dag_default", schedule=None, start_date=pendulum.datetime(2026, 1, 1),
             default_args={"retries": 5, "retry_delay": timedelta(seconds=9)}):
        dag_default = HpcStepOperator(task_id="c", step="cluster_check")
    assert (site_default.retries, site_default.retry_delay) == (2, timedelta(seconds=120))
    assert own.retries == 0
    assert (dag_default.retries, dag_default.retry_delay) == (5, timedelta(seconds=9))
    monkeypatch.setenv("AIRFLOW__OMEFLOW__HPC_TASK_RETRIES", "-1")
    with pytest.raises(ValueError, match="hpc_task_retries = -1"):
        HpcStepOperator(task_id="d", step="cluster_check")
