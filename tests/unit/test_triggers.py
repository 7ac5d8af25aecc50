"""The shared ``StatusPoller`` (back-off, give-up, lasting UNKNOWN) and ``HpcJobTrigger``.

A scripted client stands in for the gateway; intervals are hundredths of a second.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import pytest

from hooks.hpc import HpcConfigError, HpcTransportError
from hpc_jobs.protocol import CancelReply, JobState, JobStatus, Progress
from operators.triggers import HpcJobTrigger, PollGaveUp, StatusPoller

INTERVAL = 0.01
CAP = 0.04


class ScriptedClient:
    """Answers ``status`` from a script: one entry per poll, an exception or a state."""

    def __init__(self, script: Callable[[int], Any], cancel_error: Exception | None = None):
        self.script = script
        self.cancel_error = cancel_error
        self.status_calls = 0
        self.cancelled: list[str] = []
        self.calls = 0

    async def status(self, job_ids: list[str]) -> list[JobStatus]:
        self.status_calls += 1
        answer = self.script(self.status_calls)
        if isinstance(answer, Exception):
            raise answer
        return [JobStatus(job_id=j, state=answer, reason="scripted") for j in job_ids]

    async def cancel(self, job_id: str) -> CancelReply:
        self.cancelled.append(job_id)
        if self.cancel_error is not None:
            raise self.cancel_error
        return CancelReply(job_id=job_id, state=JobState.CANCELLED)

    async def close(self) -> None:
        pass


def _poller(client: ScriptedClient) -> StatusPoller:
    poller = StatusPoller("omeflow_test", INTERVAL)
    poller.client = client  # type: ignore[assignment]
    poller.max_backoff = CAP
    return poller


def _run(coro: Any, limit: float = 20) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, limit)

    return asyncio.run(bounded())


def test_keeps_polling_through_an_outage_with_capped_backoff() -> None:
    down = HpcTransportError("ssh: connection refused")
    client = ScriptedClient(lambda n: down if n <= 12 else JobState.COMPLETED)

    async def wait() -> tuple[JobStatus, StatusPoller]:
        poller = _poller(client)
        return await poller.wait("job-1"), poller  # the default limit (an hour)

    status, poller = _run(wait())
    assert status.state is JobState.COMPLETED, "12 failed polls in a row did not end the wait"
    assert client.status_calls == 13
    assert client.cancelled == []
    failing = list(poller.delays)[:12]
    assert failing[:3] == pytest.approx([INTERVAL, 2 * INTERVAL, 4 * INTERVAL])
    assert max(failing) == pytest.approx(CAP), "back-off capped at max_backoff"


def test_gives_up_after_the_outage_limit_cancelling_first() -> None:
    client = ScriptedClient(lambda n: HpcTransportError("ssh: no route to host"))

    async def wait() -> None:
        await _poller(client).wait("job-1", poll_outage_limit=0.2)

    with pytest.raises(PollGaveUp) as err:
        _run(wait())
    assert client.cancelled == ["job-1"], "cancelled before giving up"
    assert err.value.cancelled
    assert "no status of cluster job job-1" in str(err.value)
    assert "the job was cancelled" in str(err.value)
    assert client.status_calls > 3


def test_give_up_says_so_when_the_cancel_fails_too() -> None:
    down = HpcTransportError("ssh: no route to host")
    client = ScriptedClient(lambda n: down, cancel_error=down)

    async def wait() -> None:
        await _poller(client).wait("job-1", poll_outage_limit=0.1)

    with pytest.raises(PollGaveUp) as err:
        _run(wait())
    assert not err.value.cancelled
    assert "squeue --name job-1" in str(err.value)


def test_lasting_unknown_ends_the_wait() -> None:
    client = ScriptedClient(lambda n: JobState.UNKNOWN)

    async def wait() -> JobStatus:
        return await _poller(client).wait("job-1", unknown_timeout=0.2)

    status = _run(wait())
    assert status.state is JobState.UNKNOWN
    assert status.reason is not None and status.reason.startswith("UNKNOWN for ")
    assert "scripted" in status.reason


def test_brief_unknown_does_not_end_the_wait() -> None:
    script = {1: JobState.UNKNOWN, 2: JobState.UNKNOWN, 3: JobState.RUNNING}
    client = ScriptedClient(lambda n: script.get(n, JobState.COMPLETED if n > 30 else
                                                 JobState.UNKNOWN if n % 2 else JobState.RUNNING))

    async def wait() -> JobStatus:
        return await _poller(client).wait("job-1", unknown_timeout=0.5)

    assert _run(wait()).state is JobState.COMPLETED


def test_config_error_ends_the_wait_at_once() -> None:
    client = ScriptedClient(lambda n: HpcConfigError("connection 'x' has no pinned host key"))

    async def wait() -> None:
        await _poller(client).wait("job-1")

    with pytest.raises(HpcConfigError, match="pinned host key"):
        _run(wait())
    assert client.status_calls == 1
    assert client.cancelled == []


# -- HpcJobTrigger -----------------------------------------------------------------------------
def test_trigger_serialize_round_trip() -> None:
    trigger = HpcJobTrigger(job_id="j-1", hpc_conn_id="c", poll_interval=3.0, native_id="42",
                            unknown_timeout=120.0, poll_outage_limit=900.0)
    classpath, kwargs = trigger.serialize()
    assert set(kwargs) == set(inspect.signature(HpcJobTrigger.__init__).parameters) - {"self"}
    module, _, name = classpath.rpartition(".")  # what the triggerer does
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert isinstance(rebuilt, HpcJobTrigger)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["unknown_timeout"] == 120.0 and kwargs["poll_outage_limit"] == 900.0


def _first_event(trigger: HpcJobTrigger, client: ScriptedClient) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        poller = StatusPoller.get(trigger.hpc_conn_id, trigger.poll_interval)
        poller.client = client  # type: ignore[assignment]
        poller.max_backoff = CAP
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    return _run(run())


def test_trigger_event_when_polls_give_up() -> None:
    client = ScriptedClient(lambda n: HpcTransportError("ssh: timeout"))
    trigger = HpcJobTrigger(job_id="j-1", hpc_conn_id="omeflow_t1", poll_interval=INTERVAL,
                            native_id="42", poll_outage_limit=0.1)
    event = _first_event(trigger, client)
    assert event["job_id"] == "j-1" and event["state"] == "UNKNOWN"
    assert event["cancelled"] is True and "ssh: timeout" in event["error"]
    assert client.cancelled == ["j-1"]


def test_trigger_event_for_a_terminal_job() -> None:
    client = ScriptedClient(lambda n: JobState.RUNNING if n < 3 else JobState.FAILED)
    trigger = HpcJobTrigger(job_id="j-2", hpc_conn_id="omeflow_t2", poll_interval=INTERVAL)
    event = _first_event(trigger, client)
    assert event == {"job_id": "j-2", "native_id": None, "state": "FAILED", "exit_code": None,
                     "reason": "scripted", "elapsed_s": None, "array_states": None,
                     "progress": None, "array_progress": None, "node": None,
                     "time_limit_s": None, "max_rss_mb": None}


# -- progress lines -----------------------------------------------------------------------------
#: Stands in for the triggerer's log context: Airflow binds ``trigger_id`` to each trigger's own
#: asyncio task (structlog contextvars) and routes what is logged there into that task
#: instance's log. A line logged from the shared poll loop would carry the wrong trigger's id.
CURRENT_TRIGGER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trigger", default=None
)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str | None, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((CURRENT_TRIGGER.get(), record.getMessage()))


def _seconds(done: int, total: int = 4) -> Progress:
    return Progress(done=done, total=total, unit="seconds", message="sleeping")


class ProgressClient(ScriptedClient):
    """Poll n answers ``script(n, job_id)``: (state, progress, array progress)."""

    async def status(self, job_ids: list[str]) -> list[JobStatus]:
        self.status_calls += 1
        out = []
        for job_id in job_ids:
            state, progress, tasks = self.script(self.status_calls, job_id)
            out.append(JobStatus(job_id=job_id, state=state, progress=progress,
                                 array_progress=tasks))
        return out


def _run_triggers(client: ScriptedClient, job_ids: list[str]) -> _Recorder:
    recorder = _Recorder()

    async def one(job_id: str) -> None:
        CURRENT_TRIGGER.set(job_id)  # what the triggerer binds in the trigger's task
        trigger = HpcJobTrigger(job_id=job_id, hpc_conn_id="omeflow_tp", poll_interval=INTERVAL)
        logger = logging.getLogger(f"omeflow.test.trigger.{job_id}")
        logger.addHandler(recorder)
        logger.setLevel(logging.INFO)
        trigger._log = logger  # type: ignore[assignment]
        async for _event in trigger.run():
            return

    async def both() -> None:
        poller = StatusPoller.get("omeflow_tp", INTERVAL)
        poller.client = client  # type: ignore[assignment]
        await asyncio.gather(*(asyncio.create_task(one(j)) for j in job_ids))

    _run(both())
    return recorder


def test_the_trigger_logs_progress_when_it_changes_not_on_every_poll() -> None:
    counts = {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 3, 9: 3}

    def script(n: int, job_id: str) -> tuple[JobState, Progress | None, None]:
        if n >= 10:
            return JobState.COMPLETED, _seconds(4), None
        return JobState.RUNNING, (None if n == 1 else _seconds(counts[n])), None

    recorder = _run_triggers(ProgressClient(script), ["j-p"])
    progress = [line for _ctx, line in recorder.lines if line.startswith("progress:")]
    assert progress == [
        "progress: 0/4 seconds (0 %), sleeping",
        "progress: 1/4 seconds (25 %), sleeping",
        "progress: 2/4 seconds (50 %), sleeping",
        "progress: 3/4 seconds (75 %), sleeping",
        "progress: 4/4 seconds (100 %), sleeping",
    ]


def test_each_trigger_logs_its_own_jobs_progress_in_its_own_context() -> None:
    """Two triggers share one poll; each job's lines are logged in its own trigger's task (so
    the triggerer files them under the right task instance), array breakdown included."""

    def script(n: int, job_id: str) -> tuple[JobState, Progress | None, dict | None]:
        step = min(n, 4)
        if job_id == "j-arr":
            tasks = {"0": _seconds(step, 4), "1": _seconds(max(0, step - 1), 4)}
            state = JobState.COMPLETED if n >= 6 else JobState.RUNNING
            return state, _seconds(sum(p.done for p in tasks.values()), 8), tasks
        return (JobState.COMPLETED if n >= 8 else JobState.RUNNING), _seconds(step * 10, 40), None

    recorder = _run_triggers(ProgressClient(script), ["j-arr", "j-one"])
    by_job: dict[str | None, list[str]] = {}
    for context, line in recorder.lines:
        by_job.setdefault(context, []).append(line)
    assert set(by_job) == {"j-arr", "j-one"}, "a line was logged outside its trigger's task"
    assert [x for x in by_job["j-one"] if x.startswith("progress:")] == [
        f"progress: {k}/40 seconds ({k * 100 // 40} %), sleeping" for k in (10, 20, 30, 40)]
    arr = [x for x in by_job["j-arr"] if x.startswith("array progress:")]
    assert arr[0] == ("array progress: task 0: 1/4 seconds (25 %), sleeping; "
                      "task 1: 0/4 seconds (0 %), sleeping")
    assert arr[-1].startswith("array progress: task 0: 4/4 seconds (100 %)")
    assert len(arr) == len(set(arr)) == 4, arr
    assert all("8 seconds" in x for x in by_job["j-arr"] if x.startswith("progress:"))


def test_a_new_job_is_polled_fast_for_a_few_polls_then_less_often() -> None:
    """A short job is seen soon after it ends (FAST_POLLS polls FIRST_POLL_S apart), a long one
    costs few polls (the delay then doubles up to the interval)."""
    from operators import triggers

    client = ScriptedClient(lambda n: JobState.RUNNING if n <= 14 else JobState.COMPLETED)

    async def wait() -> StatusPoller:
        poller = StatusPoller("omeflow_fast", 8.0)  # a site's interval, far above the first
        poller.client = client  # type: ignore[assignment]
        await poller.wait("job-1")
        return poller

    original = triggers.FIRST_POLL_S
    triggers.FIRST_POLL_S = 0.005  # the schedule's shape, in milliseconds
    try:
        delays = list(_run(wait()).delays)
    finally:
        triggers.FIRST_POLL_S = original
    fast = triggers.FAST_POLLS
    assert delays[:fast] == pytest.approx([0.005] * fast)
    assert delays[fast:fast + 4] == pytest.approx([0.01, 0.02, 0.04, 0.08])
