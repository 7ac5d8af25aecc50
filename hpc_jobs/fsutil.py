"""Small file-system helpers shared by the cluster side: atomic writes and file locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``:
    readers see the old file or the new one, never half of it. The file gets ``mode``."""
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class LockTimeout(TimeoutError):
    """A :func:`file_lock` with a ``timeout`` could not be taken in time."""


#: First and longest pause between two tries of a lock that has a timeout (seconds).
LOCK_POLL_S = (0.02, 0.5)


@contextlib.contextmanager
def file_lock(
    path: Path, mode: int = 0o600, *, shared: bool = False, timeout: float | None = None
) -> Iterator[None]:
    """``fcntl.flock`` on ``path`` (created if missing), across processes.

    Exclusive by default; ``shared=True`` takes a shared (reader) lock that other shared
    holders may hold at the same time. ``timeout=None`` waits as long as it takes; otherwise
    the lock is tried until ``timeout`` seconds have passed, then :class:`LockTimeout` is
    raised. The kernel releases the lock when its holder exits, crashed or not.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, timeout, path)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _flock(fd: int, op: int, timeout: float | None, path: Path) -> None:
    if timeout is None:
        fcntl.flock(fd, op)
        return
    deadline = time.monotonic() + max(0.0, timeout)
    pause = LOCK_POLL_S[0]
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"{path} is locked (waited {timeout:g} s)") from None
            time.sleep(min(pause, left))
            pause = min(2 * pause, LOCK_POLL_S[1])


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-sized pieces."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
