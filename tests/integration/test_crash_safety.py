"""Crash safety with real components on the Slurm sandbox (issue 11 item 3).

api-server, scheduler, dag-processor and triggerer run as separate processes
(:class:`tests.crash_harness.CrashStack`) on a throw-away home, with the gateway reached over
the sandbox's sshd. ``omeflow_cluster_check`` runs with a job long enough to crash things
around it. What is counted is what Slurm saw: the jobs in accounting (``sacct``, slurmdbd)
whose name (the job key) belongs to the run, each one cross-checked against a
``_slurm_rpc_submit_batch_job`` line of the slurmctld log written during the test.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hpc_jobs.protocol import EXIT_RETRY_LATER
from hpc_jobs.sandbox.paths import SLURMCTLD_LOG
from operators.hpc_step import task_job_key
from tests.crash_harness import CrashStack
from tests.integration.test_cluster_check_dag import ssh_conn_env
from tests.sandbox_fixture import sandbox  # noqa: F401
from tests.stack_fixture import FAST_ENV, migrated_home

pytestmark = [pytest.mark.slow, pytest.mark.sandbox, pytest.mark.timeout(420)]

DAG_ID = "omeflow_cluster_check"
TASK_ID = "cluster_check"
#: A lost worker is noticed after this many seconds without a task heartbeat; one retry,
#: 5 s later (the defaults, 300 s and 0 retries, suit a site, not a test).
CRASH_ENV = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "1",
    "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "5",
    "AIRFLOW__OMEFLOW__HPC_TASK_RETRIES": "1",  # cluster-step tasks: [omeflow], not [core]
    "AIRFLOW__OMEFLOW__HPC_RETRY_DELAY_S": "5",
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "15",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15",
    # only the DAG under test runs (the nightly cron DAG would take a worker slot)
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
}
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def crash_stack(sandbox: dict[str, Any], tmp_path_factory: pytest.TempPathFactory  # noqa: F811
                ) -> Iterator[CrashStack]:
    base = tmp_path_factory.mktemp("crash_stack")
    env = {**migrated_home(base), **FAST_ENV, **CRASH_ENV, **ssh_conn_env(sandbox)}
    logs = base / "logs"
    logs.mkdir()
    stack = CrashStack(env, logs)
    try:
        stack.start_all()
        stack.unpause(DAG_ID)
        yield stack
    finally:
        stack.stop()


class SlurmSubmits:
    """The sbatch calls Slurm saw from now on, for the jobs of one DAG run."""

    def __init__(self) -> None:
        self.since = (datetime.now() - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
        self.log_offset = SLURMCTLD_LOG.stat().st_size

    def jobs(self, run_id: str) -> dict[str, list[str]]:
        """job key -> Slurm job ids (each one an sbatch call) of ``run_id``'s jobs."""
        out = subprocess.run(
            ["sacct", "-a", "-X", "-n", "-P", "-S", self.since, "-o", "JobIDRaw,JobName"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        found: dict[str, list[str]] = {}
        for line in out.splitlines():
            job_id, _, name = line.partition("|")
            if f".{run_id}." in name:
                found.setdefault(name, []).append(job_id)
        with open(SLURMCTLD_LOG, errors="replace") as fh:
            fh.seek(self.log_offset)
            submitted = set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", fh.read()))
        for name, ids in found.items():
            assert set(ids) <= submitted, f"{name}: {ids} not submitted during the test"
        return found


def _key(run_id: str, try_number: int) -> str:
    return task_job_key(DAG_ID, run_id, TASK_ID, -1, try_number)


def _wait_done(stack: CrashStack, run_id: str) -> str:
    return str(stack.wait_for(
        f"run {run_id} to finish",
        lambda: (s := stack.run_state(DAG_ID, run_id)) in ("success", "failed") and s,
        RUN_TIMEOUT_S, interval=2))


def _task_log(stack: CrashStack, run_id: str, try_number: int) -> str:
    reply = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{TASK_ID}"
                             f"/logs/{try_number}", params={"full_content": "true"})
    assert reply.status_code == 200, reply.text
    return reply.text


def test_lost_worker_retry_reattaches_and_a_retry_later_failure_submits_anew(
    crash_stack: CrashStack, sandbox: dict[str, Any]  # noqa: F811
) -> None:
    """The worker of try 1 is killed -9 right after its sbatch: the scheduler fails the try by
    heartbeat timeout, try 2 reattaches to the job still running (1 sbatch for 2 tries) and
    succeeds. Beside it, a job exiting 75 (EXIT_RETRY_LATER) is retried with a new job each
    try (2 sbatch) and the task ends failed."""
    stack, submits = crash_stack, SlurmSubmits()
    lost, later = f"crash-worker-{uuid.uuid4().hex[:8]}", f"crash-later-{uuid.uuid4().hex[:8]}"
    stack.trigger(DAG_ID, lost, {"sleep_s": 45})
    stack.trigger(DAG_ID, later, {"exit_code": EXIT_RETRY_LATER})

    ti_id = stack.wait_for("the task instance", lambda: stack.task_instance(
        DAG_ID, lost, TASK_ID).get("id"), RUN_TIMEOUT_S, interval=0.5)
    job_dir = Path(sandbox["job_root"]) / _key(lost, 1)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not job_dir.exists():  # the gateway creates it just before its sbatch
        assert time.monotonic() < deadline, f"no job for {lost}\n{stack.diagnostics()}"
        time.sleep(0.02)
    killed = stack.kill_worker(ti_id)
    assert killed, f"no supervisor of {ti_id} running: {stack.supervisor_titles()}"

    assert _wait_done(stack, lost) == "success"
    ti = stack.task_instance(DAG_ID, lost, TASK_ID)
    assert (ti["state"], ti["try_number"]) == ("success", 2), (
        f"try 1 must be lost with its worker (killed {killed} too late?): {ti}")
    lost_jobs = submits.jobs(lost)
    assert list(lost_jobs) == [_key(lost, 1)], f"try 2 submitted nothing: {lost_jobs}"
    assert len(lost_jobs[_key(lost, 1)]) == 1, f"one sbatch for two tries: {lost_jobs}"
    assert "reattached, no new job" in _task_log(stack, lost, 2)

    assert _wait_done(stack, later) == "failed"
    ti = stack.task_instance(DAG_ID, later, TASK_ID)
    assert (ti["state"], ti["try_number"]) == ("failed", 2), ti
    jobs = submits.jobs(later)
    assert sorted(jobs) == sorted([_key(later, 1), _key(later, 2)]), jobs
    assert all(len(ids) == 1 for ids in jobs.values()), f"one sbatch per try: {jobs}"
    print(f"\nsbatch calls: lost worker {lost_jobs}; exit 75 {jobs}")


def test_killing_triggerer_scheduler_and_api_server_keeps_one_job(
    crash_stack: CrashStack, sandbox: dict[str, Any]  # noqa: F811
) -> None:
    """While the cluster job runs, the triggerer, the scheduler and the api-server are killed
    -9 in turn and restarted: the run succeeds on its first try with one sbatch."""
    stack, submits = crash_stack, SlurmSubmits()
    run_id = f"crash-components-{uuid.uuid4().hex[:8]}"
    stack.trigger(DAG_ID, run_id, {"sleep_s": 50})
    stack.wait_for("the task to defer on its job",
                   lambda: stack.task_instance(DAG_ID, run_id, TASK_ID)["state"] == "deferred",
                   RUN_TIMEOUT_S)
    started = time.monotonic()
    for name in ("triggerer", "scheduler", "api-server"):
        stack.kill(name)
        time.sleep(2)
        stack.restart(name)
        if name == "api-server":
            stack.wait_api()  # the token from before the crash still works (shared JWT secret)
    kills_s = time.monotonic() - started
    assert stack.run_state(DAG_ID, run_id) == "running", "the kills ended before the job"

    assert _wait_done(stack, run_id) == "success", stack.diagnostics()
    ti = stack.task_instance(DAG_ID, run_id, TASK_ID)
    assert (ti["state"], ti["try_number"]) == ("success", 1), ti
    jobs = submits.jobs(run_id)
    assert list(jobs) == [_key(run_id, 1)] and len(jobs[_key(run_id, 1)]) == 1, jobs
    accounting = re.search(r"cluster job \S+ COMPLETED: node [^\\\"]*MaxRSS [^\\\"]*",
                           _task_log(stack, run_id, 1))
    assert accounting, "the task log ends with the job's node, elapsed / limit, exit code, MaxRSS"
    print(f"\nkills and restarts took {kills_s:.0f} s; sbatch calls: {jobs}\n{accounting[0]}")
