"""The embedded default scheduler: runs the job script as a local subprocess.

Same job script, same job directory as with Slurm; a small supervisor process
(``python -m hpc_jobs.schedulers.local <job_dir> <seconds>``) starts it detached, enforces the
time limit (TIMEOUT), forwards cancellation (CANCELLED), runs array tasks with
``OMEFLOW_ARRAY_TASK_ID`` set, and keeps the state in ``<job_dir>/local_state.json``.
The supervisor, and so the job, gets the same minimal environment as Slurm's commands
(:func:`~hpc_jobs.schedulers.base.scheduler_env`), not the gateway's.
The native id is the job id (the directory name). The state also records the job's time limit
and, once it ended, the peak resident memory of its largest process (``ru_maxrss`` of the
supervisor's children); the node is this host.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hpc_jobs.config import SiteConfig
from hpc_jobs.fsutil import atomic_write
from hpc_jobs.protocol import JobState, array_indices
from hpc_jobs.schedulers.base import (
    JobSpec,
    NativeStatus,
    QueuedJob,
    SchedulerError,
    scheduler_env,
)

STATE_FILE = "local_state.json"


def _read_state(job_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((job_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LocalScheduler:
    """Runs jobs on this machine (the embedded default; no cluster needed)."""

    name = "local"

    def __init__(self, site: SiteConfig) -> None:
        self.site = site

    def submit(self, spec: JobSpec) -> str:
        res = spec.resources
        argv = [
            sys.executable,
            "-m",
            "hpc_jobs.schedulers.local",
            str(spec.job_dir),
            str(res.time_min * 60),
            res.array or "",
        ]
        limit_s = float(res.time_min * 60)
        atomic_write(
            spec.job_dir / STATE_FILE,
            json.dumps({"state": JobState.PENDING.value, "submitted": time.time(),
                        "time_limit_s": limit_s}),
            mode=0o644,
        )
        try:
            with open(spec.log_path, "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=spec.job_dir,
                    env=scheduler_env(self.site),
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise SchedulerError(f"cannot start local job: {exc}") from exc
        atomic_write(
            spec.job_dir / STATE_FILE,
            json.dumps(
                {"state": JobState.PENDING.value, "pid": proc.pid, "submitted": time.time(),
                 "time_limit_s": limit_s}
            ),
            mode=0o644,
        )
        return spec.name

    def _dir(self, native_id: str) -> Path:
        return self.site.job_root / native_id

    @staticmethod
    def _current(state: dict[str, Any]) -> tuple[JobState, float | None]:
        """(state, elapsed seconds) of a recorded state; a vanished supervisor is FAILED."""
        js = JobState(state["state"])
        if not js.terminal and "pid" in state and not _alive(state["pid"]):
            js, state["reason"] = JobState.FAILED, "the local job supervisor vanished"
        started, ended = state.get("started"), state.get("ended")
        return js, ((ended or time.time()) - started if started else None)

    def status(self, native_ids: Sequence[str]) -> dict[str, NativeStatus]:
        out: dict[str, NativeStatus] = {}
        host = platform.node()
        for native_id in native_ids:
            state = _read_state(self._dir(native_id))
            if state is None:
                continue
            js, elapsed = self._current(state)
            out[native_id] = NativeStatus(
                state=js,
                exit_code=state.get("exit_code"),
                reason=state.get("reason"),
                elapsed_s=elapsed,
                array_states=state.get("array_states"),
                node=host if "started" in state else None,
                time_limit_s=state.get("time_limit_s"),
                max_rss_mb=state.get("max_rss_mb"),
            )
        return out

    def queue(self) -> list[QueuedJob]:
        """The jobs under the job root that are pending or running (their recorded state)."""
        out: list[QueuedJob] = []
        host = platform.node()
        try:
            entries = list(os.scandir(self.site.job_root))
        except FileNotFoundError:
            return out
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            state = _read_state(Path(entry.path))
            if state is None or state.get("state") not in JobState.__members__:
                continue
            js, elapsed = self._current(state)
            if js.terminal:
                continue
            out.append(
                QueuedJob(
                    native_id=entry.name,
                    name=entry.name,
                    state=js,
                    reason=state.get("reason"),
                    node=host if js is JobState.RUNNING else None,
                    partition="local",
                    elapsed_s=elapsed,
                    time_limit_s=state.get("time_limit_s"),
                    submitted_at=state.get("submitted"),
                )
            )
        return sorted(out, key=lambda q: q.submitted_at or 0.0)

    def cancel(self, native_id: str) -> None:
        state = _read_state(self._dir(native_id))
        if state and "pid" in state and not JobState(state["state"]).terminal:
            with contextlib.suppress(ProcessLookupError):
                os.kill(state["pid"], signal.SIGTERM)
            deadline = time.time() + 10
            while time.time() < deadline:
                current = _read_state(self._dir(native_id)) or {}
                if JobState(current.get("state", "UNKNOWN")).terminal:
                    return
                time.sleep(0.05)

    def find_by_name(self, name: str) -> str | None:
        return name if _read_state(self._dir(name)) is not None else None


# ---------------------------------------------------------------------------------------------
# The supervisor process
# ---------------------------------------------------------------------------------------------
def _supervise(job_dir: Path, limit_s: float, array: str) -> int:
    state: dict[str, Any] = _read_state(job_dir) or {}
    state.update(state=JobState.RUNNING.value, pid=os.getpid(), started=time.time(),
                 time_limit_s=limit_s)
    atomic_write(job_dir / STATE_FILE, json.dumps(state), mode=0o644)
    tasks = list(array_indices(array)) if array else [None]
    procs: dict[int | None, subprocess.Popen[bytes]] = {}
    stop = {"why": None}

    def on_term(_sig: int, _frame: Any) -> None:
        stop["why"] = JobState.CANCELLED

    signal.signal(signal.SIGTERM, on_term)

    def run_task(task: int | None) -> int:
        env = dict(os.environ)
        if task is not None:
            env["OMEFLOW_ARRAY_TASK_ID"] = str(task)
            env["OMEFLOW_ARRAY_TASK_COUNT"] = str(len(tasks))
        if stop["why"] is not None:
            return -1
        proc = subprocess.Popen(
            [str(job_dir / "job.py")], cwd=job_dir, env=env, start_new_session=True
        )
        procs[task] = proc
        return proc.wait()

    deadline = time.time() + limit_s
    workers = max(1, min(len(tasks), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_task, t) for t in tasks]
        while not all(f.done() for f in futures):
            if stop["why"] is None and time.time() > deadline:
                stop["why"] = JobState.TIMEOUT
            if stop["why"] is not None:
                for proc in list(procs.values()):
                    if proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.05)
        codes = [f.result() for f in futures]
    counts: dict[str, int] = {}
    for code in codes:
        key = "COMPLETED" if code == 0 else "FAILED"
        counts[key] = counts.get(key, 0) + 1
    worst = next((c for c in codes if c != 0), 0)
    if stop["why"] is not None:
        final, reason = stop["why"], f"{stop['why'].value.lower()} by the local scheduler"
        if final is JobState.TIMEOUT:
            print(f"omeflow-local: job exceeded its time limit of {limit_s:.0f} s", flush=True)
    elif worst == 0:
        final, reason = JobState.COMPLETED, None
    else:
        final, reason = JobState.FAILED, "NonZeroExitCode"
    exit_code = worst if worst >= 0 else 128 - worst  # -N = killed by signal N
    state.update(
        state=final.value,
        ended=time.time(),
        exit_code=exit_code,
        reason=reason,
        array_states=counts if array else None,
        # the largest process the job ran (ru_maxrss is KiB on Linux)
        max_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    )
    atomic_write(job_dir / STATE_FILE, json.dumps(state), mode=0o644)
    return 0


if __name__ == "__main__":
    raise SystemExit(_supervise(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
