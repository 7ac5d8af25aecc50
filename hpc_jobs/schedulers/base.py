"""The scheduler interface the gateway talks to. Implementations: ``slurm`` and ``local``.

Every call is argv-only (no shell). ``status`` answers for many jobs with one query (or a
fixed, small number of queries), never one call per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import JobState, Resources


class SchedulerError(Exception):
    """The scheduler refused or failed (message includes its stderr)."""


@dataclass(frozen=True)
class JobSpec:
    """One job to submit. ``script`` is an executable file (a Python script, no shell)."""

    job_dir: Path
    script: Path
    #: The job key; used as the scheduler's job name so a crashed caller can find the job.
    name: str
    resources: Resources
    log_path: Path
    site: SiteConfig


@dataclass
class NativeStatus:
    """What the scheduler says about one job (for an array: the aggregate over tasks)."""

    state: JobState
    exit_code: int | None = None
    reason: str | None = None
    elapsed_s: float | None = None
    array_states: dict[str, int] | None = None


class Scheduler(Protocol):
    """A batch scheduler."""

    name: str

    def submit(self, spec: JobSpec) -> str:
        """Submit and return the native job id."""

    def status(self, native_ids: Sequence[str]) -> dict[str, NativeStatus]:
        """Status of many jobs in one query. Ids the scheduler no longer knows are absent."""

    def cancel(self, native_id: str) -> None:
        """Cancel (a no-op for finished jobs)."""

    def find_by_name(self, name: str) -> str | None:
        """Native id of a live job with this name (recovers a submit whose reply was lost)."""


def get_scheduler(site: SiteConfig) -> Scheduler:
    """The scheduler the site configured."""
    if site.scheduler == "slurm":
        from hpc_jobs.schedulers.slurm import SlurmScheduler

        return SlurmScheduler(site)
    from hpc_jobs.schedulers.local import LocalScheduler

    return LocalScheduler(site)
