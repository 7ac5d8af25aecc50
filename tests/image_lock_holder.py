"""Hold an image's lock in a separate process (a stand-in for another job), for the tests.

``python tests/image_lock_holder.py IMAGE_DIR JOB_KEY shared|exclusive PURPOSE`` takes the
lock, prints ``held``, keeps it until a line arrives on stdin (or the process is killed),
then prints ``released``. :class:`Holder` drives it from a test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Holder:
    """Another process holding an image's lock (``with Holder(...)``: held inside)."""

    def __init__(self, image_dir: Path, job_key: str, *, exclusive: bool,
                 purpose: str = "export_zarr") -> None:
        self.args = [sys.executable, __file__, str(image_dir), job_key,
                     "exclusive" if exclusive else "shared", purpose]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Holder:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "held":
            self.proc.kill()
            raise AssertionError(f"holder did not get the lock: {line!r} "
                                 f"{self.proc.stderr.read()}")  # type: ignore[union-attr]
        return self

    def release(self) -> None:
        """Let the holder leave its ``with`` block normally and exit."""
        assert self.proc is not None
        out, err = self.proc.communicate("\n", timeout=60)
        assert self.proc.returncode == 0 and "released" in out, err

    def kill(self) -> None:
        """SIGKILL: no cleanup code runs (a crashed job)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def __enter__(self) -> Holder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.release()


def main() -> int:
    from hpc_jobs.image_lock import image_lock

    image_dir, job_key, mode, purpose = sys.argv[1:5]
    with image_lock(Path(image_dir), job_key=job_key, exclusive=mode == "exclusive",
                    purpose=purpose, wait_s=30):
        print("held", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
