"""``HpcStepOperator`` with its hook patched: the state-to-exception table, error events,
the deferral (trigger and timeout) and what a deferral timeout does to the job."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR, TriggerFailureReason
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    TaskDeferralTimeout,
    TaskDeferred,
)

from hooks.hpc import HpcConfigError
from hpc_jobs.protocol import (
    EXIT_RETRY_LATER,
    CancelReply,
    JobState,
    JobStatus,
    LogReply,
    ResultReply,
    SubmitReply,
    job_key_for,
)
from operators.hpc_step import QUEUE_ALLOWANCE, HpcStepOperator
from operators.triggers import HpcJobTrigger

TAIL = "loading image 42\nTraceback: ValueError: boom\n"


class FakeHook:
    """Records calls; answers like a gateway whose job log ends with :data:`TAIL`."""

    transport = "local"

    def __init__(self, submit_state: JobState = JobState.PENDING,
                 submit_error: Exception | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.submit_state = submit_state
        self.submit_error = submit_error

    def submit(self, step: str, job_key: str, **kwargs: Any) -> SubmitReply:
        self.calls.append(("submit", job_key))
        if self.submit_error:
            raise self.submit_error
        return SubmitReply(job_id=job_key, native_id="4242", created=True, state=self.submit_state)

    def log(self, job_id: str, offset: int = 0, max_bytes: int = 65536) -> LogReply:
        self.calls.append(("log", job_id))
        return LogReply(job_id=job_id, offset=0, next_offset=len(TAIL), size=len(TAIL), text=TAIL)

    def cancel(self, job_id: str) -> CancelReply:
        self.calls.append(("cancel", job_id))
        return CancelReply(job_id=job_id, state=JobState.CANCELLED)

    def result(self, job_id: str, name: str = "summary.json") -> ResultReply:
        self.calls.append(("result", job_id))
        return ResultReply(job_id=job_id, name=name, data={"nuclei": 7})

    def status(self, job_ids: list[str]) -> list[JobStatus]:
        return [JobStatus(job_id=j, state=self.submit_state) for j in job_ids]


class TI:
    dag_id, run_id, task_id, map_index, try_number = "dag", "manual__1", "seg", -1, 2

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def _operator(hook: FakeHook, **kwargs: Any) -> HpcStepOperator:
    op = HpcStepOperator(task_id="seg", step="cluster_check", **kwargs)
    op.__dict__["hook"] = hook  # the cached hook property
    return op


def _event(state: JobState, **extra: Any) -> dict[str, Any]:
    return {"job_id": "job-1", "native_id": "4242", "state": state.value, "exit_code": 3,
            "reason": "scripted", **extra}


#: every JobState -> (exception type or None, words the message must contain, job cancelled?)
TABLE: dict[JobState, tuple[type[Exception] | None, tuple[str, ...], bool]] = {
    JobState.COMPLETED: (None, (), False),
    JobState.PREEMPTED: (AirflowException, ("ended PREEMPTED", "worth a retry"), False),
    JobState.NODE_FAIL: (AirflowException, ("ended NODE_FAIL", "worth a retry"), False),
    JobState.BOOT_FAIL: (AirflowException, ("ended BOOT_FAIL", "worth a retry"), False),
    JobState.FAILED: (AirflowFailException, ("ended FAILED", "exit code 3", "ValueError: boom"),
                      False),
    JobState.TIMEOUT: (AirflowFailException, ("ended TIMEOUT", "time_min", "ValueError: boom"),
                       False),
    JobState.OUT_OF_MEMORY: (AirflowFailException, ("OUT_OF_MEMORY", "mem_mb"), False),
    JobState.CANCELLED: (AirflowFailException, ("ended CANCELLED", "someone cancelled"), False),
    JobState.DEADLINE: (AirflowFailException, ("ended DEADLINE", "log tail"), False),
    JobState.PENDING: (AirflowFailException, ("never start", "hpc_resources", "was cancelled"),
                       True),
    JobState.UNKNOWN: (AirflowFailException, ("no longer knows", "vanished", "was cancelled"),
                       True),
    JobState.RUNNING: (AirflowFailException, ("not finished", "was cancelled"), True),
    JobState.REQUEUED: (AirflowFailException, ("not finished", "was cancelled"), True),
    JobState.SUSPENDED: (AirflowFailException, ("not finished", "was cancelled"), True),
}


def test_table_covers_every_state() -> None:
    assert set(TABLE) == set(JobState)


@pytest.mark.parametrize("state", list(JobState), ids=lambda s: s.value)
def test_raise_for_state(state: JobState) -> None:
    expected, words, cancels = TABLE[state]
    hook = FakeHook()
    op = _operator(hook)
    if expected is None:
        op.raise_for_state(_event(state))
    else:
        with pytest.raises(expected) as err:
            op.raise_for_state(_event(state))
        if expected is AirflowException:  # a retry, not a failure
            assert not isinstance(err.value, AirflowFailException)
        for word in words:
            assert word in str(err.value), (word, str(err.value))
    assert (("cancel", "job-1") in hook.calls) is cancels
    assert ("log", "job-1") in hook.calls, "the log tail goes into the task log"


def test_execute_complete_returns_the_summary() -> None:
    hook = FakeHook()
    assert _operator(hook).execute_complete({}, _event(JobState.COMPLETED)) == {"nuclei": 7}


def test_gave_up_after_cancelling_is_a_retry() -> None:
    op = _operator(FakeHook())
    event = _event(JobState.UNKNOWN, error="no status for 3600 s; the job was cancelled",
                   cancelled=True)
    with pytest.raises(AirflowException, match="lost track") as err:
        op.raise_for_state(event)
    assert not isinstance(err.value, AirflowFailException)


def test_gave_up_without_cancelling_fails_without_retry() -> None:
    op = _operator(FakeHook())
    event = _event(JobState.UNKNOWN, error="cancelling it failed too", cancelled=False)
    with pytest.raises(AirflowFailException, match="no second job"):
        op.raise_for_state(event)


def test_execute_defers_with_a_timeout_from_the_time_limit() -> None:
    hook = FakeHook()
    op = _operator(hook, hpc_resources={"time_min": 30, "array": "0-9%2"}, unknown_timeout=120,
                   queue_allowance=timedelta(hours=2))
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": TI()})  # type: ignore[arg-type]
    key = job_key_for("dag", "manual__1", "seg", -1, 2)
    assert hook.calls[0] == ("submit", key)
    trigger = deferred.value.trigger
    assert isinstance(trigger, HpcJobTrigger)
    assert (trigger.job_id, trigger.native_id, trigger.unknown_timeout) == (key, "4242", 120)
    # 10 array tasks, 2 at a time: 5 waves of 30 min, plus the queue allowance
    assert deferred.value.timeout == timedelta(minutes=150) + timedelta(hours=2)
    assert deferred.value.method_name == "execute_complete"


def test_default_deferral_timeout_uses_the_step_defaults() -> None:
    from hpc_jobs.registry import get_step

    spec = get_step("cluster_check")
    assert spec is not None
    op = _operator(FakeHook())
    assert op.deferral_timeout() == timedelta(minutes=spec.resources.time_min) + QUEUE_ALLOWANCE


@pytest.mark.parametrize(
    ("reason", "raised"),
    [(TriggerFailureReason.TRIGGER_TIMEOUT, TaskDeferralTimeout),
     (TriggerFailureReason.TRIGGER_FAILURE, AirflowException)],
)
def test_deferral_timeout_cancels_the_job(reason: TriggerFailureReason, raised: type) -> None:
    hook = FakeHook()
    op = _operator(hook)
    with pytest.raises(raised):
        op.resume_execution(TRIGGER_FAIL_REPR, {"error": reason}, {"ti": TI()})  # type: ignore[arg-type]
    assert hook.calls == [("cancel", job_key_for("dag", "manual__1", "seg", -1, 2))]


def test_config_error_at_submit_fails_without_retry() -> None:
    hook = FakeHook(submit_error=HpcConfigError("connection 'omeflow_hpc' has no pinned host key"))
    with pytest.raises(AirflowFailException, match="no pinned host key"):
        _operator(hook).execute({"ti": TI()})  # type: ignore[arg-type]


def test_a_job_that_says_retry_later_is_retried_not_failed() -> None:
    """Exit code 75 (EXIT_RETRY_LATER: a pyramid still being built, an image in use by another
    run) is a retry; any other FAILED exit code is a failure without retry."""
    op = _operator(FakeHook())
    with pytest.raises(AirflowException, match="passes by itself") as err:
        op.raise_for_state(_event(JobState.FAILED, exit_code=EXIT_RETRY_LATER))
    assert not isinstance(err.value, AirflowFailException)
    with pytest.raises(AirflowFailException):
        op.raise_for_state(_event(JobState.FAILED, exit_code=1))


def test_the_connection_id_is_kept_in_the_serialized_dag() -> None:
    """The HPC jobs page reads a task's gateway connection from the serialized Dag (never from
    an XCom), so ``hpc_conn_id`` must survive serialization."""
    import pendulum
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    with DAG("ser", schedule=None, start_date=pendulum.datetime(2026, 1, 1)) as dag:
        HpcStepOperator(task_id="t", step="cluster_check", hpc_conn_id="cluster_b")
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert restored.get_task("t").hpc_conn_id == "cluster_b"
