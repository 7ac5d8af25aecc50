"""Live progress: ``omeflow_cluster_check`` sleeps a few seconds, counting them in
``progress.jsonl``; the gateway's ``status`` returns the latest count, and the trigger writes a
line into the task's log each time the count changes. Once through the real Slurm sandbox (SSH,
forced command, sbatch; ``dag.test()``), once through a running stack's real triggerer, whose
task log is read back through the REST API.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration.test_cluster_check_dag import ssh_conn_env
from tests.stack_fixture import Stack

pytestmark = pytest.mark.slow

DAG_ID = "omeflow_cluster_check"
SLEEP_S = 6
#: Long enough for the running stack's triggerer to pick the deferred task up and poll a few
#: times (the test ends the run as soon as it has seen two lines).
LIVE_SLEEP_S = 120


@pytest.mark.sandbox
def test_progress_lines_reach_the_task_log_while_a_slurm_job_runs(run_dag, sandbox: Any) -> None:
    result, output = run_dag(
        DAG_ID, {"sleep_s": SLEEP_S}, env=ssh_conn_env(sandbox), timeout=300
    )
    assert result["state"] == "success", output[-4000:]
    counts = [int(n) for n in re.findall(rf"progress: (\d+)/{SLEEP_S} seconds \(\d+ %\), sleeping",
                                         output)]
    assert len(set(counts)) >= 2, f"fewer than two distinct progress lines:\n{output[-4000:]}"
    assert counts == sorted(counts), f"progress went backwards: {counts}"
    assert len(counts) == len(set(counts)), f"a line repeated (logged on every poll): {counts}"
    assert counts[-1] == SLEEP_S, "the final count is logged"
    assert result["tasks"]["cluster_check"]["xcom"]["slurm_job_id"], "it ran under Slurm"


def test_the_triggerer_files_progress_lines_in_the_task_log(live_stack: Stack) -> None:
    """The real triggerer (``live_stack``, embedded local scheduler): Airflow 3.3 binds each
    trigger's id to its own asyncio task's log context and writes what is logged there to
    ``<task log>.trigger.<id>.log``, which the task log API serves with the task's own lines.
    While the job runs, the progress lines must show up there, under the task instance."""
    stack = live_stack
    stack.unpause(DAG_ID)
    reply = stack.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                      json={"logical_date": None,
                            "conf": {"sleep_s": LIVE_SLEEP_S, "time_min": 5}})
    assert reply.status_code == 200, reply.text
    ti_path = (f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(reply.json()['dag_run_id'], safe='')}"
               f"/taskInstances/cluster_check")

    def task_log() -> str:
        reply = stack.api("GET", f"{ti_path}/logs/1", params={"full_content": True},
                          headers={"Accept": "application/json"})
        if reply.status_code != 200:
            return ""
        # the task log as the UI shows it: one structured message per line
        return "\n".join(f"{m.get('timestamp', '')} {m.get('event', '')}" if isinstance(m, dict)
                         else str(m) for m in reply.json()["content"])

    def counts() -> list[int]:
        return [int(n) for n in re.findall(rf"progress: (\d+)/{LIVE_SLEEP_S} seconds",
                                           task_log())]

    try:
        seen = stack.wait_for("two progress lines in the running task's log",
                              lambda: (c := counts()) and len(set(c)) >= 2 and c, 300)
        assert seen == sorted(set(seen)), f"repeated or backwards: {seen}\n{task_log()}"
        assert stack.api("GET", ti_path).json()["state"] == "deferred", "read while it waits"
    finally:  # end the run now: the task is failed, its trigger's on_kill cancels the job
        ended = stack.api("PATCH", ti_path, json={"new_state": "failed"})
    assert ended.status_code == 200, ended.text
