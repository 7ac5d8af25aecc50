"""The scheduler interface the gateway talks to. Implementations: ``slurm`` and ``local``.

Every call is argv-only (no shell). ``status`` answers for many jobs with one query (or a
fixed, small number of queries), never one call per job.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import JobState, Resources


class SchedulerError(Exception):
    """The scheduler refused or failed (message includes its stderr)."""


class SchedulerTimeout(SchedulerError):
    """A scheduler command did not answer in time: it may still have acted (an ``sbatch``
    whose job slurmctld accepted), so the caller must look before it retries or discards."""


#: PATH for scheduler commands when the gateway itself has none.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def scheduler_env(site: SiteConfig) -> dict[str, str]:
    """The whole environment of a scheduler command (sbatch, squeue, sacct, scontrol, scancel)
    or of the local scheduler's supervisor: PATH, LANG, HOME and, if the site sets
    ``[slurm] conf``, SLURM_CONF. Nothing else from the gateway's environment: ``SBATCH_*``,
    ``SLURM_*`` or ``SQUEUE_*`` variables there would silently change submissions and output
    formats."""
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "LANG": "C.UTF-8",
        "HOME": pwd.getpwuid(os.getuid()).pw_dir,
    }
    if site.slurm.conf is not None:
        env["SLURM_CONF"] = str(site.slurm.conf)
    return env


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
    #: Node list (Slurm's NodeList; the host name for the local scheduler).
    node: str | None = None
    #: Granted time limit in seconds.
    time_limit_s: float | None = None
    #: Peak resident memory in MiB (accounting's MaxRSS; arrays: the largest task).
    max_rss_mb: float | None = None


@dataclass
class QueuedJob:
    """One pending or running job of the service account, as the scheduler lists it."""

    native_id: str
    name: str
    state: JobState
    reason: str | None = None
    node: str | None = None
    partition: str | None = None
    elapsed_s: float | None = None
    time_limit_s: float | None = None
    submitted_at: float | None = None


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

    def queue(self) -> list[QueuedJob]:
        """The service account's pending and running jobs (one query)."""


def get_scheduler(site: SiteConfig) -> Scheduler:
    """The scheduler the site configured."""
    if site.scheduler == "slurm":
        from hpc_jobs.schedulers.slurm import SlurmScheduler

        return SlurmScheduler(site)
    from hpc_jobs.schedulers.local import LocalScheduler

    return LocalScheduler(site)
