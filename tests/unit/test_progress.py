"""Live progress: the step-side reporter, the tail reader, and the gateway's ``status`` that
returns the latest progress of each job (plain and array) from a real local job."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_jobs.config import SiteConfig
from hpc_jobs.gateway import handle
from hpc_jobs.progress import ProgressReporter, describe, read_latest
from hpc_jobs.protocol import Progress

pytestmark = pytest.mark.timeout(120)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _latest(path: Path) -> Progress | None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return read_latest(fd, path.name)
    finally:
        os.close(fd)


def _bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (``rchar``)."""
    with open("/proc/self/io", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


# -- the reporter -----------------------------------------------------------------------------
def test_a_tight_loop_writes_few_lines_and_always_the_final_one(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    with ProgressReporter(path, "tiles", total=100_000, message="segmenting") as progress:
        for _ in range(100_000):
            progress.advance()
    lines = _lines(path)
    assert len(lines) <= 5, f"100000 updates in a tight loop wrote {len(lines)} lines"
    assert path.stat().st_size < 2000
    assert lines[0]["done"] <= 1  # the first update is written at once
    assert lines[-1] == {**lines[-1], "done": 100_000, "total": 100_000, "unit": "tiles",
                         "message": "segmenting"}


def test_updates_after_the_pause_are_written(tmp_path: Path) -> None:
    path = tmp_path / "progress.3.jsonl"
    progress = ProgressReporter(path, "epochs", total=3, min_interval_s=0.0)
    for epoch in range(1, 4):
        progress.update(epoch, message=f"epoch {epoch}")
    progress.finish("trained")
    assert [(p["done"], p.get("message")) for p in _lines(path)] == [
        (1, "epoch 1"), (2, "epoch 2"), (3, "epoch 3"), (3, "trained")]
    assert describe(Progress.model_validate(_lines(path)[-1])) == "3/3 epochs (100 %), trained"


def test_the_reporter_is_a_no_op_outside_a_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    monkeypatch.chdir(tmp_path)
    with ProgressReporter(None, "rows", total=10) as progress:
        progress.update(5)
    assert list(tmp_path.iterdir()) == []


def test_a_unit_the_protocol_refuses_fails_in_the_step_not_in_the_gateway() -> None:
    with pytest.raises(ValueError, match="unit"):
        ProgressReporter(None, "Tiles; rm -rf /")


# -- reading the latest line ------------------------------------------------------------------
def test_only_the_end_of_a_large_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    line = Progress(done=1, total=10**9, unit="rows").model_dump_json() + "\n"
    path.write_text(line * 200_000 + Progress(done=7, total=10**9, unit="rows")
                    .model_dump_json() + "\n")
    assert path.stat().st_size > 5_000_000
    before = _bytes_read()
    latest = _latest(path)
    read = _bytes_read() - before
    assert latest is not None and latest.done == 7
    assert read <= 8192, f"read {read} bytes of a {path.stat().st_size}-byte file"


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    path.write_text('{"done": 3, "total": 9, "unit": "tiles"}\n{"done": 4, "total": 9, "un')
    latest = _latest(path)
    assert latest is not None and (latest.done, latest.total) == (3, 9)


@pytest.mark.parametrize("content", [
    b"\x00\xff\xfe garbage \x80\n",
    b'{"done": -1}\n',
    b'{"done": "3"}\n',
    b'{"done": 1, "unit": "$(touch x)"}\n',
    b'{"done": 1, "evil": true}\n',
    b"[" * 100_000 + b"\n",
    b"",
])
def test_a_corrupt_file_gives_no_progress(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "progress.jsonl"
    path.write_bytes(content)
    assert _latest(path) is None


def test_a_linked_progress_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.jsonl"
    target.write_text('{"done": 5}\n')
    (tmp_path / "progress.jsonl").symlink_to(target)
    assert _latest(tmp_path / "progress.jsonl") is None


# -- the gateway's status ---------------------------------------------------------------------
@pytest.fixture()
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SiteConfig.local(tmp_path).to_toml())
    return path


def _call(site_file: Path, verb: str, **body: Any) -> dict[str, Any]:
    reply, _status = handle(verb, json.dumps(body).encode(), site_file)
    assert reply["ok"], reply
    return reply


def test_status_returns_each_jobs_latest_progress_while_it_runs(site_file: Path) -> None:
    """A real local job (cluster_check sleeping 3 s, one count per second) and an array of two:
    ``status`` shows the count move, the array per task and summed, and the job's host, time
    limit and peak memory."""
    _call(site_file, "submit", step="cluster_check", job_key="plain", params={"sleep_s": 3},
          resources={"time_min": 7})
    _call(site_file, "submit", step="cluster_check", job_key="arr", params={"sleep_s": 2},
          resources={"array": "0-1"})
    seen: set[int] = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        plain, arr = _call(site_file, "status", job_ids=["plain", "arr"])["jobs"]
        if plain["progress"] is not None:
            seen.add(plain["progress"]["done"])
        if plain["state"] == arr["state"] == "COMPLETED":
            break
        time.sleep(0.3)
    assert len(seen) >= 2, f"progress never moved while the job ran: {seen}"
    assert plain["progress"] == {**plain["progress"], "done": 3, "total": 3, "unit": "seconds"}
    assert plain["array_progress"] is None
    assert plain["node"] == os.uname().nodename
    assert plain["time_limit_s"] == 7 * 60
    assert plain["max_rss_mb"] is not None and 5 < plain["max_rss_mb"] < 4096
    assert set(arr["array_progress"]) == {"0", "1"}
    assert all(p["done"] == p["total"] == 2 for p in arr["array_progress"].values())
    assert (arr["progress"]["done"], arr["progress"]["total"]) == (4, 4)


def test_a_corrupt_progress_file_never_breaks_status(site_file: Path) -> None:
    _call(site_file, "submit", step="cluster_check", job_key="bad", params={})
    job_dir = site_file.parent / "jobs" / "bad"
    (job_dir / "progress.jsonl").write_bytes(b"\xff\x00{not json\n" * 1000)
    (job_dir / "progress.0.jsonl").mkdir()  # not even a file
    (job_dir / "progress.1.jsonl").symlink_to("/etc/passwd")
    (job, ) = _call(site_file, "status", job_ids=["bad"])["jobs"]
    assert job["state"] in ("PENDING", "RUNNING", "COMPLETED")
    assert job["progress"] is None and job["array_progress"] is None


# -- steps that report --------------------------------------------------------------------------
def test_export_and_ecdf_count_their_blocks_into_the_job_dir(tmp_path: Path) -> None:
    """The real steps on a small image: each one's last line is its final count."""
    import numpy as np

    from hpc_jobs import ngff
    from hpc_jobs.steps import ecdf, export_zarr
    from hpc_jobs.stores.base import NewRoi, PolygonShape
    from hpc_jobs.stores.local import LocalStore
    from tests.science.conftest import make_context

    ctx = make_context(tmp_path, cpus=2)
    ctx.job_dir.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 65536, size=(2, 200, 130), dtype=np.uint16)
    tissue = PolygonShape(((5.0, 5.0), (120.0, 8.0), (100.0, 190.0)), "tissue_A")
    with LocalStore(ctx.site.store.path) as store:
        image_id = store.add_image("img", pixels, ["DAPI", "CD3"])
        store.add_rois(image_id, [NewRoi((tissue,))])
    export = export_zarr.run(
        export_zarr.Params(image_id=image_id, block_size=64, chunk_size=32), ctx)
    lines = _lines(ctx.job_dir / "progress.jsonl")
    assert lines[-1]["unit"] == "blocks" and lines[-1]["message"] == "exported"
    assert lines[-1]["done"] == lines[-1]["total"] == export["blocks_written"]

    ecdf.run(ecdf.Params(image_id=image_id), ctx)
    last = _lines(ctx.job_dir / "progress.jsonl")[-1]
    level0 = len(ngff.blocks((200, 130), 64))
    assert (last["done"], last["total"], last["unit"]) == (level0, level0, "blocks")
