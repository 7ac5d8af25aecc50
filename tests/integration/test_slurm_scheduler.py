"""SlurmScheduler against the real Slurm of the sandbox (``make hpc-sandbox`` first).

Jobs run as whoever runs the tests (root here; the gateway runs them as ``omeflow``).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from typing import Any

import pytest

from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import JobState, Resources
from hpc_jobs.schedulers.base import JobSpec, NativeStatus
from hpc_jobs.schedulers.slurm import SlurmScheduler
from tests.sandbox_fixture import sandbox  # noqa: F401

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(300)]


class CountingRunner:
    """subprocess.run wrapper that records every argv."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        return subprocess.run(argv, **kw)

    def count(self, program: str, *first_args: str) -> int:
        n = len(first_args)
        return sum(1 for c in self.calls if c[0] == program and c[1 : 1 + n] == list(first_args))


@pytest.fixture(scope="module", autouse=True)
def _hand_back_job_dirs(sandbox: dict[str, Any]) -> Any:  # noqa: F811
    """Tests run as root and write job dirs; give them back to the service user afterwards."""
    yield
    if os.geteuid() == 0:
        from hpc_jobs.sandbox import fix_permissions

        fix_permissions()


@pytest.fixture
def site(sandbox: dict[str, Any]) -> SiteConfig:  # noqa: F811
    return SiteConfig.load(sandbox["site_config"])


def _spec(site: SiteConfig, body: str, **res: Any) -> JobSpec:
    name = f"t-{uuid.uuid4().hex[:10]}"
    job_dir = site.job_root / "pytest" / name
    job_dir.mkdir(parents=True)
    script = job_dir / "job.py"
    script.write_text(f"#!{site.python}\nimport os, sys, time\n{body}\n")
    script.chmod(0o755)
    resources = Resources(**{"cpus": 1, "mem_mb": 256, "time_min": 5, **res})
    return JobSpec(job_dir, script, name, resources, job_dir / "job.log", site)


def _wait(
    sched: SlurmScheduler, job_id: str, timeout: float, until: set[JobState] | None = None
) -> tuple[NativeStatus, list[JobState]]:
    seen: list[JobState] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = sched.status([job_id])[job_id]
        if not seen or seen[-1] != st.state:
            seen.append(st.state)
        if (until and st.state in until) or (not until and st.state.terminal):
            return st, seen
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {seen} after {timeout}s")


def test_completed_job(site: SiteConfig) -> None:
    sched = SlurmScheduler(site)
    spec = _spec(site, "print('hello from', os.environ['SLURM_JOB_ID'], os.environ['HOME'])")
    job_id = sched.submit(spec)
    assert job_id.isdigit()
    st, seen = _wait(sched, job_id, 120)
    assert st.state == JobState.COMPLETED, (st, seen)
    assert st.exit_code == 0
    assert set(seen) <= {JobState.PENDING, JobState.RUNNING, JobState.COMPLETED}
    assert f"hello from {job_id}" in spec.log_path.read_text()
    assert sched.find_by_name(spec.name) == job_id


def test_failed_job_exit_code(site: SiteConfig) -> None:
    sched = SlurmScheduler(site)
    job_id = sched.submit(_spec(site, "sys.exit(3)"))
    st, _ = _wait(sched, job_id, 120)
    assert st.state == JobState.FAILED
    assert st.exit_code == 3
    assert "NonZeroExitCode" in (st.reason or "")


def test_cancelled_job(site: SiteConfig) -> None:
    sched = SlurmScheduler(site)
    job_id = sched.submit(_spec(site, "time.sleep(300)"))
    _wait(sched, job_id, 60, until={JobState.RUNNING, JobState.PENDING})
    sched.cancel(job_id)
    st, _ = _wait(sched, job_id, 60)
    assert st.state == JobState.CANCELLED
    sched.cancel(job_id)  # cancelling a finished job is a no-op


def test_array_job_aggregates_worst_failure(site: SiteConfig) -> None:
    sched = SlurmScheduler(site)
    body = "sys.exit(4 if os.environ['SLURM_ARRAY_TASK_ID'] == '2' else 0)"
    job_id = sched.submit(_spec(site, body, array="0-3"))
    st, _ = _wait(sched, job_id, 180)
    assert st.state == JobState.FAILED
    assert st.exit_code == 4
    assert st.array_states == {"COMPLETED": 3, "FAILED": 1}


def test_status_of_three_jobs_is_one_squeue_call(site: SiteConfig) -> None:
    submitter = SlurmScheduler(site)
    ids = [submitter.submit(_spec(site, "time.sleep(2)")) for _ in range(3)]
    runner = CountingRunner()
    sched = SlurmScheduler(site, runner=runner)
    result = sched.status([*ids, "99999999"])
    assert set(result) == set(ids)  # the unknown id is absent, not an error
    assert runner.count("squeue") == 1
    assert runner.count("scontrol", "show", "job") <= 1
    assert len(runner.calls) <= 3  # squeue + (one-time config probe) + one finished-job query
    for job_id in ids:
        _wait(sched, job_id, 120)
    runner.calls.clear()
    done = sched.status(ids)
    assert {s.state for s in done.values()} == {JobState.COMPLETED}
    assert runner.count("squeue") == 1 and len(runner.calls) == 2  # config probe is cached


@pytest.mark.slow
def test_timeout_job(site: SiteConfig) -> None:
    """--time=1 and a job that sleeps 120 s: Slurm kills it within ~1-2 minutes."""
    sched = SlurmScheduler(site)
    job_id = sched.submit(_spec(site, "time.sleep(120)", time_min=1))
    st, _ = _wait(sched, job_id, 170)
    assert st.state == JobState.TIMEOUT
    assert st.exit_code is not None and st.exit_code != 0


def test_submit_error_carries_stderr(site: SiteConfig) -> None:
    sched = SlurmScheduler(site)
    spec = _spec(site, "pass", partition="nosuchpartition")
    with pytest.raises(Exception, match="(?i)partition"):
        sched.submit(spec)


def test_sbatch_variables_in_the_gateway_environment_change_nothing(
    site: SiteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sbatch reads SBATCH_* from its environment for every option its command line does not
    give: an SBATCH_ACCOUNT or SBATCH_BEGIN in the gateway's environment used to charge jobs to
    another account and hold them back an hour. The argv's own options stay as given."""
    monkeypatch.setenv("SBATCH_ACCOUNT", "hijacked")
    monkeypatch.setenv("SBATCH_BEGIN", "now+1hour")
    monkeypatch.setenv("SBATCH_TIMELIMIT", "1")
    monkeypatch.setenv("SBATCH_JOB_NAME", "hijacked")
    sched = SlurmScheduler(site)
    spec = _spec(site, "time.sleep(1)", time_min=7)
    job_id = sched.submit(spec)
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
        assert "hijacked" not in shown, shown
        assert "TimeLimit=00:07:00" in shown and f"JobName={spec.name} " in shown, shown
        st, _ = _wait(sched, job_id, 120)
        assert st.state == JobState.COMPLETED
    finally:
        sched.cancel(job_id)
