"""The audit log cannot be switched off by a job key, and a call that cannot be audited is
refused before it acts; job files are never read through a symbolic link, whichever path
component the link replaces. Real gateway processes (``python -m hpc_jobs.gateway``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import SAFE_NAME_RE

GATEWAY = [sys.executable, "-m", "hpc_jobs.gateway"]


def call(config: Path, verb: str, body: dict, caller: str | None = None) -> tuple[int, dict]:
    env = dict(os.environ, SSH_ORIGINAL_COMMAND=verb)
    argv = [*GATEWAY, "--config", str(config)] + (["--caller", caller] if caller else [])
    proc = subprocess.run(
        argv, input=json.dumps(body).encode(), env=env, capture_output=True, timeout=60
    )
    return proc.returncode, json.loads(proc.stdout)


def make_site(root: Path, **extra: str) -> Path:
    text = SiteConfig.local(root).to_toml()
    lines = [f'{k} = "{v}"' for k, v in extra.items()]
    path = root / "site.toml"
    path.write_text("\n".join(lines) + "\n" + text if lines else text)
    return path


def audit_lines(config: Path) -> list[dict]:
    return [json.loads(x) for x in SiteConfig.load(config).audit_path.read_text().splitlines()]


# -- audit ----------------------------------------------------------------------------------
def test_no_job_key_can_take_the_audit_log(tmp_path: Path) -> None:
    """``audit.log`` was both the audit log under job_root and a valid job key: submitting
    it made a directory there and every later call went unaudited."""
    config = make_site(tmp_path)
    code, reply = call(config, "submit", {"step": "cluster_check", "job_key": "audit.log"})
    assert code == 0, reply
    call(config, "ping", {})
    assert [e["verb"] for e in audit_lines(config)] == ["submit", "ping"]
    audit = SiteConfig.load(config).audit_path
    assert SAFE_NAME_RE.fullmatch(audit.name) is None, "the audit log's name is a job key"


def test_a_configured_audit_log_in_the_job_key_namespace_is_refused(tmp_path: Path) -> None:
    config = make_site(tmp_path, audit_log=str(tmp_path / "jobs" / "audit.log"))
    code, reply = call(config, "ping", {})
    assert code != 0 and reply["error"]["code"] == "CONFIG_ERROR"
    assert "job-key namespace" in reply["error"]["message"]
    assert ".audit.log" in reply["error"]["message"]  # the fix


def test_a_call_that_cannot_be_audited_is_refused_before_it_acts(tmp_path: Path) -> None:
    audit = tmp_path / "audit-dir"
    audit.mkdir()  # cannot be appended to (root ignores file modes, not file types)
    config = make_site(tmp_path, audit_log=str(audit))
    code, reply = call(config, "submit", {"step": "cluster_check", "job_key": "unaudited"})
    assert code != 0 and reply["error"]["code"] == "CONFIG_ERROR", reply
    message = reply["error"]["message"]
    assert str(audit) in message and "audit_log" in message and "HPC admin" in message
    assert not (tmp_path / "jobs" / "unaudited").exists(), "the gateway acted without auditing"


# -- links ----------------------------------------------------------------------------------
@pytest.fixture()
def finished_job(tmp_path: Path) -> tuple[Path, Path]:
    """(site file, job dir) of a completed job, and a look-alike job dir elsewhere."""
    config = make_site(tmp_path)
    code, reply = call(config, "submit", {"step": "cluster_check", "job_key": "real"})
    assert code == 0, reply
    for _ in range(600):
        _, st = call(config, "status", {"job_ids": ["real"]})
        if st["jobs"][0]["state"] == "COMPLETED":
            break
        time.sleep(0.2)
    job = tmp_path / "jobs" / "real"
    # somewhere else: a directory that looks like this caller's job, with a "secret" log
    fake = tmp_path / "elsewhere"
    (fake / "outputs").mkdir(parents=True)
    (fake / "job.json").write_text((job / "job.json").read_text())
    (fake / "job.log").write_text("SECRET-LOG\n")
    (fake / "outputs" / "summary.json").write_text('{"secret": "SECRET-OUT"}')
    return config, job


@pytest.mark.timeout(180)
def test_a_linked_job_directory_is_refused(finished_job: tuple[Path, Path]) -> None:
    config, job = finished_job
    (job.parent / "linked").symlink_to(job.parent.parent / "elsewhere")
    for verb, body in (
        ("log", {"job_id": "linked"}),
        ("result", {"job_id": "linked"}),
        ("status", {"job_ids": ["linked"]}),
    ):
        code, reply = call(config, verb, body)
        assert "SECRET" not in json.dumps(reply), f"{verb} followed the link"
        if verb == "status":
            assert reply["jobs"][0]["state"] == "UNKNOWN"
            assert "symbolic link" in reply["jobs"][0]["reason"]
        else:
            assert code != 0 and "symbolic link" in reply["error"]["message"], reply


@pytest.mark.timeout(180)
def test_a_linked_outputs_directory_is_refused(finished_job: tuple[Path, Path]) -> None:
    config, job = finished_job
    os.rename(job / "outputs", job / "outputs.orig")
    (job / "outputs").symlink_to(job.parent.parent / "elsewhere" / "outputs")
    code, reply = call(config, "result", {"job_id": "real"})
    assert code != 0 and "SECRET" not in json.dumps(reply)
    assert "symbolic link" in reply["error"]["message"], reply
