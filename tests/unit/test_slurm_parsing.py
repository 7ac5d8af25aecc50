"""Slurm output parsing on real samples captured from the sandbox (Slurm 22.05, tests/data/slurm).

Sample files:
  squeue_mixed_pending_running.txt / scontrol_mixed_pending_running.txt  (same moment):
      1, 8 completed; 2, 9 failed (exit 1); 3-7 cancelled while pending; 10, 11 running;
      12 pending (Resources); 13 held; 14 an array 0-3%2, all tasks pending.
  squeue_array_partial.txt / scontrol_array_partial.txt  (same moment, later):
      10 timed out (--time=1); 11 cancelled while running; 14_0, 14_1 completed, 14_2 failed,
      14_3 running; 17 pending.
  scontrol_final.txt: everything finished (14: 3 completed, 1 failed).
  sacct_crafted.txt: accounting is off in the sandbox, so this one is written by hand from
      Slurm's documented ``sacct --parsable2 --noheader -X`` format (lines starting with # are
      comments and are dropped before parsing).
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
    SQUEUE_FORMAT,
    SlurmScheduler,
    aggregate,
    count_tasks,
    parse_duration,
    parse_exit_code,
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
     ("INVALID", None), ("N/A", None)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


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
    st = aggregate(parse_squeue(sample("squeue_mixed_pending_running.txt")))
    assert set(st) == {"10", "11", "12", "13", "14"}
    assert st["10"].state == JobState.RUNNING and st["10"].elapsed_s == 3
    assert st["10"].exit_code is None
    assert "nodes=vm" in st["10"].reason
    assert st["12"].state == JobState.PENDING and st["12"].reason == "Resources"
    assert st["13"].reason == "JobHeldUser"
    assert st["14"].state == JobState.PENDING
    assert st["14"].array_states == {"PENDING": 4}


def test_squeue_refuses_other_format() -> None:
    with pytest.raises(SchedulerError, match="format"):
        parse_squeue("12 RUNNING vm")


# -- scontrol ----------------------------------------------------------------------------------
def test_scontrol_terminal_states_and_exit_codes() -> None:
    st = aggregate(parse_scontrol(sample("scontrol_array_partial.txt")))
    assert st["1"].state == JobState.COMPLETED and st["1"].exit_code == 0
    assert st["2"].state == JobState.FAILED and st["2"].exit_code == 1
    assert "NonZeroExitCode" in st["2"].reason and "nodes=vm" in st["2"].reason
    assert st["10"].state == JobState.TIMEOUT and st["10"].exit_code == 143
    assert st["10"].elapsed_s == 79
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


# -- sacct (crafted) ---------------------------------------------------------------------------
def test_sacct_crafted_sample() -> None:
    st = aggregate(parse_sacct(sample("sacct_crafted.txt")))
    assert st["123"].state == JobState.COMPLETED and st["123"].exit_code == 0
    assert st["124"].state == JobState.FAILED and st["124"].exit_code == 1
    assert st["125"].state == JobState.TIMEOUT
    assert st["126"].state == JobState.CANCELLED  # "CANCELLED by 1001"
    assert st["127"].state == JobState.PENDING  # tasks 3-5 still pending
    assert st["127"].array_states == {"COMPLETED": 2, "FAILED": 1, "PENDING": 3}
    assert st["128"].state == JobState.OUT_OF_MEMORY
    assert st["129"].state == JobState.RUNNING and st["129"].elapsed_s == 130
    assert "130" not in st  # the .batch step line is not a job


# -- aggregation rules -------------------------------------------------------------------------
def test_array_failure_severity_prefers_job_failures_over_cluster_faults() -> None:
    text = (
        "50_0|s|COMPLETED|0:0|00:00:01|vm|None\n"
        "50_1|s|NODE_FAIL|0:0|00:00:02|vm|NodeFail\n"
        "50_2|s|TIMEOUT|0:15|00:00:09|vm|TimeLimit\n"
        "50_3|s|CANCELLED by 0|0:15|00:00:03|vm|None\n"
    )
    st = aggregate(parse_sacct(text))["50"]
    assert st.state == JobState.TIMEOUT
    assert st.exit_code == 128 + 15
    assert st.elapsed_s == 9
    assert st.array_states == {"COMPLETED": 1, "NODE_FAIL": 1, "TIMEOUT": 1, "CANCELLED": 1}


def test_all_completed_array_is_completed() -> None:
    text = "60_0|s|COMPLETED|0:0|00:00:01|vm|None\n60_1|s|COMPLETED|0:0|00:00:04|vm|None\n"
    st = aggregate(parse_sacct(text))["60"]
    assert (st.state, st.exit_code, st.elapsed_s) == (JobState.COMPLETED, 0, 4)


# -- the scheduler with a fake runner ----------------------------------------------------------
class FakeRunner:
    """Answers squeue/scontrol from the captured samples; records argv."""

    def __init__(self, squeue: str, scontrol: str, config: str = "accounting_storage/none"):
        self.outputs = {
            "squeue": squeue,
            "scontrol show job": scontrol,
            "scontrol show config": f"AccountingStorageType   = {config}\n",
        }
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        assert isinstance(argv, list) and "shell" not in kw and kw.get("timeout")
        self.calls.append(argv)
        key = "squeue" if argv[0] == "squeue" else " ".join(argv[:3])
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
    runner = FakeRunner(sample("squeue_array_partial.txt"), sample("scontrol_array_partial.txt"))
    sched = SlurmScheduler(_site(tmp_path), runner=runner)
    st = sched.status(["2", "10", "12", "14", "999999"])
    assert set(st) == {"2", "10", "12", "14"}
    assert st["14"].state == JobState.RUNNING
    assert st["14"].array_states == {"COMPLETED": 2, "FAILED": 1, "RUNNING": 1}
    assert st["10"].state == JobState.TIMEOUT
    assert [c[0] for c in runner.calls].count("squeue") == 1
    assert runner.calls[0][:2] == ["squeue", "-h"] and SQUEUE_FORMAT in runner.calls[0]
    assert len(runner.calls) == 3  # squeue, config probe, scontrol show job
    sched.status(["2"])
    assert len(runner.calls) == 5  # the config probe is cached


def test_status_uses_sacct_when_accounting_on(tmp_path: Path) -> None:
    runner = FakeRunner("", "", config="accounting_storage/slurmdbd")
    runner.outputs["sacct"] = sample("sacct_crafted.txt")
    real_call = runner.__call__

    def call(argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        if argv[0] == "sacct":
            runner.calls.append(argv)
            return subprocess.CompletedProcess(argv, 0, runner.outputs["sacct"], "")
        return real_call(argv, **kw)

    sched = SlurmScheduler(_site(tmp_path), runner=call)
    st = sched.status(["124", "127"])
    assert st["124"].exit_code == 1 and st["127"].state == JobState.PENDING
    sacct = [c for c in runner.calls if c[0] == "sacct"]
    assert len(sacct) == 1 and "--jobs=124,127" in sacct[0] and "--parsable2" in sacct[0]


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
