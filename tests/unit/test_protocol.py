"""The contract: job states, job keys, request models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hpc_jobs.protocol import (
    JobState,
    ResourceOverrides,
    Resources,
    SubmitRequest,
    job_key_for,
)


@pytest.mark.parametrize(
    ("word", "state"),
    [
        ("PENDING", JobState.PENDING), ("PD", JobState.PENDING), ("R", JobState.RUNNING),
        ("COMPLETING", JobState.RUNNING), ("CD", JobState.COMPLETED),
        ("CANCELLED by 1000", JobState.CANCELLED), ("CANCELLED+", JobState.CANCELLED),
        ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY), ("OOM", JobState.OUT_OF_MEMORY),
        ("TIMEOUT", JobState.TIMEOUT), ("TO", JobState.TIMEOUT), ("NODE_FAIL", JobState.NODE_FAIL),
        ("PREEMPTED", JobState.PREEMPTED), ("BOOT_FAIL", JobState.BOOT_FAIL),
        ("DEADLINE", JobState.DEADLINE), ("REQUEUED", JobState.REQUEUED),
        ("SUSPENDED", JobState.SUSPENDED), ("failed", JobState.FAILED), ("", JobState.UNKNOWN),
        ("WHATEVER", JobState.UNKNOWN),
    ],
)
def test_state_words_map_to_states(word: str, state: JobState) -> None:
    assert JobState.parse(word) is state


def test_terminal_and_retryable_semantics() -> None:
    terminal = {s for s in JobState if s.terminal}
    assert terminal == {
        JobState.COMPLETED, JobState.FAILED, JobState.TIMEOUT, JobState.CANCELLED,
        JobState.OUT_OF_MEMORY, JobState.NODE_FAIL, JobState.PREEMPTED, JobState.BOOT_FAIL,
        JobState.DEADLINE,
    }
    assert {s for s in JobState if s.retryable} == {
        JobState.PREEMPTED, JobState.NODE_FAIL, JobState.BOOT_FAIL,
    }
    assert all(s.terminal for s in JobState if s.retryable)


def test_job_key_is_safe_and_distinct() -> None:
    a = job_key_for("dag", "manual__2026-11-21T13:15:35+00:00", "task", -1, 1)
    b = job_key_for("dag", "manual__2026-11-21T13:15:35+00:00", "task", -1, 2)
    c = job_key_for("dag", "manual__2026-11-21T13/15/35+00:00", "task", -1, 1)
    assert len({a, b, c}) == 3, "try number and run id must give distinct keys"
    for key in (a, b, c, job_key_for("../../etc", "; rm -rf /", "$(x)")):
        SubmitRequest(step="cluster_check", job_key=key)  # validates as a JobKey
        assert "/" not in key and ";" not in key and len(key) <= 160
    assert job_key_for("x") == job_key_for("x"), "keys are deterministic (idempotent submit)"


def test_resource_overrides_apply_only_given_fields() -> None:
    base = Resources(cpus=4, mem_mb=8000, time_min=60)
    merged = ResourceOverrides(time_min=5).apply(base)
    assert (merged.cpus, merged.mem_mb, merged.time_min) == (4, 8000, 5)


def test_requests_refuse_unknown_fields_and_coercion() -> None:
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"step": "cluster_check", "job_key": "k", "shell": "x"})
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"step": "cluster_check", "job_key": 5}, strict=True)
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"step": "cluster_check", "job_key": "a\nb"})


def test_pending_for_a_reason_that_never_clears_is_detected() -> None:
    from hpc_jobs.protocol import JobStatus, never_starts

    stuck = JobStatus(job_id="j", state=JobState.PENDING, reason="PartitionConfig")
    waiting = JobStatus(job_id="j", state=JobState.PENDING, reason="Resources")
    running = JobStatus(job_id="j", state=JobState.RUNNING, reason="PartitionConfig")
    assert never_starts(stuck)
    assert not never_starts(waiting) and not never_starts(running)


def test_site_limits_clamp_defaults_and_name_what_is_over() -> None:
    from pathlib import Path

    from hpc_jobs.config import SiteConfig
    from hpc_jobs.protocol import array_indices

    site = SiteConfig.local(Path("/nonexistent"))
    lim = site.slurm.model_copy(update={"max_cpus": 2, "max_array_tasks": 4})
    default = Resources(cpus=8, mem_mb=512, time_min=10)
    assert lim.clamp(default).cpus == 2 and lim.clamp(default).mem_mb == 512
    assert lim.over_limits(lim.clamp(default)) == []
    assert lim.over_limits(default) == ["cpus=8 > max_cpus=2"]
    assert lim.over_limits(Resources(array="0-4%2")) == ["array=0-4%2 > max_array_tasks=4"]
    assert list(array_indices("3")) == [3] and len(array_indices("0-15%4")) == 16


def test_job_directories_accept_only_one_safe_name(tmp_path) -> None:
    from hpc_jobs.jobdir import JobDir, JobDirError

    assert JobDir.of(tmp_path, "dag.run_1.task.-1.1.abc").path.parent == tmp_path
    for bad in ("..", "../x", "a/b", ".ssh", "-rf", "a..b", "a b", "", "a" * 161, 5):
        with pytest.raises(JobDirError):
            JobDir.of(tmp_path, bad)
    job = JobDir.of(tmp_path, "j1")
    (job.outputs).mkdir(parents=True)
    (job.outputs / "summary.json").write_text("{}")
    assert job.read_output("summary.json", 100) == b"{}"
    for bad in ("../job.json", "a/b", ".hidden", "x" * 129):
        with pytest.raises(JobDirError):
            job.read_output(bad, 100)


@pytest.mark.parametrize(("spec", "fix"), [("5-1", "write 1-5"), ("0-3%0", "at least 1")])
def test_array_spec_counting_down_or_running_nothing_is_refused(spec: str, fix: str) -> None:
    from pydantic import ValidationError

    from hpc_jobs.protocol import ResourceOverrides, SubmitRequest, array_indices

    with pytest.raises(ValueError, match=fix):
        array_indices(spec)
    with pytest.raises(ValidationError, match=fix):
        SubmitRequest.model_validate(
            {"step": "cluster_check", "job_key": "k", "resources": {"array": spec}}, strict=True
        )
    assert ResourceOverrides(array="1-5").array == "1-5"
