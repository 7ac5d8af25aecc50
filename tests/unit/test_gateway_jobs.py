"""The gateway's job bookkeeping with real jobs on the local scheduler (in-process ``handle``):
array jobs the scheduler forgot, array results, a vanished job directory, an ``sbatch`` that
timed out after slurmctld accepted the job, and the environment scheduler commands get."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_jobs.config import SiteConfig
from hpc_jobs.gateway import Gateway, handle
from hpc_jobs.jobdir import JobDir
from hpc_jobs.protocol import GatewayError, StatusRequest, SubmitRequest
from hpc_jobs.schedulers.local import STATE_FILE
from hpc_jobs.schedulers.slurm import SlurmScheduler

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SiteConfig.local(tmp_path).to_toml())
    return path


def call(site_file: Path, verb: str, **body: Any) -> dict[str, Any]:
    reply, _status = handle(verb, json.dumps(body).encode(), site_file)
    return reply


def submit_and_wait(site_file: Path, key: str, **fields: Any) -> dict[str, Any]:
    reply = call(site_file, "submit", step="cluster_check", job_key=key, **fields)
    assert reply["ok"], reply
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        (job,) = call(site_file, "status", job_ids=[key])["jobs"]
        if job["state"] not in ("PENDING", "RUNNING"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {key} did not finish")


def forget(site_file: Path, key: str) -> JobDir:
    """What Slurm does after MinJobAge without accounting: the scheduler no longer knows it."""
    job = JobDir.of(site_file.parent / "jobs", key)
    (job.path / STATE_FILE).unlink()
    return job


def test_forgotten_array_job_is_judged_by_its_task_markers(site_file: Path) -> None:
    done = submit_and_wait(site_file, "arr", resources={"array": "0-2"})
    assert done["state"] == "COMPLETED"
    job = forget(site_file, "arr")

    (st,) = call(site_file, "status", job_ids=["arr"])["jobs"]
    assert st["state"] == "COMPLETED" and st["exit_code"] == 0, st
    assert st["array_states"] == {"COMPLETED": 3}
    assert "exit markers" in st["reason"]

    job.write_exit_marker(3, 1.0, task=2)  # one task failed
    job.write_exit_marker(1, 1.0, task=0)
    (st,) = call(site_file, "status", job_ids=["arr"])["jobs"]
    assert st["state"] == "FAILED" and st["exit_code"] == 3, st
    assert st["array_states"] == {"COMPLETED": 1, "FAILED": 2}

    job.exit_marker_path(1).unlink()  # a task killed before it could write its marker
    (st,) = call(site_file, "status", job_ids=["arr"])["jobs"]
    assert st["state"] == "UNKNOWN", st
    assert "1 of 3 array tasks left no exit marker (tasks 1)" in st["reason"]


def test_array_result_gathers_the_task_summaries(site_file: Path) -> None:
    assert submit_and_wait(site_file, "arr2", resources={"array": "0-1"})["state"] == "COMPLETED"
    reply = call(site_file, "result", job_id="arr2")
    assert reply["ok"], reply
    tasks = reply["data"]["array_tasks"]
    assert sorted(tasks) == ["0", "1"]
    assert all(t["python"] for t in tasks.values()), tasks  # cluster_check's own summaries

    (site_file.parent / "jobs" / "arr2" / "outputs" / "summary.1.json").unlink()
    reply = call(site_file, "result", job_id="arr2")
    assert reply["error"]["code"] == "NOT_FOUND"
    assert "1 of 2 tasks wrote no summary.<task>.json (tasks 1" in reply["error"]["message"]


def test_a_vanished_job_directory_gets_a_reason(site_file: Path) -> None:
    assert submit_and_wait(site_file, "gone")["state"] == "COMPLETED"
    shutil.rmtree(site_file.parent / "jobs" / "gone")
    (st,) = call(site_file, "status", job_ids=["gone"])["jobs"]
    assert st["state"] == "UNKNOWN"
    assert "directory was removed from the job root" in st["reason"], st


# -- Slurm: sbatch timing out after slurmctld accepted the job ---------------------------------
class FakeSlurm:
    """Stands in for ``subprocess.run`` of Slurm's tools: records each argv and its ``env``.

    ``sbatch_times_out``: slurmctld queues the job, but the answer never reaches sbatch.
    """

    def __init__(self, sbatch_times_out: bool = False) -> None:
        self.sbatch_times_out = sbatch_times_out
        self.calls: list[tuple[list[str], dict[str, str] | None]] = []
        self.queued: dict[str, str] = {}  # job name -> Slurm id

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        self.calls.append((list(argv), kw.get("env")))
        out = ""
        if argv[0] == "sbatch":
            name = next(a.split("=", 1)[1] for a in argv if a.startswith("--job-name="))
            self.queued[name] = str(4242 + len(self.queued))
            if self.sbatch_times_out:
                raise subprocess.TimeoutExpired(argv, kw["timeout"])
            out = self.queued[name]
        elif argv[0] == "squeue" and any(a.startswith("--name=") for a in argv):
            name = next(a.split("=", 1)[1] for a in argv if a.startswith("--name="))
            out = self.queued.get(name, "")
        return subprocess.CompletedProcess(argv, 0, out + "\n", "")

    def count(self, program: str) -> int:
        return sum(1 for argv, _ in self.calls if argv[0] == program)


def slurm_gateway(tmp_path: Path, runner: FakeSlurm, **slurm: Any) -> Gateway:
    site = SiteConfig.local(tmp_path)
    site = site.model_copy(
        update={"scheduler": "slurm", "slurm": site.slurm.model_copy(update=slurm)}
    )
    (tmp_path / "site.toml").write_text(site.to_toml())
    return Gateway(site, tmp_path / "site.toml", scheduler=SlurmScheduler(site, runner=runner))


def test_sbatch_timeout_after_acceptance_reattaches_instead_of_resubmitting(
    tmp_path: Path,
) -> None:
    runner = FakeSlurm(sbatch_times_out=True)
    gw = slurm_gateway(tmp_path, runner)
    req = SubmitRequest(step="cluster_check", job_key="k-timeout")
    reply = gw.submit(req)
    assert reply.native_id == "4242" and reply.created
    assert JobDir.of(tmp_path / "jobs", "k-timeout").read_job_record()["native_id"] == "4242"
    # the caller's retry (its reply may have been lost too) finds the same job
    runner.sbatch_times_out = False
    again = gw.submit(req)
    assert again.native_id == "4242" and not again.created
    assert runner.count("sbatch") == 1


def test_sbatch_timeout_with_no_job_keeps_the_directory_for_the_retry(tmp_path: Path) -> None:
    runner = FakeSlurm(sbatch_times_out=True)
    gw = slurm_gateway(tmp_path, runner)
    runner.queued["other"] = "1"

    def lost(argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        if argv[0] == "sbatch":  # slurmctld never got it
            runner.calls.append((list(argv), kw.get("env")))
            raise subprocess.TimeoutExpired(argv, kw["timeout"])
        return runner(argv, **kw)

    gw.scheduler.runner = lost
    req = SubmitRequest(step="cluster_check", job_key="k-lost")
    with pytest.raises(GatewayError, match="submit again with the same job key") as err:
        gw.submit(req)
    assert err.value.code.value == "RETRY_SAME_KEY"
    assert (tmp_path / "jobs" / "k-lost" / "request.json").exists()
    gw.scheduler.runner = runner
    other = SubmitRequest(step="cluster_check", job_key="k-lost", params={"sleep_s": 5})
    with pytest.raises(GatewayError, match="already used for a different request"):
        gw.submit(other)  # the kept directory still holds the key for its own request
    runner.sbatch_times_out = False
    assert gw.submit(req).created and runner.count("sbatch") == 2


# -- the environment of scheduler commands -------------------------------------------------------
def test_sbatch_gets_no_variable_from_the_gateway_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SBATCH_TIMELIMIT", "1")
    monkeypatch.setenv("SBATCH_PARTITION", "evil")
    monkeypatch.setenv("SQUEUE_FORMAT", "%i")
    runner = FakeSlurm()
    gw = slurm_gateway(tmp_path, runner, conf=tmp_path / "slurm.conf")
    gw.submit(SubmitRequest(step="cluster_check", job_key="k-env"))
    gw.status(StatusRequest(job_ids=["k-env"]))
    assert runner.count("sbatch") == 1 and runner.count("squeue") >= 1
    for argv, env in runner.calls:
        assert env is not None, f"{argv[0]} inherited the gateway's environment"
        assert set(env) <= {"PATH", "LANG", "HOME", "SLURM_CONF"}, (argv[0], env)
        assert env["SLURM_CONF"] == str(tmp_path / "slurm.conf")


def test_local_supervisor_gets_a_minimal_environment(
    site_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SBATCH_PARTITION", "evil")
    monkeypatch.setenv("OMEFLOW_LEAK", "1")
    assert call(site_file, "submit", step="cluster_check", job_key="envjob",
                params={"sleep_s": 30})["ok"]
    state_file = site_file.parent / "jobs" / "envjob" / STATE_FILE
    deadline = time.monotonic() + 60
    while "pid" not in json.loads(state_file.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = json.loads(state_file.read_text())["pid"]
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    finally:
        call(site_file, "cancel", job_id="envjob")
    names = {item.split(b"=", 1)[0].decode() for item in raw.split(b"\0") if item}
    assert names <= {"PATH", "LANG", "HOME"}, names
    assert os.environ["SBATCH_PARTITION"] == "evil"  # it was there to leak
