"""What every step gets: a :class:`StepContext`. Steps are modules with ``Params`` + ``run``.

A step module exposes exactly two public names:

- ``Params``: a pydantic model (``extra="forbid"``). The gateway validates a submit's params
  with it, and the Airflow side turns its JSON schema into the trigger form.
- ``run(params: Params, ctx: StepContext) -> dict``: does the work inside the job and returns
  a small JSON-able summary (written to ``outputs/summary.json`` and returned to Airflow).

Step modules import only pydantic at module level; heavy libraries (numpy, zarr, torch,
cellpose) are imported inside ``run`` so the gateway stays fast and light.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from hpc_jobs.config import SiteConfig
from hpc_jobs.image_lock import DEFAULT_WAIT_S, image_lock
from hpc_jobs.progress import ProgressReporter, progress_file_name
from hpc_jobs.protocol import Resources, Secrets

if TYPE_CHECKING:
    from hpc_jobs.stores.base import ImageStore


class StepParams(BaseModel):
    """Base class of every step's params: strict about unknown fields."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StepContext:
    """Everything a running step may use. Built by :mod:`hpc_jobs.run` inside the job."""

    job_dir: Path
    site: SiteConfig
    resources: Resources
    secrets: Secrets
    #: ``SLURM_ARRAY_TASK_ID`` (or the local scheduler's equivalent) for array jobs.
    array_task_id: int | None = None
    array_task_count: int | None = None
    #: How long :meth:`lock_image` waits for an image held by another job (seconds).
    lock_wait_s: float = DEFAULT_WAIT_S

    @property
    def job_key(self) -> str:
        """This job's key (dag, run, task, map index, try): the name of its job directory."""
        return self.job_dir.name

    @property
    def outputs(self) -> Path:
        path = self.job_dir / "outputs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def cpus(self) -> int:
        """CPUs this job may use: Slurm's allocation, else the requested count capped at the
        CPUs this process may run on (the local scheduler does not allocate)."""
        for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
            if os.environ.get(var, "").isdigit():
                return max(1, int(os.environ[var]))
        return max(1, min(self.resources.cpus, len(os.sched_getaffinity(0))))

    def image_dir(self, image_id: int) -> Path:
        """Data folder of one image on cluster storage (Zarr, tables, eCDFs)."""
        path = self.site.data_root / "images" / str(int(image_id))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lock_image(self, image_id: int, *, exclusive: bool, purpose: str
                   ) -> AbstractContextManager[None]:
        """The image's reader/writer lock (:mod:`hpc_jobs.image_lock`) held by this job:
        ``exclusive`` for steps that rewrite the image's data, shared for readers."""
        return image_lock(self.image_dir(image_id), job_key=self.job_key, exclusive=exclusive,
                          purpose=purpose, wait_s=self.lock_wait_s, image_id=image_id,
                          array_task=self.array_task_id)

    def open_store(self) -> ImageStore:
        """Open the site's image store, joined with this job's session key if it has one."""
        from hpc_jobs.stores import open_store

        return open_store(self.site.store, self.secrets)

    def progress(
        self, unit: str, total: int | None = None, message: str | None = None
    ) -> ProgressReporter:
        """A reporter of this job's (or array task's) progress, appended to
        ``progress.jsonl`` (``progress.<task>.jsonl``) in the job directory, which the
        gateway's ``status`` returns (:mod:`hpc_jobs.progress`)."""
        return ProgressReporter(
            self.job_dir / progress_file_name(self.array_task_id), unit, total, message
        )

    def log(self, message: str) -> None:
        """A line in the job log (which Airflow shows in the task log)."""
        print(message, file=sys.stdout, flush=True)
