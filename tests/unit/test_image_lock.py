"""The per-image reader/writer lock between real processes (flock: other jobs, other runs)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hpc_jobs.image_lock import ImageLockedError, holders, image_lock
from tests.image_lock_holder import Holder

RUN_A = "celldetector_preprocess.manual__2026-11-21T20_00_00_00_00.export_zarr.0.1.1a2b3c4d5e"
RUN_B = "celldetector_preprocess.scheduled__2026-11-21T00_00_00_00_00.ecdf.3.1.9f8e7d6c5b"


def lock(image_dir: Path, exclusive: bool, wait_s: float = 0.3, key: str = "me.0.1"):
    return image_lock(image_dir, job_key=key, exclusive=exclusive, purpose="test",
                      wait_s=wait_s, image_id=7)


def test_an_exclusive_holder_blocks_a_reader_and_the_error_names_its_job(tmp_path: Path) -> None:
    with Holder(tmp_path, RUN_A, exclusive=True, purpose="export_zarr"):
        with pytest.raises(ImageLockedError) as err, lock(tmp_path, exclusive=False):
            pass
        message = str(err.value)
        assert RUN_A in message, "the message names the job (DAG run) that holds the image"
        assert "image 7" in message and "exclusive, export_zarr" in message
        assert "run this task again" in message
        assert [h["job_key"] for h in err.value.holders] == [RUN_A]
    with lock(tmp_path, exclusive=True):  # released by the holder: free again
        assert [h["job_key"] for h in holders(tmp_path)] == ["me.0.1"]
    assert holders(tmp_path) == []


def test_shared_holders_coexist_and_a_writer_waits_for_all_of_them(tmp_path: Path) -> None:
    with Holder(tmp_path, RUN_A, exclusive=False, purpose="segment_nuclei tiles"), \
            Holder(tmp_path, RUN_B, exclusive=False, purpose="ecdf"):
        with lock(tmp_path, exclusive=False):  # a third reader gets in at once
            assert len(holders(tmp_path)) == 3
        with pytest.raises(ImageLockedError) as err, lock(tmp_path, exclusive=True):
            pass
        assert RUN_A in str(err.value) and RUN_B in str(err.value)
        assert sorted(h["mode"] for h in err.value.holders) == ["shared", "shared"]


def test_a_waiting_job_gets_the_image_when_the_holder_finishes(tmp_path: Path) -> None:
    holder = Holder(tmp_path, RUN_A, exclusive=True).start()
    got: list[str] = []

    def waiter() -> None:
        with lock(tmp_path, exclusive=False, wait_s=120):
            got.append("acquired")

    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join(0.5)
    assert got == [], "the reader waits while the writer holds the image"
    holder.release()
    thread.join(120)
    assert got == ["acquired"]


def test_a_crashed_holder_releases_the_image_and_its_record_is_dropped(tmp_path: Path) -> None:
    holder = Holder(tmp_path, RUN_A, exclusive=True).start()
    assert [h["job_key"] for h in holders(tmp_path)] == [RUN_A]
    holder.kill()  # SIGKILL: the holder's own cleanup never runs
    assert holders(tmp_path) == [], "a dead holder's record is not reported"
    assert list((tmp_path / ".omeflow-lock.holders").iterdir()) == []
    with lock(tmp_path, exclusive=True):
        pass
