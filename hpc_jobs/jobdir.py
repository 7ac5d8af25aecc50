"""One job's directory under the site's job root, and every file the gateway keeps in it.

::

    <job_root>/<job_id>/
        request.json   0600  step, validated params, resources, site config path
        secrets.json   0600  OMERO session key (only if one was sent); removed, and the
                             session ended, when the job ends (:meth:`JobDir.retire_secrets`)
        job.py         0700  the job script: a Python file with an absolute shebang (no shell)
        job.json       0600  native (scheduler) id, caller, request fingerprint, submit time
        job.log              stdout + stderr of the job (Slurm --output)
        exit.json            written by the job itself when it ends (exit code, elapsed);
                             array tasks write exit.<task>.json
        progress.jsonl       the step's progress, one JSON line per change, appended by the
                             job (array tasks: progress.<task>.jsonl); :mod:`hpc_jobs.progress`
        cancelled_by.json    who cancelled the job (``cancel`` with ``by``), written atomically
        outputs/             step outputs; outputs/summary.json is returned by ``result``
                             (array tasks: outputs/summary.<task>.json)

Files are read through a descriptor of the job directory (and of ``outputs/``) opened with
``O_DIRECTORY | O_NOFOLLOW``, each file relative to it without following links: a job
directory or ``outputs/`` that is a symbolic link is refused, not followed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets as _random
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from hpc_jobs.fsutil import atomic_write, file_lock
from hpc_jobs.progress import progress_file_name, read_latest, task_of_file_name
from hpc_jobs.protocol import DEFAULT_CALLER, SAFE_NAME_RE, CancelledBy, Progress, Secrets

if TYPE_CHECKING:
    from hpc_jobs.config import StoreConfig

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CANCELLED_BY: TypeAdapter[str] = TypeAdapter(CancelledBy)
#: Most array tasks whose progress files one ``status`` reads per job.
MAX_PROGRESS_TASKS = 10_000


def _safe_name(name: object, max_length: int) -> bool:
    """One safe path component (the protocol's rule): no separator, no leading dot or dash."""
    return (
        isinstance(name, str)
        and len(name) <= max_length
        and SAFE_NAME_RE.fullmatch(name) is not None
        and ".." not in name
    )


class JobDirError(Exception):
    """A job id or output name that does not name a file under the job root."""


class JobDir:
    """The directory of one job. Construct with :meth:`of`, which confines it to the root."""

    def __init__(self, root: Path, job_id: str) -> None:
        self.root = root
        self.job_id = job_id
        self.path = root / job_id

    @classmethod
    def of(cls, job_root: Path, job_id: str) -> JobDir:
        """The job directory for ``job_id``; refuses anything that is not one safe name."""
        if not _safe_name(job_id, 160):
            raise JobDirError("job id must be 1-160 characters of A-Z a-z 0-9 _ . = -")
        job = cls(Path(job_root), job_id)
        if job.path.parent != Path(job_root):
            raise JobDirError("job id escapes the job root")
        return job

    # -- paths ----------------------------------------------------------------------------
    @property
    def request_path(self) -> Path:
        return self.path / "request.json"

    @property
    def secrets_path(self) -> Path:
        return self.path / "secrets.json"

    @property
    def script_path(self) -> Path:
        return self.path / "job.py"

    @property
    def record_path(self) -> Path:
        return self.path / "job.json"

    @property
    def log_path(self) -> Path:
        return self.path / "job.log"

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"

    def exit_marker_path(self, task: int | None = None) -> Path:
        return self.path / ("exit.json" if task is None else f"exit.{task}.json")

    # -- creation -------------------------------------------------------------------------
    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise submits of one job key (two callers racing get one job)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True, mode=0o700)
        return file_lock(locks / f"{self.job_id}.lock")

    def create(self, record: dict[str, Any], secrets: Secrets, python: Path) -> None:
        """Write request, secrets and the job script (a fresh directory)."""
        if self.path.exists():
            shutil.rmtree(self.path)  # debris of a submit that never reached the scheduler
        self.path.mkdir(parents=True, mode=0o700)
        self.outputs.mkdir(mode=0o700)
        atomic_write(self.request_path, json.dumps(record, indent=2, sort_keys=True))
        present = secrets.model_dump(exclude_none=True)
        if present:
            atomic_write(self.secrets_path, json.dumps(present))
        script = (
            f"#!{python} -I\n"
            f'"""omeflow job {self.job_id}: written by the gateway; runs one step, no shell."""\n'
            "import sys\n\n"
            "from hpc_jobs.run import main\n\n"
            "# guarded: worker processes a step spawns re-import this file as their __main__\n"
            'if __name__ == "__main__":\n'
            f"    sys.exit(main({str(self.path)!r}))\n"
        )
        atomic_write(self.script_path, script, mode=0o700)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @staticmethod
    def fingerprint(record: dict[str, Any]) -> str:
        """Identity of a request: the same key with a different request is a conflict."""
        core = {k: record[k] for k in ("step", "params", "resources")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    def write_job_record(
        self, record: dict[str, Any], native_id: str, scheduler: str
    ) -> dict[str, Any]:
        data = {
            "job_id": self.job_id,
            "step": record["step"],
            "caller": record["caller"],
            "native_id": native_id,
            "scheduler": scheduler,
            "submitted_at": time.time(),
            "fingerprint": self.fingerprint(record),
        }
        atomic_write(self.record_path, json.dumps(data, indent=2, sort_keys=True))
        return data

    @staticmethod
    def owner(record: dict[str, Any]) -> str:
        """The caller a job (or request) record belongs to; records written before callers
        existed belong to :data:`~hpc_jobs.protocol.DEFAULT_CALLER`."""
        return str(record.get("caller") or DEFAULT_CALLER)

    # -- reading (through directory descriptors, no link followed) ------------------------
    @contextlib.contextmanager
    def _dir_fd(self, outputs: bool = False) -> Iterator[int]:
        """A descriptor of the job directory (or its ``outputs/``), refusing links.

        ``FileNotFoundError`` when it does not exist, :class:`JobDirError` when it is a
        symbolic link or not a directory.
        """
        fd = self._open_dir(self.path, None)
        try:
            if outputs:
                sub = self._open_dir(Path("outputs"), fd)
                os.close(fd)
                fd = sub
            yield fd
        finally:
            os.close(fd)

    def _open_dir(self, path: Path, dir_fd: int | None) -> int:
        try:
            return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                where = self.path if dir_fd is None else self.path / path
                raise JobDirError(
                    f"{where} is a symbolic link or not a directory; refused. The HPC admin "
                    "must replace it with a real directory (or remove the job)"
                ) from None
            raise

    def _open_file(self, name: str, outputs: bool = False) -> int:
        """A read descriptor of one file of the job, opened relative to the directory's."""
        with self._dir_fd(outputs) as dfd:
            try:
                return os.open(name, _FILE_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise JobDirError(f"{name} is a symbolic link; refused") from None
                raise

    def _read(self, name: str, outputs: bool = False) -> bytes:
        """Bytes of one file of the job (``FileNotFoundError`` if it or the dir is missing)."""
        fd = self._open_file(name, outputs)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise FileNotFoundError(name)
            return fh.read()

    def _read_json(self, name: str, outputs: bool = False) -> Any:
        return json.loads(self._read(name, outputs))

    def read_job_record(self) -> dict[str, Any] | None:
        try:
            return self._read_json("job.json")
        except FileNotFoundError:
            return None

    def read_request(self) -> dict[str, Any]:
        return self._read_json("request.json")

    def array_spec(self) -> str | None:
        """The array spec the job was submitted with (None for a plain job)."""
        try:
            return self.read_request().get("resources", {}).get("array")
        except FileNotFoundError:
            return None

    def read_secrets(self) -> Secrets:
        try:
            return Secrets.model_validate_json(self._read("secrets.json"))
        except FileNotFoundError:
            return Secrets()

    def take_secrets(self) -> Secrets | None:
        """Remove ``secrets.json`` from the job directory and return what it held; None when
        it is gone already (or never existed).

        A rename claims the file first, so of several processes ending one job (the job
        itself, a ``status``, a ``cancel``) exactly one gets the secrets.
        """
        claim = f".secrets.{os.getpid()}.{_random.token_hex(4)}"
        try:
            with self._dir_fd() as dfd:
                try:
                    os.rename("secrets.json", claim, src_dir_fd=dfd, dst_dir_fd=dfd)
                except FileNotFoundError:
                    return None
                try:
                    fd = os.open(claim, _FILE_FLAGS, dir_fd=dfd)
                    with os.fdopen(fd, "rb") as fh:
                        raw = fh.read() if stat.S_ISREG(os.fstat(fh.fileno()).st_mode) else b""
                finally:
                    os.unlink(claim, dir_fd=dfd)
        except FileNotFoundError:  # the job directory is gone
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a linked secrets file is no secrets file
                return Secrets()
            raise
        try:
            return Secrets.model_validate_json(raw)
        except ValueError:
            return Secrets()

    def retire_secrets(self, store: StoreConfig) -> str | None:
        """The job is over: take its secrets out of the directory and end the store session
        they open (:func:`hpc_jobs.stores.end_session`, best-effort, at most once per job).

        Returns None when there was nothing left to retire, else what happened to the session
        (``"none"``, ``"ended"``, ``"already ended"``, ``"failed (...)"``): never the key.
        """
        secrets = self.take_secrets()
        if secrets is None:
            return None
        from hpc_jobs.stores import end_session

        return end_session(store, secrets)

    def read_exit_marker(self, task: int | None = None) -> dict[str, Any] | None:
        """The exit marker of the job (or of one array task); None while it is missing."""
        try:
            return self._read_json(self.exit_marker_path(task).name)
        except (FileNotFoundError, ValueError, JobDirError):  # a linked marker is no marker
            return None

    def write_exit_marker(self, exit_code: int, elapsed_s: float, task: int | None = None) -> None:
        data = {"exit_code": exit_code, "elapsed_s": round(elapsed_s, 3), "time": time.time()}
        atomic_write(self.exit_marker_path(task), json.dumps(data), mode=0o644)

    def read_progress(self) -> tuple[Progress | None, dict[str, Progress] | None]:
        """(latest progress of a plain job, latest progress per array task) from the job's
        progress files, each read from its end (:func:`hpc_jobs.progress.read_latest`).
        (None, None) when there is none; never raises for a missing, linked or corrupt file."""
        try:
            with self._dir_fd() as dfd:
                names = os.listdir(dfd)
                plain = read_latest(dfd, progress_file_name()) if "progress.jsonl" in names \
                    else None
                tasks: dict[str, Progress] = {}
                for name in names:
                    task = task_of_file_name(name)
                    if task is None or len(tasks) >= MAX_PROGRESS_TASKS:
                        continue
                    latest = read_latest(dfd, name)
                    if latest is not None:
                        tasks[str(task)] = latest
        except (OSError, JobDirError):
            return None, None
        return plain, (dict(sorted(tasks.items(), key=lambda kv: int(kv[0]))) or None)

    @property
    def cancelled_by_path(self) -> Path:
        return self.path / "cancelled_by.json"

    def write_cancelled_by(self, by: str) -> None:
        """Record who cancelled the job (atomically; the last cancel wins)."""
        atomic_write(self.cancelled_by_path, json.dumps({"by": by, "time": time.time()}))

    def read_cancelled_by(self) -> str | None:
        """Who cancelled the job, if a person did (validated again: files are not trusted)."""
        try:
            by = self._read_json(self.cancelled_by_path.name).get("by")
            return _CANCELLED_BY.validate_python(by)
        except (OSError, ValueError, AttributeError, JobDirError, ValidationError):
            return None

    def read_log(self, offset: int, max_bytes: int) -> tuple[int, int, bytes]:
        """(file size, start offset, bytes) of the job log; negative offset = last bytes."""
        try:
            fd = self._open_file("job.log")
        except FileNotFoundError:
            return 0, 0, b""
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            start = max(0, size + offset) if offset < 0 else min(offset, size)
            fh.seek(start)
            return size, start, fh.read(max_bytes)

    def read_output(self, name: str, max_bytes: int) -> bytes:
        """Bytes of ``outputs/<name>``: one plain file, links not followed (neither the job
        directory, nor ``outputs/``, nor the file), size-capped."""
        if not _safe_name(name, 128):
            raise JobDirError("output name must be one file name of A-Z a-z 0-9 _ . = -")
        fd = self._open_file(name, outputs=True)
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise FileNotFoundError(name)
            if info.st_size > max_bytes:
                raise JobDirError(
                    f"output {name} is {info.st_size} bytes, more than the {max_bytes} the "
                    "gateway returns; large outputs stay on the cluster (read them in a step)"
                )
            return fh.read(max_bytes)
