"""The in-job entry point: ``job.py`` (written by the gateway) calls :func:`main`.

It loads the validated request from the job directory, builds a
:class:`~hpc_jobs.steps.base.StepContext`, runs the step and writes ``outputs/summary.json``
(array tasks: ``outputs/summary.<task>.json``) and the exit marker. Everything it prints goes
to the job log, which Airflow shows in the task log.

When the step of a plain (non-array) job is over, whatever its ending, the job ends its own
store session and removes ``secrets.json`` (:meth:`~hpc_jobs.jobdir.JobDir.retire_secrets`).
An array task leaves that to the gateway, which does it once the whole array has ended (its
``status``), as for jobs killed before they could (cancel, time limit, node failure).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from hpc_jobs.config import SiteConfig
from hpc_jobs.fsutil import atomic_write
from hpc_jobs.image_lock import ImageLockedError
from hpc_jobs.jobdir import JobDir
from hpc_jobs.protocol import EXIT_RETRY_LATER, Resources
from hpc_jobs.registry import get_step
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.base import StoreError
from hpc_jobs.tunnel import JobRoute, route_job


def _array_task() -> tuple[int | None, int | None]:
    """Array task id and count (Slurm's variables, or the local scheduler's)."""
    for prefix in ("SLURM_ARRAY_TASK", "OMEFLOW_ARRAY_TASK"):
        task = os.environ.get(f"{prefix}_ID")
        if task is not None and task.isdigit():
            count = os.environ.get(f"{prefix}_COUNT", "")
            return int(task), (int(count) if count.isdigit() else None)
    return None, None


def _retire_session(job: JobDir, site: SiteConfig) -> None:
    """End the job's store session and remove its secrets (best-effort, logged)."""
    try:
        outcome = job.retire_secrets(site.store)
    except Exception as exc:  # noqa: BLE001 - the gateway retries when it sees the job ended
        print(f"omeflow: could not remove the job's secrets: {exc}", file=sys.stderr, flush=True)
        return
    if outcome not in (None, "none"):
        print(f"omeflow: the job's OMERO session: {outcome}", flush=True)


def main(job_dir: str | Path) -> int:
    """Run the step of ``job_dir``; returns the process exit status (0 = success)."""
    started = time.time()
    job = JobDir(Path(job_dir).parent, Path(job_dir).name)
    task_id, task_count = _array_task()
    code = 1
    site: SiteConfig | None = None
    route: JobRoute | None = None
    try:
        request = job.read_request()
        site = SiteConfig.load(request["site_config"])
        spec = get_step(request["step"])
        if spec is None:
            raise RuntimeError(f"step {request['step']!r} is not registered on this node")
        params = spec.params_model.model_validate(request["params"])
        # the store's host:port as this node reaches it (the reverse tunnel's, if the site uses it)
        site, route = route_job(site, task_id, spec.needs_store)
        ctx = StepContext(
            job_dir=job.path,
            site=site,
            resources=Resources.model_validate(request["resources"]),
            secrets=job.read_secrets(),
            array_task_id=task_id,
            array_task_count=task_count,
        )
        print(
            f"omeflow: step {spec.name} job {job.job_id} on {platform.node()} "
            f"(cpus={ctx.cpus}, task={task_id}, python {platform.python_version()})",
            flush=True,
        )
        summary = spec.entry(params, ctx) or {}
        name = "summary.json" if task_id is None else f"summary.{task_id}.json"
        atomic_write(ctx.outputs / name, json.dumps(summary, indent=2, default=str), mode=0o644)
        print(f"omeflow: step {spec.name} finished in {time.time() - started:.1f} s", flush=True)
        code = 0
    except (StoreError, ImageLockedError) as exc:  # the message names the fix: no traceback
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        if isinstance(exc, ImageLockedError) or getattr(exc, "retryable", False):
            code = EXIT_RETRY_LATER
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        print(f"omeflow: step exited with status {code}", file=sys.stderr, flush=True)
    except BaseException:  # noqa: BLE001 - reported in the log, turned into exit status 1
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        if task_id is None and site is not None:
            _retire_session(job, site)
        if route is not None:
            route.release()
    job.write_exit_marker(code, time.time() - started, task_id)
    return code
