"""Slurm accounting for real: SlurmScheduler against the sandbox's slurmdbd + MariaDB.

Finished jobs are answered by ``sacct`` (squeue no longer lists them): final state, exit code,
elapsed, node, time limit and MaxRSS (from the job's ``.batch`` step). ``queue()`` is the
service account's live jobs in one squeue call. Jobs run as whoever runs the tests.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from typing import Any

import pytest

from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import JobState, job_key_for
from hpc_jobs.schedulers.slurm import SlurmScheduler
from tests.integration.test_slurm_scheduler import (  # noqa: F401 - the autouse fixture
    CountingRunner,
    _hand_back_job_dirs,
    _spec,
    _wait,
)
from tests.sandbox_fixture import sandbox  # noqa: F401

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(240)]

#: The memory job holds this much for HOLD_S seconds (jobacct_gather samples every second).
HOLD_MB = 200
HOLD_S = 4


class RecordingRunner(CountingRunner):
    """CountingRunner that also keeps each command's stdout."""

    def __init__(self) -> None:
        super().__init__()
        self.stdout: list[str] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        proc = super().__call__(argv, **kw)
        self.stdout.append(proc.stdout or "")
        return proc

    def last_squeue(self) -> str:
        pairs = zip(reversed(self.calls), reversed(self.stdout), strict=True)
        return next(out for argv, out in pairs if argv[0] == "squeue")


@pytest.fixture
def site(sandbox: dict[str, Any]) -> SiteConfig:  # noqa: F811
    site = SiteConfig.load(sandbox["site_config"])
    if not SlurmScheduler(site).accounting_enabled():
        pytest.fail("the sandbox runs without slurmdbd; restart it: "
                    "python -m hpc_jobs.sandbox stop && python -m hpc_jobs.sandbox start")
    return site


def test_finished_jobs_come_from_sacct_with_max_rss_elapsed_and_array_tasks(
    site: SiteConfig,
) -> None:
    """A job that holds 200 MiB for 4 s and an array whose task 1 exits 7, both read back
    from the accounting database after they left squeue."""
    submitter = SlurmScheduler(site)
    mem_body = (
        f"buf = bytearray({HOLD_MB} * 1024 * 1024)\n"
        "for i in range(0, len(buf), 4096):\n"
        "    buf[i] = 1\n"
        f"time.sleep({HOLD_S})\n"
    )
    mem_id = submitter.submit(_spec(site, mem_body, mem_mb=512, time_min=3))
    array_body = "time.sleep(1)\nsys.exit(7 if os.environ['SLURM_ARRAY_TASK_ID'] == '1' else 0)"
    array_id = submitter.submit(_spec(site, array_body, array="0-2"))

    runner = RecordingRunner()
    sched = SlurmScheduler(site, runner=runner)
    mem, _ = _wait(sched, mem_id, 150)
    arr, _ = _wait(sched, array_id, 150)
    runner.calls.clear()
    runner.stdout.clear()
    final = sched.status([mem_id, array_id])
    # answered by sacct: squeue lists neither job any more, scontrol was not asked
    assert runner.count("sacct") == 1 and runner.count("scontrol", "show", "job") == 0
    listed = {line.split("|")[1] for line in runner.last_squeue().splitlines() if line}
    assert mem_id not in listed and array_id not in listed
    assert final[mem_id] == mem and final[array_id] == arr

    host = socket.gethostname().split(".")[0]
    assert (mem.state, mem.exit_code) == (JobState.COMPLETED, 0)
    assert mem.max_rss_mb is not None and HOLD_MB <= mem.max_rss_mb < HOLD_MB + 100, mem
    assert mem.elapsed_s is not None and HOLD_S <= mem.elapsed_s <= HOLD_S + 15, mem
    assert (mem.node, mem.time_limit_s) == (host, 180)

    assert (arr.state, arr.exit_code) == (JobState.FAILED, 7)
    assert arr.array_states == {"COMPLETED": 2, "FAILED": 1}
    assert arr.reason == "NonZeroExitCode"
    assert arr.max_rss_mb is not None and 0 < arr.max_rss_mb < 100  # the largest task
    assert arr.elapsed_s is not None and 1 <= arr.elapsed_s <= 11
    assert (arr.node, arr.time_limit_s) == (host, 300)


def test_queue_lists_a_live_job_by_its_job_key(site: SiteConfig) -> None:
    sched = SlurmScheduler(site)
    key = job_key_for("test_slurm_accounting", "manual__queue", "sleeper", -1, 1)
    spec = dataclasses.replace(_spec(site, "time.sleep(120)", time_min=4), name=key)
    submitted = time.time()
    job_id = sched.submit(spec)
    try:
        runner = CountingRunner()
        jobs = SlurmScheduler(site, runner=runner).queue()
        assert runner.calls and all(c[0] == "squeue" for c in runner.calls)
        assert len(runner.calls) == 1
        mine = [j for j in jobs if j.name == key]
        assert [j.native_id for j in mine] == [job_id], jobs
        job = mine[0]
        assert job.state in (JobState.PENDING, JobState.RUNNING)
        assert job.partition == site.slurm.partition and job.time_limit_s == 240
        assert job.submitted_at is not None and abs(job.submitted_at - submitted) < 120
    finally:
        sched.cancel(job_id)
    st, _ = _wait(sched, job_id, 60)
    assert st.state == JobState.CANCELLED
    assert key not in {j.name for j in sched.queue()}
