"""``omeflow_cluster_check`` through ``dag.test()``: embedded default and the real sandbox.

The sandbox tests go Airflow → SSH (forced command) → gateway → sbatch → slurmd → job as the
unprivileged ``omeflow`` user, and back.
"""

from __future__ import annotations

import json
import socket
import subprocess
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def ssh_conn_env(sandbox: dict[str, Any]) -> dict[str, str]:
    """AIRFLOW_CONN_OMEFLOW_HPC for the sandbox: SSH with the host key pinned."""
    conn = {
        "conn_type": "ssh",
        "host": sandbox["host"],
        "port": sandbox["port"],
        "login": sandbox["user"],
        "extra": {
            "key_file": sandbox["key_file"],
            "host_key": f"{sandbox['host_key_type']} {sandbox['host_key']}",
        },
    }
    return {"AIRFLOW_CONN_OMEFLOW_HPC": json.dumps(conn)}


# -- embedded default (local scheduler, no SSH) -------------------------------------------------
def test_local_cluster_check_succeeds_and_returns_the_report(run_dag) -> None:
    result, output = run_dag("omeflow_cluster_check", {})
    task = result["tasks"]["cluster_check"]
    assert result["state"] == "success", output[-4000:]
    report = task["xcom"]
    assert report["hostname"] == socket.gethostname()
    assert report["packages"]["omeflow"] and report["packages"]["pydantic"]
    assert report["slurm_job_id"] is None  # ran under the local scheduler
    assert "cluster job" in output and "log (tail)" in output, "job log reaches the task log"


def test_local_failing_job_names_the_exit_code(run_dag) -> None:
    result, output = run_dag("omeflow_cluster_check", {"exit_code": 3})
    assert result["state"] == "failed"
    assert "ended FAILED (exit code 3" in output, output[-4000:]
    assert "exiting with status 3 as asked" in output, "the job's log tail is in the task log"


# -- the real sandbox (Slurm + sshd on 127.0.0.1) ----------------------------------------------
@pytest.mark.sandbox
def test_sandbox_cluster_check_runs_on_the_compute_node(run_dag, sandbox) -> None:
    result, output = run_dag("omeflow_cluster_check", {}, env=ssh_conn_env(sandbox))
    assert result["state"] == "success", output[-4000:]
    report = result["tasks"]["cluster_check"]["xcom"]
    assert report["user"] == sandbox["user"], "the job runs as the unprivileged HPC user"
    assert report["slurm_job_id"], "the job ran under Slurm"
    assert report["python_executable"].startswith("/opt/omeflow-hpc/")
    assert report["job_root_writable"] is True
    assert "via ssh" in output


@pytest.mark.sandbox
def test_sandbox_failing_job_fails_the_task_with_exit_code(run_dag, sandbox) -> None:
    result, output = run_dag("omeflow_cluster_check", {"exit_code": 1}, env=ssh_conn_env(sandbox))
    assert result["state"] == "failed"
    assert "ended FAILED (exit code 1" in output, output[-4000:]


@pytest.mark.sandbox
def test_sandbox_job_over_its_time_limit_ends_timeout(run_dag, sandbox) -> None:
    result, output = run_dag(
        "omeflow_cluster_check", {"sleep_s": 600, "time_min": 1}, env=ssh_conn_env(sandbox)
    )
    assert result["state"] == "failed"
    assert "ended TIMEOUT" in output and "raise the time limit" in output, output[-4000:]


@pytest.mark.sandbox
def test_sandbox_cancel_and_idempotent_submit(sandbox, monkeypatch) -> None:
    for key, value in ssh_conn_env(sandbox).items():
        monkeypatch.setenv(key, value)
    from hooks.hpc import HpcGatewayHook
    from hpc_jobs.protocol import JobState, job_key_for

    hook = HpcGatewayHook()
    assert hook.transport == "ssh"
    key = job_key_for("pytest", "cancel", socket.gethostname(), id(hook))
    first = hook.submit("cluster_check", key, params={"sleep_s": 300})
    second = hook.submit("cluster_check", key, params={"sleep_s": 300})
    assert first.created and not second.created
    assert first.native_id == second.native_id, "one key, one Slurm job"
    squeue = subprocess.run(["squeue", "-h", "--name", key, "-o", "%i"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert squeue == [first.native_id]
    cancelled = hook.cancel(key)
    assert cancelled.state is JobState.CANCELLED
    status = hook.status([key])[0]
    assert status.state is JobState.CANCELLED
    hook.close()


@pytest.mark.sandbox
def test_sandbox_session_key_never_on_argv_or_in_squeue(sandbox, monkeypatch) -> None:
    for key, value in ssh_conn_env(sandbox).items():
        monkeypatch.setenv(key, value)
    from hooks.hpc import HpcGatewayHook
    from hpc_jobs.protocol import job_key_for

    secret = "feedface-0000-4000-8000-123456789abc"
    hook = HpcGatewayHook()
    key = job_key_for("pytest", "secret", id(hook))
    hook.submit("cluster_check", key, params={"sleep_s": 20}, secrets={"omero_session_key": secret})
    try:
        seen = subprocess.run(["squeue", "-h", "-o", "%all"], capture_output=True, text=True,
                              check=True).stdout
        seen += subprocess.run(["ps", "axww", "-o", "args"], capture_output=True, text=True,
                               check=True).stdout
        seen += subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True,
                               check=True).stdout
        assert key in seen, "the job is visible (so the check below looks at the right place)"
        assert secret not in seen
        log = hook.log(key, offset=0).text
        assert secret not in log
    finally:
        hook.cancel(key)
        hook.close()
