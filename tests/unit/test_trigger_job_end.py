"""The trigger's event carries the ended job's log tail and (COMPLETED) summary, so the resumed
task makes no gateway call and opens no SSH connection of its own (issue 11 item 9: one
handshake and two calls fewer on every task's critical path). Real local gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from operators.hpc_step import HpcStepOperator
from operators.triggers import HpcJobTrigger
from tests.unit.test_hpc_step_reattach import _TI


def _event(trigger: HpcJobTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    return asyncio.run(asyncio.wait_for(first(), 120))


class _NoCalls:
    """A hook that fails the test if the resumed task calls the gateway."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the resumed task called the gateway ({name})")


def test_a_completed_jobs_event_carries_its_log_tail_and_summary(site) -> None:
    op = HpcStepOperator(task_id="check", step="cluster_check", step_params={"sleep_s": 1})
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": _TI(1)})  # type: ignore[arg-type]
    trigger = deferred.value.trigger
    assert trigger.fetch_result and trigger.log_tail_bytes == op.log_tail_bytes
    assert HpcJobTrigger(**trigger.serialize()[1]).fetch_result  # survives the triggerer's DB

    event = _event(trigger)
    assert event["state"] == "COMPLETED"
    assert "finished" in event["log_tail"]["text"]
    assert event["result"]["data"]["store"] == "local"

    op.__dict__["hook"] = _NoCalls()  # the cached hook: any call fails the test
    result = op.execute_complete({"ti": _TI(1)}, event)  # type: ignore[arg-type]
    assert result == event["result"]["data"]


def test_a_failed_jobs_event_carries_the_log_tail_not_a_result(site) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    op = HpcStepOperator(task_id="check", step="cluster_check", step_params={"exit_code": 3})
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": _TI(1)})  # type: ignore[arg-type]
    event = _event(deferred.value.trigger)
    assert event["state"] == "FAILED" and "result" not in event
    op.__dict__["hook"] = _NoCalls()
    with pytest.raises(AirflowFailException, match="exit code 3") as failed:
        op.execute_complete({"ti": _TI(1)}, event)  # type: ignore[arg-type]
    assert "log tail" in str(failed.value)
