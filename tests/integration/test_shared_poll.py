"""100 deferred jobs in one triggerer share one ``status`` call per poll interval."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hpc_jobs.config import SiteConfig


@pytest.fixture()
def local_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = SiteConfig.local(tmp_path)
    path = tmp_path / "site.toml"
    path.write_text(site.to_toml())
    conn = {"conn_type": "generic", "extra": {"transport": "local", "config": str(path)}}
    monkeypatch.setenv("AIRFLOW_CONN_OMEFLOW_TEST", json.dumps(conn))
    return path


def test_one_status_call_per_poll_for_100_jobs(local_gateway: Path) -> None:
    from hooks.hpc import HpcGatewayHook
    from hpc_jobs.gateway import handle
    from operators.triggers import HpcJobTrigger, StatusPoller

    n = 100
    # 100 real jobs on the local scheduler, submitted through the gateway's own code in this
    # process (fast), still running when the triggers start and ending at different times
    ids = []
    for i in range(n):
        body = json.dumps(
            {"step": "cluster_check", "job_key": f"job-{i}", "params": {"sleep_s": 10 + i % 5}}
        ).encode()
        reply, status = handle("submit", body, local_gateway)
        assert status == 0, reply
        ids.append(reply["job_id"])
    hook = HpcGatewayHook("omeflow_test")
    assert sum(s.state.value in ("PENDING", "RUNNING") for s in hook.status(ids)) > n / 2

    async def wait_all() -> tuple[list, StatusPoller]:
        triggers = [
            HpcJobTrigger(job_id=j, hpc_conn_id="omeflow_test", poll_interval=1.0) for j in ids
        ]

        async def first_event(trigger: HpcJobTrigger):
            async for event in trigger.run():
                return event.payload

        events = await asyncio.wait_for(asyncio.gather(*(first_event(t) for t in triggers)), 600)
        return events, StatusPoller.get("omeflow_test", 1.0)

    events, poller = asyncio.run(wait_all())
    assert sorted(e["job_id"] for e in events) == sorted(ids)
    assert all(e["state"] == "COMPLETED" for e in events)
    # every poll asked about all waiting jobs at once: one gateway call per poll
    assert poller.max_batch == n, "one poll carried every waiting job"
    assert poller.client.calls == poller.polls
    assert 1 < poller.polls < n / 4, f"{poller.polls} polls for {n} jobs"
    print(
        f"{n} jobs: {poller.polls} polls, {poller.client.calls} gateway calls, "
        f"largest poll {poller.max_batch} jobs"
    )


def test_each_event_loop_gets_its_own_poller(local_gateway: Path) -> None:
    """Several dag.test() runs in one process each run their own loop: a poller never
    outlives its loop (its asyncio objects are bound to it)."""
    from hooks.hpc import HpcGatewayHook
    from operators.triggers import HpcJobTrigger, StatusPoller

    hook = HpcGatewayHook("omeflow_test")

    async def wait(job_id: str) -> tuple[dict, StatusPoller]:
        trigger = HpcJobTrigger(job_id=job_id, hpc_conn_id="omeflow_test", poll_interval=1.0)
        async for event in trigger.run():
            return event.payload, StatusPoller.get("omeflow_test", 1.0)
        raise AssertionError("no event")

    first_event, first = asyncio.run(wait(hook.submit("cluster_check", "loop-1").job_id))
    second_event, second = asyncio.run(wait(hook.submit("cluster_check", "loop-2").job_id))
    assert first_event["state"] == second_event["state"] == "COMPLETED"
    assert first is not second
    assert first not in StatusPoller._instances.values(), "the closed loop's poller is gone"
