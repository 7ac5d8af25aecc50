"""Live progress of a running step: JSON lines appended to the job directory, read back by the
gateway's ``status`` from the end of the file.

File format: one :class:`~hpc_jobs.protocol.Progress` object per line, UTF-8, ``\\n``-ended,
appended (``O_APPEND``) to ``<job dir>/progress.jsonl``, or ``progress.<task>.jsonl`` for array
task ``<task>``::

    {"done": 12, "total": 40, "unit": "tiles", "message": "segmenting", "time": 1763766000.1}

Steps use a :class:`ProgressReporter` (``ctx.progress("tiles", total=40)``): it writes at most
one line per ``min_interval_s`` (a tight loop does not write megabytes), always writes the
final line (:meth:`ProgressReporter.finish`, or leaving its ``with`` block), and is a no-op
outside a job (no path: library code and tests call it freely).

:func:`read_latest` reads only the last :data:`TAIL_BYTES` of a file (by offset from its end,
never the whole file), skips a torn last line (no ``\\n`` yet: the writer is mid-line) and any
line that is not a valid ``Progress``, and answers None rather than raising for a corrupt,
missing or linked file: progress never breaks ``status``.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from hpc_jobs.protocol import Progress

#: Bytes read from the end of a progress file. A line is at most ~400 bytes (a 200-char
#: message), so the last complete line is always inside this window.
TAIL_BYTES = 4096
#: Default shortest pause between two written lines (seconds).
MIN_INTERVAL_S = 1.0
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def progress_file_name(task: int | None = None) -> str:
    """``progress.jsonl``, or ``progress.<task>.jsonl`` for an array task."""
    return "progress.jsonl" if task is None else f"progress.{task}.jsonl"


def task_of_file_name(name: str) -> int | None:
    """The array task of a ``progress.<task>.jsonl`` name; None for any other name."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "progress" and parts[2] == "jsonl" and parts[1].isdigit():
        return int(parts[1])
    return None


class ProgressReporter:
    """Appends a step's progress to its job's progress file, rate-limited.

    :param path: the progress file; None makes every call a no-op (outside a job).
    :param unit: what is counted ("tiles", "blocks", "epochs", "crops", "rows", "seconds").
    :param total: how many there will be, if known.
    :param message: what the step is doing, for people ("segmenting").
    :param min_interval_s: shortest pause between two written lines; an update sooner is kept
        and written by the next update after the pause, or by :meth:`finish`.
    """

    def __init__(
        self,
        path: Path | None,
        unit: str = "items",
        total: int | None = None,
        message: str | None = None,
        min_interval_s: float = MIN_INTERVAL_S,
    ) -> None:
        self.path = path
        self.unit = unit
        self.total = total
        self.message = message
        self.done = 0
        self.min_interval_s = min_interval_s
        self.lines_written = 0
        self._last_write: float | None = None
        self._dirty = False
        self._finished = False
        self._lock = threading.Lock()  # steps may count from worker threads
        # Fail early (in the step, not in the gateway) on a unit the protocol refuses.
        Progress(done=0, total=total, unit=unit, message=message)

    def update(
        self,
        done: int | None = None,
        total: int | None = None,
        message: str | None = None,
        *,
        force: bool = False,
    ) -> None:
        """Set the count (and optionally the total / message); written if the pause is over
        (or ``force``)."""
        with self._lock:
            self._update(done, total, message, force)

    def _update(self, done: int | None, total: int | None, message: str | None, force: bool
                ) -> None:
        if done is not None:
            self.done = max(0, int(done))
        if total is not None:
            self.total = int(total)
        if message is not None:
            self.message = message[:200]
        self._dirty = True
        now = time.monotonic()
        if force or self._last_write is None or now - self._last_write >= self.min_interval_s:
            self._write(now)

    def advance(self, n: int = 1, message: str | None = None) -> None:
        """Count ``n`` more done (thread-safe)."""
        with self._lock:
            self._update(self.done + n, None, message, False)

    def finish(self, message: str | None = None) -> None:
        """Write the final line (always, whatever the rate limit)."""
        with self._lock:
            if message is not None:
                self.message = message[:200]
            if self._dirty or message is not None or self.lines_written == 0:
                self._write(time.monotonic())
            self._finished = True

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finished:
            self.finish()

    def _write(self, now: float) -> None:
        self._last_write = now
        self._dirty = False
        if self.path is None:
            return
        line = Progress(
            done=self.done, total=self.total, unit=self.unit, message=self.message,
            time=round(time.time(), 3),
        ).model_dump_json(exclude_none=True) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
        except OSError:
            return  # progress is for people; it never fails a step
        try:
            os.write(fd, line.encode())  # one write of a short line: appended whole
            self.lines_written += 1
        except OSError:
            pass
        finally:
            os.close(fd)


def read_latest(dir_fd: int, name: str, tail_bytes: int = TAIL_BYTES) -> Progress | None:
    """The last valid, complete line of progress file ``name`` in the directory ``dir_fd``.

    Reads at most ``tail_bytes`` from the end (one ``pread`` at ``size - tail_bytes``). None
    when the file is missing, is a link or not a regular file, or holds no valid line there.
    """
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError:  # missing, a link (ELOOP), unreadable: no progress
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return None
        start = max(0, info.st_size - tail_bytes)
        data = os.pread(fd, min(tail_bytes, info.st_size), start)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _last_valid_line(data, whole_first=start == 0)


def _last_valid_line(data: bytes, whole_first: bool) -> Progress | None:
    lines = data.split(b"\n")
    lines.pop()  # after the last "\n": empty, or a torn line the writer has not finished
    if not whole_first and lines:
        lines.pop(0)  # the window started mid-line
    for raw in reversed(lines):
        if not raw.strip():
            continue
        try:
            obj: Any = json.loads(raw)
            return Progress.model_validate(obj, strict=True)
        except (ValueError, ValidationError, RecursionError):
            continue
    return None


def summed(per_task: dict[str, Progress]) -> Progress | None:
    """One progress for an array: counts summed over the tasks that reported; the total only
    when every reporting task knows its own; the newest message and time."""
    if not per_task:
        return None
    items = list(per_task.values())
    totals = [p.total for p in items]
    newest = max(items, key=lambda p: p.time or 0.0)
    return Progress(
        done=sum(p.done for p in items),
        total=None if any(t is None for t in totals) else sum(t for t in totals if t is not None),
        unit=newest.unit,
        message=newest.message,
        time=newest.time,
    )


def describe(progress: Progress) -> str:
    """``12/40 tiles (30 %), segmenting`` (``12 tiles`` while the total is unknown)."""
    if progress.total:
        text = (f"{progress.done}/{progress.total} {progress.unit} "
                f"({100 * progress.done // progress.total} %)")
    elif progress.total == 0:
        text = f"{progress.done}/0 {progress.unit}"
    else:
        text = f"{progress.done} {progress.unit}"
    return f"{text}, {progress.message}" if progress.message else text


def describe_tasks(per_task: dict[str, Progress], limit: int = 20) -> str:
    """``task 0: 3/4 seconds (75 %); task 1: ...`` for at most ``limit`` tasks."""
    items = sorted(per_task.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1)
    shown = "; ".join(f"task {t}: {describe(p)}" for t, p in items[:limit])
    return shown + (f"; ... (+{len(items) - limit} more)" if len(items) > limit else "")
