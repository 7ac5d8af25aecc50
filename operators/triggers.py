"""``HpcJobTrigger``: waits in the triggerer until a cluster job reaches a terminal state.

All triggers of one triggerer that watch jobs behind the same connection share ONE status
poll per interval: a :class:`StatusPoller` per (event loop, connection, interval) collects the
job ids of every waiting trigger and asks the gateway about all of them in a single ``status``
call. 100 concurrent jobs cost one gateway call (one SSH exec) per interval, not 100.

What a waiting trigger gets from the poller:

=================================  ==========================================================
the poll says                      the trigger
=================================  ==========================================================
a terminal state                   fires with the job's status
PENDING that never starts          fires with the status (the operator cancels, then fails)
UNKNOWN for ``unknown_timeout`` s  fires with the UNKNOWN status (the operator cancels, then
(default 10 min) in a row          fails: the job directory vanished or Slurm purged the job)
transport / gateway error          keeps polling; delays double from the interval up to
                                   :data:`MAX_BACKOFF_S` (sshd throttles reconnects)
no good poll for                   cancels the job (best effort), then fires an event with
``poll_outage_limit`` s            ``error`` and ``cancelled``: the operator retries only if
(default 1 h)                      the cancel went through, else fails naming the job
connection misconfigured           fires at once with ``error`` (:class:`HpcConfigError`)
a running job's progress changed   logs ``progress: 12/40 tiles (30 %), segmenting`` (and
                                   ``array progress: task 0: ...`` for arrays) in its own task:
                                   the triggerer files it in the task instance's log
=================================  ==========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from hooks.hpc import AsyncGatewayClient, HpcConfigError, HpcGatewayError, HpcTransportError
from hpc_jobs.progress import describe, describe_tasks
from hpc_jobs.protocol import MAX_CHUNK_BYTES, MAX_STATUS_IDS, JobState, JobStatus, never_starts

log = logging.getLogger(__name__)

#: Delay between the first polls after a job arrives (:data:`FAST_POLLS` of them: a short job
#: that Slurm starts within its scheduling tick is seen within about this), then it doubles on
#: each quiet poll up to the poll interval. All waiting jobs share each poll.
FIRST_POLL_S = 0.5
#: How many polls after a job arrives keep the :data:`FIRST_POLL_S` delay (a few seconds).
FAST_POLLS = 8
#: Longest delay between two polls while polls fail.
MAX_BACKOFF_S = 300.0
#: Seconds a job may stay UNKNOWN in a row before its trigger fires with that state.
UNKNOWN_TIMEOUT_S = 600.0
#: Seconds without one good poll after which a trigger cancels its job and gives up.
POLL_OUTAGE_LIMIT_S = 3600.0
#: Largest step summary (JSON bytes) a trigger event carries; a larger one the task fetches.
MAX_EVENT_RESULT_BYTES = 64 * 1024
#: Seconds the give-up cancel may take.
CANCEL_TIMEOUT_S = 60.0


class PollGaveUp(Exception):
    """Status polls failed for longer than the trigger's ``poll_outage_limit``.

    :param cancelled: whether the job was cancelled before giving up.
    """

    def __init__(self, message: str, cancelled: bool) -> None:
        super().__init__(message)
        self.cancelled = cancelled


@dataclass(eq=False)
class _Waiter:
    """One waiting trigger: its future and its own limits."""

    fut: asyncio.Future[JobStatus]
    unknown_timeout: float
    poll_outage_limit: float
    last_ok: float = field(default_factory=time.monotonic)
    unknown_since: float | None = None
    #: the latest status of a job that is still going, and the signal that it came
    latest: JobStatus | None = None
    news: asyncio.Event = field(default_factory=asyncio.Event)


class StatusPoller:
    """One shared poll loop: waiting triggers register job ids and await their final status."""

    _instances: dict[tuple[asyncio.AbstractEventLoop, str, float], StatusPoller] = {}

    def __init__(self, hpc_conn_id: str, interval: float) -> None:
        self.client = AsyncGatewayClient(hpc_conn_id)
        self.interval = interval
        #: cap of the back-off while polls fail
        self.max_backoff = MAX_BACKOFF_S
        self.waiters: dict[str, list[_Waiter]] = {}
        self.polls = 0
        #: most job ids one poll asked about (shows the batching)
        self.max_batch = 0
        #: the latest delays between polls (seconds), for logs and tests
        self.delays: deque[float] = deque(maxlen=64)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @classmethod
    def get(cls, hpc_conn_id: str, interval: float) -> StatusPoller:
        """The poller of the running event loop for this connection and interval."""
        loop = asyncio.get_running_loop()
        # keyed by the loop itself (an id could be reused by a later loop); pollers of closed
        # loops (e.g. earlier dag.test() runs in this process) are dropped
        for stale in [k for k in cls._instances if k[0].is_closed()]:
            del cls._instances[stale]
        key = (loop, hpc_conn_id, float(interval))
        poller = cls._instances.get(key)
        if poller is None:
            poller = cls._instances[key] = StatusPoller(hpc_conn_id, interval)
        return poller

    async def wait(
        self,
        job_id: str,
        unknown_timeout: float = UNKNOWN_TIMEOUT_S,
        poll_outage_limit: float = POLL_OUTAGE_LIMIT_S,
        on_status: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Return the job's status once it is terminal, never starts, or has been UNKNOWN
        for ``unknown_timeout`` seconds. Raises :class:`PollGaveUp` after
        ``poll_outage_limit`` seconds without a good poll (the job cancelled first, if the
        gateway answers) and :class:`HpcConfigError` when the connection is unusable.

        ``on_status`` is called with the latest status of the still running job after each
        poll that saw it, in the caller's own task (so a trigger's log lines carry that
        trigger's context and land in its task's log, not in the poll loop's)."""
        fut: asyncio.Future[JobStatus] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(fut, unknown_timeout, poll_outage_limit)
        self.waiters.setdefault(job_id, []).append(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        self._wake.set()
        try:
            if on_status is None:
                return await fut
            while True:
                news = asyncio.ensure_future(waiter.news.wait())
                try:
                    await asyncio.wait({fut, news}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    news.cancel()
                if waiter.news.is_set():
                    waiter.news.clear()
                    if waiter.latest is not None and not fut.done():
                        on_status(waiter.latest)
                if fut.done():
                    return fut.result()
        finally:
            waiters = self.waiters.get(job_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self.waiters.pop(job_id, None)

    def _seen(self, status: JobStatus, now: float) -> None:
        """Resolve the waiters of one polled job that need to wake up."""
        for waiter in self.waiters.get(status.job_id, []):
            waiter.last_ok = now
            if waiter.fut.done():
                continue
            if status.state is JobState.UNKNOWN:
                waiter.unknown_since = waiter.unknown_since or now
                lasted = now - waiter.unknown_since
                if lasted >= waiter.unknown_timeout:
                    reason = (
                        f"UNKNOWN for {lasted:.0f} s (limit {waiter.unknown_timeout:.0f} s): "
                        f"{status.reason or 'the scheduler no longer knows this job'}"
                    )
                    waiter.fut.set_result(status.model_copy(update={"reason": reason}))
                continue
            waiter.unknown_since = None
            if status.state.terminal or never_starts(status):
                waiter.fut.set_result(status)
            else:
                waiter.latest = status
                waiter.news.set()

    def _fail_all(self, exc: BaseException) -> None:
        for waiters in self.waiters.values():
            for waiter in waiters:
                if not waiter.fut.done():
                    waiter.fut.set_exception(exc)

    async def _give_up_expired(self, exc: BaseException, now: float) -> None:
        """Cancel, then fail, the jobs whose waiters saw no good poll for their limit."""
        expired = {
            job_id: [
                w for w in waiters if not w.fut.done() and now - w.last_ok >= w.poll_outage_limit
            ]
            for job_id, waiters in self.waiters.items()
        }
        await asyncio.gather(
            *(self._cancel_and_fail(job_id, ws, exc) for job_id, ws in expired.items() if ws)
        )

    async def _cancel_and_fail(
        self, job_id: str, waiters: list[_Waiter], exc: BaseException
    ) -> None:
        try:
            await asyncio.wait_for(self.client.cancel(job_id), CANCEL_TIMEOUT_S)
            cancelled, outcome = True, "the job was cancelled"
        except Exception as cancel_exc:  # noqa: BLE001 - reported in the message
            cancelled = False
            outcome = (
                f"cancelling it failed too ({cancel_exc}); it may still run: check it on the "
                f"cluster (squeue --name {job_id}) and cancel it there before running the task "
                "again"
            )
        limit = max(w.poll_outage_limit for w in waiters)
        error = PollGaveUp(
            f"no status of cluster job {job_id} for {limit:.0f} s (last error: {exc}); {outcome}",
            cancelled,
        )
        for waiter in waiters:
            if not waiter.fut.done():
                waiter.fut.set_exception(error)

    async def _loop(self) -> None:
        while True:
            try:
                await self._poll_while_waited()
            finally:
                await self.client.close()
            # a trigger may have arrived while the connection closed (no await after this)
            if not self.waiters:
                return

    async def _poll_while_waited(self) -> None:
        failures = 0
        #: polls since a job last arrived: short jobs are seen soon, long ones cost few polls
        quiet = 0
        while self.waiters:
            ids = list(self.waiters)
            self.max_batch = max(self.max_batch, len(ids))
            try:
                statuses: list[JobStatus] = []
                for i in range(0, len(ids), MAX_STATUS_IDS):
                    statuses += await self.client.status(ids[i : i + MAX_STATUS_IDS])
                self.polls += 1
                failures = 0
                now = time.monotonic()
                for status in statuses:
                    self._seen(status, now)
            except HpcConfigError as exc:  # no poll can succeed until someone fixes it
                log.error("status poll impossible: %s", exc)
                self._fail_all(exc)
            except (HpcTransportError, HpcGatewayError) as exc:
                failures += 1
                log.warning("status poll failed (%d in a row): %s", failures, exc)
                await self._give_up_expired(exc, time.monotonic())
            quiet += 1
            if failures:  # back off, capped (sshd MaxStartups throttles reconnects)
                delay = min(self.max_backoff, self.interval * 2 ** min(failures - 1, 30))
            else:  # 0.5 s for FAST_POLLS polls, then 1 s, 2 s ... up to the configured interval
                delay = min(self.interval, FIRST_POLL_S * 2 ** max(0, quiet - FAST_POLLS))
            self.delays.append(delay)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
                # a new job arrived: start the fast polls again, batching simultaneous arrivals
                quiet = 0
                await asyncio.sleep(min(self.interval, FIRST_POLL_S))


class HpcJobTrigger(BaseTrigger):
    """Fires once the gateway reports the job terminal (see the module docstring's table).

    :param job_id: the gateway job id (the job key).
    :param hpc_conn_id: connection of the gateway.
    :param poll_interval: seconds between shared status polls.
    :param native_id: the scheduler's id, only for log messages.
    :param unknown_timeout: seconds the job may stay UNKNOWN in a row before the trigger fires
        with that state.
    :param poll_outage_limit: seconds without a good status poll after which the trigger
        cancels the job and fires an error event.
    :param log_tail_bytes: how much of the job log's end the event carries (0: none).
    :param fetch_result: whether the event of a COMPLETED job carries its ``summary.json``.

    When the job ended, the trigger reads the log tail (and, for a COMPLETED job, the step's
    summary) over its shared gateway connection and puts them in the event (``log_tail``,
    ``result``; the result only up to :data:`MAX_EVENT_RESULT_BYTES`): the resumed task then
    needs no SSH connection and no gateway call of its own. What cannot be fetched is left
    out, and the task asks for it itself.
    """

    def __init__(
        self,
        job_id: str,
        hpc_conn_id: str,
        poll_interval: float = 10.0,
        native_id: str = "",
        unknown_timeout: float = UNKNOWN_TIMEOUT_S,
        poll_outage_limit: float = POLL_OUTAGE_LIMIT_S,
        log_tail_bytes: int = 0,
        fetch_result: bool = False,
    ) -> None:
        super().__init__()
        self.log_tail_bytes = log_tail_bytes
        self.fetch_result = fetch_result
        self.job_id = job_id
        self.hpc_conn_id = hpc_conn_id
        self.poll_interval = poll_interval
        self.native_id = native_id
        self.unknown_timeout = unknown_timeout
        self.poll_outage_limit = poll_outage_limit
        #: the progress (and array breakdown) lines last logged: a line is logged on change
        self._progress_logged: tuple[str | None, str | None] = (None, None)

    def _log_progress(self, status: JobStatus) -> None:
        """Log the job's progress (and its array tasks') when it differs from the last line.

        Called in this trigger's own asyncio task: the triggerer binds ``trigger_id`` to that
        task's log context and routes what it logs into the task instance's log."""
        line = describe(status.progress) if status.progress is not None else None
        tasks = describe_tasks(status.array_progress) if status.array_progress else None
        last_line, last_tasks = self._progress_logged
        if line is not None and line != last_line:
            self.log.info("progress: %s", line)
        if tasks is not None and tasks != last_tasks:
            self.log.info("array progress: %s", tasks)
        self._progress_logged = (line or last_line, tasks or last_tasks)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "operators.triggers.HpcJobTrigger",
            {
                "job_id": self.job_id,
                "hpc_conn_id": self.hpc_conn_id,
                "poll_interval": self.poll_interval,
                "native_id": self.native_id,
                "unknown_timeout": self.unknown_timeout,
                "poll_outage_limit": self.poll_outage_limit,
                "log_tail_bytes": self.log_tail_bytes,
                "fetch_result": self.fetch_result,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        poller = StatusPoller.get(self.hpc_conn_id, self.poll_interval)
        self.log.info("waiting for cluster job %s (%s)", self.job_id, self.native_id)
        try:
            status = await poller.wait(self.job_id, self.unknown_timeout, self.poll_outage_limit,
                                       on_status=self._log_progress)
        except PollGaveUp as exc:
            yield TriggerEvent(
                {"job_id": self.job_id, "native_id": self.native_id, "state": "UNKNOWN",
                 "error": str(exc), "cancelled": exc.cancelled}
            )
            return
        except HpcConfigError as exc:
            yield TriggerEvent(
                {"job_id": self.job_id, "native_id": self.native_id, "state": "UNKNOWN",
                 "error": str(exc), "cancelled": False}
            )
            return
        self._log_progress(status)  # the final count
        yield TriggerEvent({**status.model_dump(mode="json"), **await self._job_end(status)})

    async def _job_end(self, status: JobStatus) -> dict[str, Any]:
        """The ended job's log tail and (COMPLETED) summary, for the event; what fails is left
        out (the resumed task asks for it itself)."""
        out: dict[str, Any] = {}
        want_result = self.fetch_result and status.state is JobState.COMPLETED
        if not self.log_tail_bytes and not want_result:
            return out
        client = AsyncGatewayClient(self.hpc_conn_id)  # the loop's shared SSH connection
        n = min(self.log_tail_bytes, MAX_CHUNK_BYTES)
        calls = {}  # both at once: two channels of one connection, one round trip of time
        if n:
            calls["log_tail"] = client.call("log", {"job_id": self.job_id, "offset": -n,
                                                    "max_bytes": n})
        if want_result:
            calls["result"] = client.call("result", {"job_id": self.job_id})
        try:
            replies = await asyncio.gather(*calls.values(), return_exceptions=True)
        finally:
            await client.close()
        for name, reply in zip(calls, replies, strict=True):
            if isinstance(reply, BaseException):
                self.log.warning("could not read the %s of job %s here (%s); the task will",
                                 name.replace("_", " "), self.job_id, reply)
            elif name == "log_tail":
                out[name] = {"offset": reply["offset"], "text": reply["text"]}
            else:
                kept = {"data": reply.get("data"), "text": reply.get("text")}
                if len(json.dumps(kept)) <= MAX_EVENT_RESULT_BYTES:
                    out[name] = kept
        return out

    async def on_kill(self) -> None:
        """A user killed the deferred task (mark failed / clear): cancel the cluster job."""
        client = AsyncGatewayClient(self.hpc_conn_id, timeout=30)
        try:
            await client.cancel(self.job_id)
            self.log.info("cancelled cluster job %s", self.job_id)
        finally:
            await client.close()
