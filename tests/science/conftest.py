"""Shared fixtures of the segmentation science tests: the bootstrap model and a context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_jobs import ngff
from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import Resources, Secrets
from hpc_jobs.segmentation.synthetic import write_as_export
from hpc_jobs.steps.base import StepContext


@pytest.fixture(scope="session")
def cellpose_model() -> Path:
    """The bootstrapped model (trained once: ~12-15 min on 2 busy cores; cached afterwards)."""
    from hpc_jobs.segmentation.bootstrap import ensure_model

    return ensure_model()


def make_context(root: Path, cpus: int = 1, task: tuple[int, int] | None = None
                 ) -> StepContext:
    """A StepContext on a local site under ``root`` (same data root for all tasks)."""
    site = SiteConfig.local(root)
    return StepContext(job_dir=root / "jobs" / "j", site=site,
                       resources=Resources(cpus=cpus), secrets=Secrets(),
                       array_task_id=task[0] if task else None,
                       array_task_count=task[1] if task else None)


def write_image(ctx: StepContext, image_id: int, image: np.ndarray,
                chunks: int = 128, shards: int = 256) -> Path:
    """Write (c, y, x) uint16 in the export step's layout (OME-NGFF, ``image.zarr/0``)."""
    path = ngff.image_zarr_path(ctx.image_dir(image_id))
    write_as_export(path, image, chunk=chunks, block=shards, image_id=image_id)
    return path
