"""Sessions that end (cluster side): when a job is over, whatever its ending, its OMERO session
is ended once and ``secrets.json`` leaves the job directory; the key never shows up in the
audit log or a reply.

Real jobs on the local scheduler through the gateway (``handle``, in-process) and the job
runner (``hpc_jobs.run.main``); the site's store is OMERO, and the one call that would reach
a server, ``hpc_jobs.stores.omero.end_session``, is replaced by a recorder. The OMERO end
itself (join, then ``killSession``) is checked against a fake ``omero.client``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

import hpc_jobs.stores.omero as omero_store
from hpc_jobs import run
from hpc_jobs.config import SiteConfig, StoreConfig
from hpc_jobs.gateway import handle
from hpc_jobs.jobdir import JobDir
from hpc_jobs.protocol import Secrets
from hpc_jobs.stores import end_session
from hpc_jobs.stores.base import StoreError

pytestmark = pytest.mark.timeout(300)

KEY = "f3c1a2b4-5d6e-4f70-8a9b-0c1d2e3f4a5b"
OMERO = StoreConfig(kind="omero", host="omero.example.org", port=4064)


@pytest.fixture()
def ended(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every OMERO session end the cluster side asks for (host, port, key, ca_file)."""
    calls: list[tuple[Any, ...]] = []

    def record(host: str, port: int, session_key: str, ca_file: Any = None,
               tls_name: Any = None) -> bool:
        calls.append((host, port, session_key, ca_file))
        return True

    monkeypatch.setattr(omero_store, "end_session", record)
    return calls


@pytest.fixture()
def site_file(tmp_path: Path) -> Path:
    site = SiteConfig.local(tmp_path).model_copy(update={"store": OMERO})
    path = tmp_path / "site.toml"
    path.write_text(site.to_toml())
    return path


def call(site_file: Path, verb: str, **body: Any) -> dict[str, Any]:
    reply, _status = handle(verb, json.dumps(body).encode(), site_file)
    assert KEY not in json.dumps(reply), "a reply carries the session key"
    return reply


def submit(site_file: Path, key: str, **fields: Any) -> JobDir:
    reply = call(site_file, "submit", step="cluster_check", job_key=key,
                 secrets={"omero_session_key": KEY}, **fields)
    assert reply["ok"], reply
    job = JobDir.of(site_file.parent / "jobs", key)
    assert job.secrets_path.exists()
    return job


def wait(site_file: Path, key: str, until: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        (job,) = call(site_file, "status", job_ids=[key])["jobs"]
        if job["state"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {key} never reached {until}")


def audit(site_file: Path) -> list[dict[str, Any]]:
    text = (site_file.parent / "jobs" / ".audit.log").read_text()
    assert KEY not in text, "the audit log carries the session key"
    return [json.loads(line) for line in text.splitlines()]


def test_a_plain_job_ends_its_own_session_whatever_its_ending(
    site_file: Path, ended: list[tuple[Any, ...]]
) -> None:
    jobs = site_file.parent / "jobs"
    for exit_code, name in ((0, "ok"), (3, "fails")):
        job = JobDir.of(jobs, name)
        job.create(
            {"step": "cluster_check", "job_key": name, "caller": "local",
             "params": {"exit_code": exit_code}, "resources": {"cpus": 1, "mem_mb": 512,
                                                                "time_min": 10},
             "site_config": str(site_file)},
            Secrets(omero_session_key=KEY),
            python=Path("/usr/bin/python3"),
        )
        assert run.main(job.path) == exit_code  # in this process: the recorder is seen
        assert not job.secrets_path.exists()
    assert ended == [("omero.example.org", 4064, KEY, None)] * 2


def test_an_array_task_leaves_the_session_to_the_gateway(
    site_file: Path, ended: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = JobDir.of(site_file.parent / "jobs", "arr")
    job.create(
        {"step": "cluster_check", "job_key": "arr", "caller": "local", "params": {},
         "resources": {"cpus": 1, "mem_mb": 512, "time_min": 10, "array": "0-1"},
         "site_config": str(site_file)},
        Secrets(omero_session_key=KEY),
        python=Path("/usr/bin/python3"),
    )
    monkeypatch.setenv("OMEFLOW_ARRAY_TASK_ID", "0")
    assert run.main(job.path) == 0
    assert job.secrets_path.exists() and ended == []  # task 1 may still need it


def test_a_completed_job_leaves_no_secrets(site_file: Path) -> None:
    # the job runs in its own process: there the real OMERO end is tried (no server here)
    job = submit(site_file, "done")
    assert wait(site_file, "done", ("COMPLETED", "FAILED"))["state"] == "COMPLETED"
    assert not job.secrets_path.exists()
    assert "the job's OMERO session: failed (StoreError)" in job.log_path.read_text()
    assert KEY not in job.log_path.read_text()


def test_the_gateway_ends_a_finished_arrays_session_once(
    site_file: Path, ended: list[tuple[Any, ...]]
) -> None:
    job = submit(site_file, "arr", resources={"array": "0-1"})
    assert wait(site_file, "arr", ("COMPLETED", "FAILED"))["state"] == "COMPLETED"
    assert not job.secrets_path.exists()
    call(site_file, "status", job_ids=["arr"])
    call(site_file, "cancel", job_id="arr")
    assert ended == [("omero.example.org", 4064, KEY, None)]
    retired = [e["secrets_retired"] for e in audit(site_file) if "secrets_retired" in e]
    assert retired == [{"arr": "ended"}]


def test_cancel_ends_the_session(site_file: Path, ended: list[tuple[Any, ...]]) -> None:
    job = submit(site_file, "slow", params={"sleep_s": 120})
    wait(site_file, "slow", ("RUNNING",))
    assert job.secrets_path.stat().st_mode & 0o777 == 0o600 and ended == []
    assert KEY in job.secrets_path.read_text()  # while it runs, the key is there and only there
    for path in job.path.rglob("*"):
        if path.is_file() and path != job.secrets_path:
            assert KEY not in path.read_text(errors="replace"), path
    reply = call(site_file, "cancel", job_id="slow")
    assert reply["state"] == "CANCELLED", reply
    assert not job.secrets_path.exists()
    assert wait(site_file, "slow", ("CANCELLED",))["state"] == "CANCELLED"
    assert ended == [("omero.example.org", 4064, KEY, None)]
    (entry,) = [e for e in audit(site_file) if e.get("secrets_retired")]
    assert entry["verb"] == "cancel" and entry["secrets_retired"] == {"slow": "ended"}


def test_secrets_are_taken_once(tmp_path: Path) -> None:
    job = JobDir.of(tmp_path, "j")
    job.create({"step": "cluster_check", "params": {}, "resources": {}}, Secrets(
        omero_session_key=KEY), python=Path("/usr/bin/python3"))
    assert job.take_secrets() == Secrets(omero_session_key=KEY)
    assert job.take_secrets() is None
    assert sorted(p.name for p in job.path.iterdir()) == ["job.py", "outputs", "request.json"]
    assert job.retire_secrets(OMERO) is None


# -- the OMERO end itself ----------------------------------------------------------------------
class RemovedSessionException(Exception):
    pass


class ConnectionRefusedException(Exception):
    pass


class Client:
    """``omero.client`` against a fake server: live sessions with their reference counts."""

    def __init__(self, sessions: dict[str, int], reachable: bool = True) -> None:
        self.sessions, self.reachable = sessions, reachable
        self.joined: str | None = None
        self.destroyed = False

    def joinSession(self, key: str) -> Client:  # noqa: N802
        if not self.reachable:
            raise ConnectionRefusedException()
        if key not in self.sessions:
            raise RemovedSessionException()
        self.sessions[key] += 1
        self.joined = key
        return self

    def killSession(self) -> None:  # noqa: N802 - closeSession until the count is 0
        del self.sessions[self.joined]

    def __del__(self) -> None:
        self.destroyed = True


def test_end_session_joins_and_kills_and_never_logs_the_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = {KEY: 1}
    clients: list[Client] = []
    reachable = [True]

    def new_client(host: str, port: int, ca_file: Any, tls_name: Any = None) -> Client:
        clients.append(Client(sessions, reachable[0]))
        return clients[-1]

    monkeypatch.setattr(omero_store, "_require_omero", lambda: object)
    monkeypatch.setattr(omero_store, "new_client", new_client)
    secrets = Secrets(omero_session_key=KEY)

    assert end_session(OMERO, secrets) == "ended"
    assert sessions == {}, "the session is gone, not just detached"
    assert end_session(OMERO, secrets) == "already ended"
    assert end_session(StoreConfig(kind="local", path=Path("/x")), secrets) == "none"
    assert end_session(OMERO, Secrets()) == "none"

    reachable[0] = False  # the server cannot be reached
    with caplog.at_level(logging.WARNING):
        assert end_session(OMERO, secrets) == "failed (StoreError)"
    assert "could not end the job's OMERO session" in caplog.text
    assert KEY not in caplog.text
    assert all(c.destroyed for c in clients)
    with pytest.raises(StoreError, match="could not reach OMERO"):
        omero_store.end_session("omero.example.org", 4064, KEY)
