"""``cluster_check``: what a new site runs first. Reports what the compute node offers.

Hostname, CPUs (visible and allocated), memory, GPUs (torch / nvidia-smi), Python and the
versions of the packages the workflow needs, and whether the job root and data root are
writable. ``exit_code`` and ``sleep_s`` let an admin check that failures, time limits and
cancellation reach Airflow as they should.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

from pydantic import Field

from hpc_jobs.steps.base import StepContext, StepParams

PACKAGES = (
    "omeflow", "pydantic", "numpy", "zarr", "ome-zarr", "tifffile", "scikit-image", "shapely",
    "pandas", "pyarrow", "torch", "cellpose", "omero-py",
)


class Params(StepParams):
    """Parameters of ``cluster_check``."""

    sleep_s: int = Field(
        default=0, ge=0, le=86_400,
        description="sleep this long in the job, in seconds (checks cancellation, time limits)",
    )
    exit_code: int = Field(
        default=0, ge=0, le=255, description="exit with this status (checks failure reporting)"
    )


def _memory_mb() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def _gpus() -> list[dict[str, Any]]:
    gpus: list[dict[str, Any]] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            ).stdout
            for line in out.strip().splitlines():
                name, mem, driver = (p.strip() for p in line.split(","))
                gpus.append({"name": name, "memory": mem, "driver": driver})
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return gpus


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _writable(path: os.PathLike[str] | str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK)


def run(params: Params, ctx: StepContext) -> dict[str, Any]:
    """Collect the node report; then sleep / exit as asked."""
    report = {
        "hostname": platform.node(),
        "user": os.environ.get("USER") or os.environ.get("LOGNAME"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cpus_visible": len(os.sched_getaffinity(0)),
        "cpus_allocated": ctx.cpus,
        "memory_mb": _memory_mb(),
        "gpus": _gpus(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "packages": _versions(),
        "job_root_writable": _writable(ctx.site.job_root),
        "data_root_writable": _writable(ctx.site.data_root),
        "store": ctx.site.store.kind,
    }
    for key, value in report.items():
        ctx.log(f"{key}: {value}")
    if params.sleep_s:
        ctx.log(f"sleeping {params.sleep_s} s as asked")
        # one progress count per second slept: the cheap job that shows progress moving
        with ctx.progress("seconds", total=params.sleep_s, message="sleeping") as progress:
            progress.update(0, force=True)
            start = time.monotonic()
            while (slept := time.monotonic() - start) < params.sleep_s:
                time.sleep(min(1.0, params.sleep_s - slept))
                progress.update(min(params.sleep_s, int(time.monotonic() - start)))
            progress.update(params.sleep_s)
    if params.exit_code:
        ctx.log(f"exiting with status {params.exit_code} as asked")
        sys.exit(params.exit_code)
    return report
