"""A reader/writer lock per image, held across DAG runs, jobs and array tasks.

Outputs live per image (``<data_root>/images/<id>/``), not per run, so two runs on one image
share files. Steps that rewrite an image's shared data (``export_zarr``; the segmentation
merge that paints the labels and writes the nuclei table) hold the image's lock *exclusive*;
steps that only read those data (the segmentation tiles, ``ecdf``) hold it *shared*. A step
that cannot get the lock within its wait (:data:`DEFAULT_WAIT_S`, the ``lock_wait_s`` of its
:class:`~hpc_jobs.steps.base.StepContext`) fails with :class:`ImageLockedError`, whose message
names the job key(s) (DAG, run, task, map index, try) that hold the image.

Files, in the image's folder::

    .omeflow-lock            flock'd LOCK_SH by readers, LOCK_EX by writers
    .omeflow-lock.holders/   one JSON record per holder (job key, mode, purpose, host, pid)

The lock is ``fcntl.flock``: the kernel drops it when its holder exits, also on a crash or
``SIGKILL``. Each holder record is itself flock'd by its holder and made visible (renamed into
place) only once locked and complete, so a record that can be locked by someone else belongs
to a dead holder: it is ignored and removed. On a cluster the data root must be on a file
system with working ``flock`` across nodes (NFSv4, GPFS; Lustre mounted with ``flock``).

A waiting writer does not stop new readers (``flock`` has no queue): on a busy image it may
run out of its wait and fail, naming the readers. A process holds at most one lock of an image
at a time (``segment_nuclei`` releases the tiles' shared lock before the merge takes it
exclusive): nested, an exclusive lock would wait for its own process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpc_jobs.fsutil import LockTimeout, file_lock

#: How long a step waits for an image another job holds before it fails (seconds). A constant
#: on purpose: a job waiting for an image holds its Slurm allocation, so the wait stays short;
#: Airflow's retries (a new try, hence a new job key) are the longer wait.
DEFAULT_WAIT_S = 300.0
LOCK_NAME = ".omeflow-lock"
HOLDERS_NAME = ".omeflow-lock.holders"


class ImageLockedError(TimeoutError):
    """The image is held by other job(s) for longer than this step may wait."""

    def __init__(self, message: str, holders: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.holders = holders


def lock_path(image_dir: Path) -> Path:
    """The file that is flock'd for ``image_dir``."""
    return image_dir / LOCK_NAME


def holders(image_dir: Path) -> list[dict[str, Any]]:
    """Records of the live holders of the image's lock (dead holders' records are removed)."""
    folder = image_dir / HOLDERS_NAME
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    live = []
    for name in names:
        if name.startswith("."):  # a record still being written (not locked + complete yet)
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its holder still has it: alive
                with os.fdopen(os.dup(fd), "rb") as fh:
                    raw = fh.read(64 * 1024)
                try:
                    live.append(json.loads(raw))
                except ValueError:
                    live.append({"job_key": "?", "record": name})
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # nobody holds it: its holder died without cleaning up
        finally:
            os.close(fd)
    return live


def describe(records: list[dict[str, Any]]) -> str:
    """One line per holder: job key, mode, purpose, array task, host, pid, since when."""
    parts = []
    for r in records:
        task = "" if r.get("array_task") is None else f" array task {r['array_task']}"
        since = r.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "?"
        parts.append(
            f"job {r.get('job_key', '?')} ({r.get('mode', '?')}, {r.get('purpose', '?')}"
            f"{task}, host {r.get('host', '?')} pid {r.get('pid', '?')}, since {when})"
        )
    return "; ".join(parts)


@contextlib.contextmanager
def _record(image_dir: Path, record: dict[str, Any]) -> Iterator[None]:
    """Publish ``record`` as a holder while the block runs (locked, then renamed into place)."""
    folder = image_dir / HOLDERS_NAME
    folder.mkdir(mode=0o770, exist_ok=True)
    name = f"{uuid.uuid4().hex}.json"
    tmp = folder / f".{name}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(record).encode())
        os.rename(tmp, folder / name)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)


@contextlib.contextmanager
def image_lock(
    image_dir: Path,
    *,
    job_key: str,
    exclusive: bool,
    purpose: str,
    wait_s: float = DEFAULT_WAIT_S,
    image_id: int | str | None = None,
    array_task: int | None = None,
) -> Iterator[None]:
    """Hold the lock of the image whose data live in ``image_dir`` while the block runs.

    :param image_dir: the image's data folder (``<data_root>/images/<id>``).
    :param job_key: the holder's job key, shown to whoever waits in vain.
    :param exclusive: True for steps that rewrite the image's data, False for readers.
    :param purpose: what the holder does (e.g. ``"export_zarr"``), shown to waiters.
    :param wait_s: how long to wait for other holders before :class:`ImageLockedError`.
    :param image_id: the image's id, for the error message (default: the folder's name).
    :param array_task: the holder's array task id, if any.
    """
    mode = "exclusive" if exclusive else "shared"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                file_lock(lock_path(image_dir), 0o660, shared=not exclusive, timeout=wait_s)
            )
        except LockTimeout:
            held = holders(image_dir)
            image = image_id if image_id is not None else image_dir.name
            who = describe(held) or "a job that left no record"
            raise ImageLockedError(
                f"image {image} is in use by {who}; this job ({job_key}) needs it {mode} for "
                f"{purpose} and waited {wait_s:g} s. Wait until that run has finished (or stop "
                "it), then run this task again",
                held,
            ) from None
        holders(image_dir)  # drop the records of crashed holders
        record = {
            "job_key": job_key, "mode": mode, "purpose": purpose, "array_task": array_task,
            "host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 3),
        }
        stack.enter_context(_record(image_dir, record))
        yield
