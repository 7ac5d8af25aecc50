"""Slurm output parsing on real samples captured from the sandbox (Slurm 22.05, tests/data/slurm;
lines starting with # are the capture notes and are dropped before parsing).

Accounting on (slurmdbd + MariaDB), one scenario: 181 holds 200 MiB for 4 s, 182 exits 3, 183
sleeps (cancelled later), 184 an array 0-3%2 whose task 2 exits 4, 185 held, 186 waits for
CPUs; 172 an older timed-out job, 164 one cancelled while pending.
  squeue_acct_live.txt / sacct_acct_live.txt / squeue_queue.txt  (same moment, 9 s in)
  squeue_acct_later.txt / sacct_acct_later.txt  (14 s later: 184_0, 184_1 done)
  sacct_acct_done.txt  (all final)
  sacct_acct_timeout.txt  (a --time=1 job killed at its limit: 0:0 on its line, 0:15 on .batch)
Accounting off (the scontrol fallback):
  scontrol_mixed_pending_running.txt: 1, 8 completed; 2, 9 failed (exit 1); 3-7 cancelled
      while pending; 10, 11 running; 12 pending (Resources); 13 held; 14 array 0-3%2 pending.
  scontrol_array_partial.txt (later): 10 timed out (--time=1); 11 cancelled while running;
      14_0, 14_1 completed, 14_2 failed, 14_3 running; 17 pending.
  scontrol_final.txt: everything finished (14: 3 completed, 1 failed).
  squeue_array_running.txt / scontrol_array_running.txt (same moment): array 193 (0-3%2,
      task 2 exits 4) with tasks 0, 1 done and 2, 3 running; 194 waiting for CPUs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from hpc_jobs.config import SiteConfig, SlurmConfig, StoreConfig
from hpc_jobs.protocol import JobState, Resources
from hpc_jobs.schedulers.base import JobSpec, SchedulerError, SchedulerTimeout
from hpc_jobs.schedulers.slurm import (
    QUEUE_FORMAT,
    SQUEUE_FORMAT,
    SlurmScheduler,
    aggregate,
    count_tasks,
    parse_duration,
    parse_exit_code,
    parse_memory_mb,
    parse_queue,
    parse_sacct,
    parse_sbatch,
    parse_scontrol,
    parse_squeue,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "slurm"


def sample(name: str) -> str:
    text = (DATA / name).read_text()
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))


# -- small pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0:03", 3), ("1:19", 79), ("00:01:19", 79), ("2-03:04:05", 183845), ("", None),
     ("INVALID", None), ("N/A", None), ("UNLIMITED", None), ("10:00", 600),
     ("00:07:00", 420)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "mb"),
    [("213000K", 213000 / 1024), ("3088K", 3088 / 1024), ("1.50G", 1536.0), ("12M", 12.0),
     ("0", 0.0), ("", None), ("garbage", None)],
)
def test_parse_memory_mb(text: str, mb: float | None) -> None:
    assert parse_memory_mb(text) == mb


def test_parse_exit_code() -> None:
    assert parse_exit_code("1:0") == (1, 0)
    assert parse_exit_code("0:15") == (0, 15)
    assert parse_exit_code("garbage") == (None, None)


@pytest.mark.parametrize(
    ("spec", "n"), [("3", 1), ("0-3", 4), ("0-3%2", 4), ("1,4-6", 4), ("[5-7]", 3), ("0-10:5", 3)]
)
def test_count_tasks(spec: str, n: int) -> None:
    assert count_tasks(spec) == n


def test_parse_sbatch() -> None:
    assert parse_sbatch("42\n") == "42"
    assert parse_sbatch("42;cluster2\n") == "42"
    with pytest.raises(SchedulerError):
        parse_sbatch("sbatch: error: Batch job submission failed")


# -- squeue ------------------------------------------------------------------------------------
def test_squeue_pending_running_and_array() -> None:
    st = aggregate(parse_squeue(sample("squeue_acct_live.txt")))
    assert set(st) == {"183", "184", "185", "186"}
    assert st["183"].state == JobState.RUNNING and st["183"].elapsed_s == 6
    assert st["183"].exit_code is None
    assert (st["183"].node, st["183"].time_limit_s) == ("vm", 600)
    assert st["186"].state == JobState.PENDING and st["186"].reason == "Priority"
    assert st["186"].node is None and st["186"].time_limit_s == 420
    assert st["185"].reason == "JobHeldUser"
    assert st["184"].state == JobState.RUNNING
    assert st["184"].array_states == {"PENDING": 3, "RUNNING": 1}
    assert st["184"].time_limit_s == 300


def test_squeue_refuses_other_format() -> None:
    with pytest.raises(SchedulerError, match="format"):
        parse_squeue("12 RUNNING vm")


# -- scontrol ----------------------------------------------------------------------------------
def test_scontrol_terminal_states_and_exit_codes() -> None:
    st = aggregate(parse_scontrol(sample("scontrol_array_partial.txt")))
    assert st["1"].state == JobState.COMPLETED and st["1"].exit_code == 0
    assert st["2"].state == JobState.FAILED and st["2"].exit_code == 1
    assert "NonZeroExitCode" in st["2"].reason and st["2"].node == "vm"
    assert st["10"].state == JobState.TIMEOUT and st["10"].exit_code == 143
    assert st["10"].elapsed_s == 79 and st["10"].time_limit_s == 60
    assert st["11"].state == JobState.CANCELLED and st["11"].exit_code == 128 + 15
    assert "signal 15" in st["11"].reason
    assert st["12"].state == JobState.RUNNING and st["12"].exit_code is None
    assert st["17"].state == JobState.PENDING


def test_scontrol_pending_array_range_counts_tasks() -> None:
    st = aggregate(parse_scontrol(sample("scontrol_mixed_pending_running.txt")))
    assert st["14"].state == JobState.PENDING
    assert st["14"].array_states == {"PENDING": 4}
    assert st["7"].state == JobState.CANCELLED  # array cancelled before any task ran


def test_scontrol_array_partial_is_running_with_counts() -> None:
    st = aggregate(parse_scontrol(sample("scontrol_array_partial.txt")))
    assert st["14"].state == JobState.RUNNING
    assert st["14"].array_states == {"COMPLETED": 2, "FAILED": 1, "RUNNING": 1}
    assert st["14"].exit_code is None
    assert st["14"].elapsed_s == 20


def test_scontrol_final_array_takes_worst_failure() -> None:
    st = aggregate(parse_scontrol(sample("scontrol_final.txt")))
    assert st["14"].state == JobState.FAILED
    assert st["14"].exit_code == 1
    assert st["14"].array_states == {"COMPLETED": 3, "FAILED": 1}
    assert st["12"].state == JobState.COMPLETED


def test_scontrol_no_jobs() -> None:
    assert parse_scontrol("No jobs in the system\n") == []


# -- sacct (captured with slurmdbd) -------------------------------------------------------------
def test_sacct_final_states_exit_codes_and_max_rss() -> None:
    st = aggregate(parse_sacct(sample("sacct_acct_done.txt")))
    assert set(st) == {"164", "172", "181", "182", "183", "184", "185", "186"}  # no .batch
    mem = st["181"]
    assert (mem.state, mem.exit_code, mem.elapsed_s) == (JobState.COMPLETED, 0, 5)
    assert mem.max_rss_mb == pytest.approx(208.0, abs=0.1)  # 213000K from the .batch step
    assert (mem.node, mem.time_limit_s) == ("vm", 300)
    fail = st["182"]
    assert (fail.state, fail.exit_code) == (JobState.FAILED, 3)
    assert fail.reason == "NonZeroExitCode"  # Slurm's word; sacct itself keeps "None"
    assert fail.max_rss_mb is None  # the step ended before the first sample
    assert st["172"].state == JobState.TIMEOUT and st["172"].exit_code == 128 + 15
    assert st["172"].reason == "TimeLimit, signal 15"
    assert (st["172"].elapsed_s, st["172"].time_limit_s) == (64, 60)
    assert st["183"].state == JobState.CANCELLED  # "CANCELLED by 0"
    assert st["183"].exit_code == 15  # job line 0:0, its batch step 15:0
    assert st["185"].state == JobState.CANCELLED and st["185"].node is None  # never ran
    arr = st["184"]
    assert (arr.state, arr.exit_code) == (JobState.FAILED, 4)
    assert arr.array_states == {"COMPLETED": 3, "FAILED": 1}
    assert arr.max_rss_mb == pytest.approx(3300 / 1024)  # the largest task
    assert arr.elapsed_s == 6 and arr.node == "vm"


def test_sacct_timeout_takes_the_batch_steps_signal() -> None:
    st = aggregate(parse_sacct(sample("sacct_acct_timeout.txt")))["238"]
    assert (st.state, st.exit_code) == (JobState.TIMEOUT, 128 + 15)
    assert st.reason == "TimeLimit, signal 15"
    assert (st.elapsed_s, st.time_limit_s) == (84, 60)
    assert st.max_rss_mb == pytest.approx(8160 / 1024)


def test_sacct_pending_array_range_counts_tasks() -> None:
    st = aggregate(parse_sacct(sample("sacct_acct_later.txt")))
    assert st["184"].state == JobState.PENDING  # sacct alone: 2 done, "184_[2-3%2]" pending
    assert st["184"].array_states == {"COMPLETED": 2, "PENDING": 2}
    assert st["183"].state == JobState.RUNNING and st["183"].exit_code is None


def test_queue_lists_jobs_tasks_and_pending_ranges() -> None:
    import time

    jobs = {j.native_id: j for j in parse_queue(sample("squeue_queue.txt"))}
    assert set(jobs) == {"184_[1-3%2]", "186", "185", "183", "184_0"}
    pending = jobs["184_[1-3%2]"]
    assert (pending.state, pending.reason, pending.name) == (
        JobState.PENDING, "Resources", "cap-array")
    assert pending.node is None and pending.partition == "debug"
    running = jobs["183"]
    assert (running.state, running.node, running.elapsed_s, running.time_limit_s) == (
        JobState.RUNNING, "vm", 6, 600)
    assert running.submitted_at == time.mktime((2026, 11, 21, 23, 26, 46, 0, 0, -1))
    assert jobs["185"].reason == "JobHeldUser"


# -- aggregation rules -------------------------------------------------------------------------
def test_array_failure_severity_prefers_job_failures_over_cluster_faults() -> None:
    text = (
        "50_0|s|COMPLETED|0:0|00:00:01|vm|None|00:05:00|\n"
        "50_1|s|NODE_FAIL|0:0|00:00:02|vm|NodeFail|00:05:00|\n"
        "50_2|s|TIMEOUT|0:15|00:00:09|vm|TimeLimit|00:05:00|\n"
        "50_3|s|CANCELLED by 0|0:15|00:00:03|vm|None|00:05:00|\n"
    )
    st = aggregate(parse_sacct(text))["50"]
    assert st.state == JobState.TIMEOUT
    assert st.exit_code == 128 + 15
    assert st.elapsed_s == 9
    assert st.array_states == {"COMPLETED": 1, "NODE_FAIL": 1, "TIMEOUT": 1, "CANCELLED": 1}


def test_all_completed_array_is_completed() -> None:
    text = (
        "60_0|s|COMPLETED|0:0|00:00:01|vm|None|00:05:00|\n"
        "60_1|s|COMPLETED|0:0|00:00:04|vm|None|00:05:00|\n"
    )
    st = aggregate(parse_sacct(text))["60"]
    assert (st.state, st.exit_code, st.elapsed_s) == (JobState.COMPLETED, 0, 4)


# -- the scheduler with a fake runner ----------------------------------------------------------
class FakeRunner:
    """Answers squeue/sacct/scontrol from the captured samples; records argv."""

    def __init__(
        self, squeue: str, scontrol: str = "", config: str = "accounting_storage/none",
        sacct: str = "",
    ):
        self.outputs = {
            "squeue": squeue,
            "sacct": sacct,
            "scontrol show job": scontrol,
            "scontrol show config": f"AccountingStorageType   = {config}\n",
        }
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        assert isinstance(argv, list) and "shell" not in kw and kw.get("timeout")
        self.calls.append(argv)
        key = argv[0] if argv[0] in ("squeue", "sacct") else " ".join(argv[:3])
        return subprocess.CompletedProcess(argv, 0, self.outputs[key], "")


def _site(tmp_path: Path, **slurm: Any) -> SiteConfig:
    return SiteConfig(
        job_root=tmp_path / "jobs",
        data_root=tmp_path / "data",
        scheduler="slurm",
        store=StoreConfig(kind="local", path=tmp_path / "store"),
        slurm=SlurmConfig(**slurm),
    )


def test_status_merges_squeue_and_scontrol_in_two_calls(tmp_path: Path) -> None:
    runner = FakeRunner(
        sample("squeue_array_running.txt"), sample("scontrol_array_running.txt")
    )
    sched = SlurmScheduler(_site(tmp_path), runner=runner)
    st = sched.status(["193", "194", "999999"])
    assert set(st) == {"193", "194"}
    assert st["193"].state == JobState.RUNNING
    assert st["193"].array_states == {"COMPLETED": 2, "RUNNING": 2}
    assert st["194"].state == JobState.PENDING and st["194"].reason == "Resources"
    assert [c[0] for c in runner.calls].count("squeue") == 1
    assert runner.calls[0][:2] == ["squeue", "-h"] and SQUEUE_FORMAT in runner.calls[0]
    assert len(runner.calls) == 3  # squeue, config probe, scontrol show job
    sched.status(["193"])
    assert len(runner.calls) == 5  # the config probe is cached


def test_status_uses_sacct_when_accounting_on(tmp_path: Path) -> None:
    """squeue for live jobs and tasks, sacct (with its .batch steps: MaxRSS) for the rest."""
    runner = FakeRunner(
        sample("squeue_acct_later.txt"), config="accounting_storage/slurmdbd",
        sacct=sample("sacct_acct_later.txt"),
    )
    sched = SlurmScheduler(_site(tmp_path), runner=runner)
    st = sched.status(["181", "182", "183", "184", "999"])
    assert set(st) == {"181", "182", "183", "184"}
    assert st["181"].state == JobState.COMPLETED
    assert st["181"].max_rss_mb == pytest.approx(208.0, abs=0.1)
    assert st["182"].exit_code == 3 and st["182"].reason == "NonZeroExitCode"
    assert st["183"].state == JobState.RUNNING and st["183"].elapsed_s == 20  # squeue's
    arr = st["184"]  # live tasks from squeue, finished ones from sacct
    assert arr.state == JobState.RUNNING
    assert arr.array_states == {"COMPLETED": 2, "PENDING": 1, "RUNNING": 1}
    assert arr.max_rss_mb == pytest.approx(3228 / 1024)
    sacct = [c for c in runner.calls if c[0] == "sacct"]
    assert len(sacct) == 1 and "--jobs=181,182,184,999" in sacct[0]
    assert "--parsable2" in sacct[0] and "-X" not in sacct[0]  # steps carry MaxRSS
    assert [c[0] for c in runner.calls] == ["squeue", "scontrol", "sacct"]


def test_status_trusts_squeue_over_a_lagging_sacct(tmp_path: Path) -> None:
    """slurmdbd still lists array 184 as one pending range while squeue runs task 0."""
    runner = FakeRunner(
        sample("squeue_acct_live.txt"), config="accounting_storage/slurmdbd",
        sacct=sample("sacct_acct_live.txt"),
    )
    st = SlurmScheduler(_site(tmp_path), runner=runner).status(["184", "181"])
    assert st["184"].state == JobState.RUNNING
    assert st["184"].array_states == {"PENDING": 3, "RUNNING": 1}
    assert st["181"].state == JobState.COMPLETED


def test_status_asks_scontrol_when_sacct_lags_behind_squeue(tmp_path: Path) -> None:
    """Job 183 left squeue but sacct still says RUNNING: slurmctld (scontrol) has its end.
    Job 12 is absent from sacct: left out, as is 999 (the gateway reads exit markers)."""
    scontrol = sample("scontrol_final.txt").replace("JobId=12 ", "JobId=183 ", 1)
    runner = FakeRunner(
        "", scontrol, config="accounting_storage/slurmdbd", sacct=sample("sacct_acct_later.txt")
    )
    sched = SlurmScheduler(_site(tmp_path), runner=runner)
    st = sched.status(["181", "183", "999"])
    assert set(st) == {"181", "183"}
    assert st["183"].state == JobState.COMPLETED  # scontrol's, not sacct's RUNNING
    assert st["181"].max_rss_mb == pytest.approx(208.0, abs=0.1)
    assert [c[0] for c in runner.calls] == ["squeue", "scontrol", "sacct", "scontrol"]
    runner.calls.clear()
    sched.status(["181", "999"])  # nothing stale: no scontrol call
    assert [c[0] for c in runner.calls] == ["squeue", "sacct"]


def test_queue_is_one_squeue_call(tmp_path: Path) -> None:
    runner = FakeRunner(sample("squeue_queue.txt"))
    jobs = SlurmScheduler(_site(tmp_path), runner=runner).queue()
    assert [j.native_id for j in jobs] == ["184_[1-3%2]", "186", "185", "183", "184_0"]
    assert len(runner.calls) == 1
    argv = runner.calls[0]
    assert argv[:3] == ["squeue", "-h", "-u"] and argv[-2:] == ["-o", QUEUE_FORMAT]


def test_sbatch_argv(tmp_path: Path) -> None:
    site = _site(tmp_path, partition="cpu", account="lab42", gpu_partition="gpu")
    sched = SlurmScheduler(site)
    spec = JobSpec(
        job_dir=tmp_path / "j",
        script=tmp_path / "j" / "job.py",
        name="key.1",
        resources=Resources(cpus=4, mem_mb=8000, time_min=30, gpus=1, array="0-7%2"),
        log_path=tmp_path / "j" / "job.log",
        site=site,
    )
    argv = sched.sbatch_argv(spec)
    assert argv[:2] == ["sbatch", "--parsable"]
    for item in ("--job-name=key.1", "--cpus-per-task=4", "--mem=8000M", "--time=30",
                 "--gres=gpu:1", "--partition=gpu", "--account=lab42", "--array=0-7%2",
                 f"--chdir={tmp_path / 'j'}", f"--output={tmp_path / 'j' / 'job.log'}"):
        assert item in argv
    assert argv[-1] == str(spec.script)
    assert any(a.startswith("--export=HOME=") for a in argv)


def test_sbatch_refuses_over_site_limits(tmp_path: Path) -> None:
    sched = SlurmScheduler(_site(tmp_path, max_cpus=8))
    spec = JobSpec(tmp_path, tmp_path / "s", "n", Resources(cpus=16), tmp_path / "l", sched.site)
    with pytest.raises(SchedulerError, match="max_"):
        sched.sbatch_argv(spec)


def test_command_failure_carries_stderr(tmp_path: Path) -> None:
    def failing(argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(argv, 1, "", "squeue: error: slurm_load_jobs error")

    with pytest.raises(SchedulerError, match="slurm_load_jobs error"):
        SlurmScheduler(_site(tmp_path), runner=failing).status(["1"])


def test_timeout_becomes_scheduler_error(tmp_path: Path) -> None:
    def slow(argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    # a timeout is its own kind: the command may have acted (see the gateway's submit)
    with pytest.raises(SchedulerTimeout, match="slurmctld"):
        SlurmScheduler(_site(tmp_path), runner=slow).find_by_name("x")
