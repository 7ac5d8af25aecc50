"""``HpcJobTrigger``: waits in the triggerer until a cluster job reaches a terminal state.

All triggers of one triggerer that watch jobs behind the same connection share ONE status
poll per interval: a :class:`StatusPoller` per (event loop, connection, interval) collects the
job ids of every waiting trigger and asks the gateway about all of them in a single ``status``
call. 100 concurrent jobs cost one gateway call (one SSH exec) per interval, not 100.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from hooks.hpc import AsyncGatewayClient, HpcGatewayError, HpcTransportError
from hpc_jobs.protocol import MAX_STATUS_IDS, JobStatus, never_starts

log = logging.getLogger(__name__)

#: Consecutive failed polls after which waiting triggers give up with an error event.
MAX_POLL_FAILURES = 8
#: First delay after a job arrives; it doubles on each quiet poll up to the poll interval.
FIRST_POLL_S = 0.5


class StatusPoller:
    """One shared poll loop: waiting triggers register job ids and await their final status."""

    _instances: dict[tuple[asyncio.AbstractEventLoop, str, float], StatusPoller] = {}

    def __init__(self, hpc_conn_id: str, interval: float) -> None:
        self.client = AsyncGatewayClient(hpc_conn_id)
        self.interval = interval
        self.waiters: dict[str, list[asyncio.Future[JobStatus]]] = {}
        self.polls = 0
        #: most job ids one poll asked about (shows the batching)
        self.max_batch = 0
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

    async def wait(self, job_id: str) -> JobStatus:
        """Return the job's status once it is terminal."""
        fut: asyncio.Future[JobStatus] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(job_id, []).append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        self._wake.set()
        try:
            return await fut
        finally:
            futs = self.waiters.get(job_id, [])
            if fut in futs:
                futs.remove(fut)
            if not futs:
                self.waiters.pop(job_id, None)

    async def _loop(self) -> None:
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
                for status in statuses:
                    if status.state.terminal or never_starts(status):
                        for fut in self.waiters.get(status.job_id, []):
                            if not fut.done():
                                fut.set_result(status)
            except (HpcTransportError, HpcGatewayError) as exc:
                failures += 1
                log.warning("status poll failed (%d in a row): %s", failures, exc)
                if failures >= MAX_POLL_FAILURES:
                    for futs in self.waiters.values():
                        for fut in futs:
                            if not fut.done():
                                fut.set_exception(exc)
                    failures = 0
            quiet += 1
            if failures:  # back off (sshd MaxStartups throttles reconnects)
                delay = self.interval * (2 ** min(failures, 4))
            else:  # 0.5 s, 1 s, 2 s ... up to the configured interval
                delay = min(self.interval, FIRST_POLL_S * 2 ** (quiet - 1))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
                # a new job arrived: start the fast polls again, batching simultaneous arrivals
                quiet = 0
                await asyncio.sleep(min(self.interval, FIRST_POLL_S))
        await self.client.close()


class HpcJobTrigger(BaseTrigger):
    """Fires once the gateway reports the job terminal.

    :param job_id: the gateway job id (the job key).
    :param hpc_conn_id: connection of the gateway.
    :param poll_interval: seconds between shared status polls.
    :param native_id: the scheduler's id, only for log messages.
    """

    def __init__(
        self, job_id: str, hpc_conn_id: str, poll_interval: float = 10.0, native_id: str = ""
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.hpc_conn_id = hpc_conn_id
        self.poll_interval = poll_interval
        self.native_id = native_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "operators.triggers.HpcJobTrigger",
            {
                "job_id": self.job_id,
                "hpc_conn_id": self.hpc_conn_id,
                "poll_interval": self.poll_interval,
                "native_id": self.native_id,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        poller = StatusPoller.get(self.hpc_conn_id, self.poll_interval)
        self.log.info("waiting for cluster job %s (%s)", self.job_id, self.native_id)
        try:
            status = await poller.wait(self.job_id)
        except (HpcTransportError, HpcGatewayError) as exc:
            yield TriggerEvent({"job_id": self.job_id, "state": "UNKNOWN", "error": str(exc)})
            return
        yield TriggerEvent(status.model_dump(mode="json"))

    async def on_kill(self) -> None:
        """A user killed the deferred task (mark failed / clear): cancel the cluster job."""
        client = AsyncGatewayClient(self.hpc_conn_id, timeout=30)
        try:
            await client.cancel(self.job_id)
            self.log.info("cancelled cluster job %s", self.job_id)
        finally:
            await client.close()
