"""The gateway's ``queue`` verb and ``cancel`` with ``by``, against real local jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_jobs.config import SiteConfig
from hpc_jobs.gateway import handle

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SiteConfig.local(tmp_path).to_toml())
    return path


def _call(site_file: Path, verb: str, caller: str | None = None, **body: Any) -> dict[str, Any]:
    reply, _status = handle(verb, json.dumps(body).encode(), site_file, caller)
    assert reply["ok"], reply
    return reply


def _wait_running(site_file: Path, key: str, caller: str | None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (job,) = _call(site_file, "status", caller, job_ids=[key])["jobs"]
        if job["state"] == "RUNNING":
            return
        time.sleep(0.2)
    raise AssertionError(f"{key} never started: {job}")


def test_queue_lists_the_callers_live_jobs_only(site_file: Path) -> None:
    _call(site_file, "submit", "alice", step="cluster_check", job_key="alice-1",
          params={"sleep_s": 60}, resources={"time_min": 5})
    _call(site_file, "submit", "bob", step="cluster_check", job_key="bob-1",
          params={"sleep_s": 60})
    _call(site_file, "submit", "alice", step="cluster_check", job_key="alice-done", params={})
    try:
        _wait_running(site_file, "alice-1", "alice")
        deadline = time.monotonic() + 60
        while _call(site_file, "status", "alice", job_ids=["alice-done"])["jobs"][0][
                "state"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        alice = _call(site_file, "queue", "alice")
        assert alice["scheduler"] == "local"
        assert [j["job_id"] for j in alice["jobs"]] == ["alice-1"]  # not bob's, not finished
        (entry,) = alice["jobs"]
        assert entry["native_id"] == "alice-1" and entry["state"] == "RUNNING"
        assert entry["time_limit_s"] == 300 and entry["node"]
        assert entry["submitted_at"] <= time.time() and entry["elapsed_s"] >= 0
        assert [j["job_id"] for j in _call(site_file, "queue", "bob")["jobs"]] == ["bob-1"]
        assert _call(site_file, "queue")["jobs"] == []  # the default caller owns none
    finally:
        _call(site_file, "cancel", "alice", job_id="alice-1")
        _call(site_file, "cancel", "bob", job_id="bob-1")
    assert _call(site_file, "queue", "alice")["jobs"] == []


def test_cancel_by_names_the_person_in_the_reason_and_the_audit_log(site_file: Path) -> None:
    _call(site_file, "submit", step="cluster_check", job_key="long", params={"sleep_s": 60})
    _wait_running(site_file, "long", None)
    reply = _call(site_file, "cancel", job_id="long", by="jane.doe@lab")
    assert reply["state"] == "CANCELLED"
    (job,) = _call(site_file, "status", job_ids=["long"])["jobs"]
    assert (job["state"], job["reason"]) == ("CANCELLED", "cancelled by jane.doe@lab")
    record = json.loads((site_file.parent / "jobs" / "long" / "cancelled_by.json").read_text())
    assert record["by"] == "jane.doe@lab"
    audit = [json.loads(line) for line in
             SiteConfig.load(site_file).audit_path.read_text().splitlines()]
    assert [(a["verb"], a.get("by")) for a in audit if a["verb"] == "cancel"] == [
        ("cancel", "jane.doe@lab")]


def test_a_cancel_of_a_finished_job_records_nobody(site_file: Path) -> None:
    _call(site_file, "submit", step="cluster_check", job_key="quick", params={})
    deadline = time.monotonic() + 60
    while (job := _call(site_file, "status", job_ids=["quick"])["jobs"][0])["state"] != \
            "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert _call(site_file, "cancel", job_id="quick", by="jane")["state"] == "COMPLETED"
    assert not (site_file.parent / "jobs" / "quick" / "cancelled_by.json").exists()
    (after,) = _call(site_file, "status", job_ids=["quick"])["jobs"]
    assert after["reason"] == job["reason"]
