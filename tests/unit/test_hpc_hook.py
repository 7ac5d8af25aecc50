"""``HpcGatewayHook``: transport selection (no silent local fallback, pinned host keys), the
same-key submit retry after a lost reply, and reply decoding.

The lost-reply test runs the real gateway (``hpc_jobs.gateway``, embedded default: local
scheduler) in a subprocess; only the reply is dropped on its way back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from hooks.hpc import (
    AsyncGatewayClient,
    HpcConfigError,
    HpcGatewayError,
    HpcGatewayHook,
    HpcTransportError,
    _Raw,
    decode_reply,
)
from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import job_key_for

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def _set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, conn: dict[str, Any]) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def _job_dirs(site: SiteConfig) -> list[str]:
    """One directory per job key; the local scheduler's native id is that name."""
    if not site.job_root.exists():
        return []
    return sorted(p.name for p in site.job_root.iterdir() if p.is_dir() and p.name[0] != ".")


# -- 1. a lost submit reply ---------------------------------------------------------------------
class _TI:
    """The task-instance fields the operator reads, and its XCom pushes."""

    def __init__(self, try_number: int) -> None:
        self.dag_id, self.run_id, self.task_id = "dag", "manual__1", "check"
        self.map_index, self.try_number = -1, try_number
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


class _LostFirstSubmitReply(HpcGatewayHook):
    """The real local gateway runs (and creates the job); its first submit reply is lost."""

    lost = 0

    def _call_local(self, verb: str, body: bytes) -> Any:
        raw = super()._call_local(verb, body)
        if verb == "submit" and not self.lost:
            self.lost += 1
            raise HpcTransportError("connection reset by peer (after the gateway answered)")
        return raw


def test_lost_submit_reply_runs_one_job(site: SiteConfig) -> None:
    from operators.hpc_step import HpcStepOperator

    # the job sleeps: on a busy host a job without it could end before the retried submit
    # answers, and try 1 would then finish without deferring (no TaskDeferred to check)
    op = HpcStepOperator(task_id="check", step="cluster_check", step_params={"sleep_s": 3})
    hook = _LostFirstSubmitReply()
    hook.retry_delay = 0.05
    op.__dict__["hook"] = hook
    deferred = None
    for try_number in (1, 2, 3):  # what Airflow does when execute raises: the next try
        ti = _TI(try_number)
        try:
            op.execute({"ti": ti})  # type: ignore[arg-type]
        except TaskDeferred as exc:
            deferred = exc
            break
        except HpcTransportError:
            continue
    assert hook.lost == 1, "the first reply was really lost"
    key = job_key_for("dag", "manual__1", "check", -1, 1)
    assert deferred is not None and deferred.trigger.job_id == key, "try 1 waits for its job"
    assert _job_dirs(site) == [key], "exactly one job (one directory, one local native job)"
    for _ in range(200):  # let the short job end before tmp_path goes
        if hook.status([key])[0].state.terminal:
            break
        time.sleep(0.1)


def test_submit_gives_up_after_bounded_attempts(site: SiteConfig) -> None:
    class Unreachable(HpcGatewayHook):
        calls = 0

        def _call_local(self, verb: str, body: bytes) -> Any:
            self.calls += 1
            raise HpcTransportError("no route to host")

    hook = Unreachable(attempts=3, retry_delay=0.01)
    with pytest.raises(HpcTransportError, match="gave up after 3 attempts"):
        hook.submit("cluster_check", "k-1")
    assert hook.calls == 3


def test_retry_same_key_answer_is_resubmitted_with_the_same_key(site: SiteConfig) -> None:
    """The gateway answers RETRY_SAME_KEY when sbatch timed out and Slurm may hold the job:
    the hook submits again with the same key (never a new one), and other refusals are not
    retried."""
    sent: list[bytes] = []

    class SlowScheduler(HpcGatewayHook):
        def _call_local(self, verb: str, body: bytes) -> Any:
            sent.append(body)
            if len(sent) == 1:
                err = {"ok": False, "error": {"code": "RETRY_SAME_KEY", "message": "timed out"}}
                return _Raw(2, json.dumps(err).encode(), b"")
            return super()._call_local(verb, body)

    hook = SlowScheduler(attempts=3, retry_delay=0.01)
    reply = hook.submit("cluster_check", "k-same")
    assert reply.job_id == "k-same" and len(sent) == 2 and sent[0] == sent[1]
    assert _job_dirs(site) == ["k-same"]
    with pytest.raises(HpcGatewayError, match="BAD_PARAMS"):
        hook.submit("cluster_check", "k-bad", params={"sleep_s": -1})
    assert len(sent) == 3, "a refusal that is not RETRY_SAME_KEY is not repeated"
    for _ in range(200):
        if hook.status(["k-same"])[0].state.terminal:
            break
        time.sleep(0.1)


# -- 4. host keys: refused before any connection --------------------------------------------
@pytest.fixture()
def no_ssh(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every attempt to open an SSH connection (sync and async) and fails it."""
    from airflow.providers.ssh.hooks.ssh import SSHHook, SSHHookAsync

    attempts: list[str] = []

    def sync_conn(self: Any) -> Any:
        attempts.append("sync")
        raise OSError("connection refused")

    async def async_conn(self: Any) -> Any:
        attempts.append("async")
        raise OSError("connection refused")

    monkeypatch.setattr(SSHHook, "get_conn", sync_conn)
    monkeypatch.setattr(SSHHookAsync, "get_conn", async_conn)
    return attempts


WEAK_EXTRAS = [
    pytest.param({"host_key": HOST_KEY, "no_host_key_check": "true"}, "no_host_key_check",
                 id="no_host_key_check"),
    pytest.param({"host_key": HOST_KEY, "ignore_hostkey_verification": True},
                 "ignore_hostkey_verification", id="ignore_hostkey_verification"),
    pytest.param({"host_key": HOST_KEY, "allow_host_key_change": "true"},
                 "allow_host_key_change", id="allow_host_key_change"),
    pytest.param({"host_key": HOST_KEY, "known_hosts": "none"}, "known_hosts",
                 id="known_hosts_none"),
    pytest.param({"key_file": "/k"}, "ssh-keyscan -t ed25519 -p 2222 hpc.example.org",
                 id="no_host_key"),
    pytest.param({"host_key": "hpc.example.org " + HOST_KEY}, "TYPE BASE64",
                 id="keyscan_line_with_host"),
]


@pytest.mark.parametrize(("extra", "named"), WEAK_EXTRAS)
def test_unpinned_or_weakened_host_key_is_refused_before_connecting(
    monkeypatch: pytest.MonkeyPatch, no_ssh: list[str], extra: dict[str, Any], named: str
) -> None:
    _set_conn(monkeypatch, "omeflow_hk", {"conn_type": "ssh", "host": "hpc.example.org",
                                          "port": 2222, "login": "svc", "extra": extra})
    with pytest.raises(HpcConfigError, match="host_key") as sync_err:
        HpcGatewayHook("omeflow_hk").ping()
    assert named in str(sync_err.value)

    async def poll() -> None:
        client = AsyncGatewayClient("omeflow_hk")
        try:
            await client.status(["job-1"])
        finally:
            await client.close()

    with pytest.raises(HpcConfigError, match="host_key"):
        asyncio.run(poll())
    assert no_ssh == [], "no SSH connection was attempted"


def test_pinned_host_key_goes_through_to_ssh(
    monkeypatch: pytest.MonkeyPatch, no_ssh: list[str]
) -> None:
    _set_conn(monkeypatch, "omeflow_hk", {"conn_type": "ssh", "host": "hpc.example.org",
                                          "login": "svc", "extra": {"host_key": HOST_KEY,
                                                                    "no_host_key_check": False}})
    with pytest.raises(HpcTransportError, match="connection refused"):
        HpcGatewayHook("omeflow_hk").ping()
    assert no_ssh == ["sync"]


# -- 5. no silent fallback to local subprocesses ---------------------------------------------
def test_non_ssh_connection_without_explicit_local_is_refused(
    site: SiteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(site.job_root.parent / "site.toml")
    _set_conn(monkeypatch, "omeflow_hpc", {"conn_type": "generic", "extra": {"config": config}})
    with pytest.raises(HpcConfigError, match='"transport": "local"') as err:
        HpcGatewayHook().ping()
    assert "type ssh" in str(err.value)


def test_lookup_error_other_than_not_found_is_refused(
    site: SiteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(conn_id: str) -> Any:
        raise RuntimeError("secrets backend unreachable")

    monkeypatch.setattr(HpcGatewayHook, "get_connection", staticmethod(broken))
    with pytest.raises(HpcConfigError, match="secrets backend unreachable"):
        HpcGatewayHook().ping()


def test_missing_connection_without_the_setting_is_refused(
    site: SiteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__OMEFLOW__HPC_TRANSPORT", "ssh")
    with pytest.raises(HpcConfigError, match=r"hpc_transport = local") as err:
        HpcGatewayHook().ping()
    assert "'omeflow_hpc' does not exist" in str(err.value)


def test_bad_setting_is_refused(site: SiteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__OMEFLOW__HPC_TRANSPORT", "loca")
    with pytest.raises(HpcConfigError, match="'ssh'.*'local'"):
        HpcGatewayHook().ping()


def test_embedded_default_is_explicit_and_logged(
    site: SiteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hooks.hpc")
    hook = HpcGatewayHook()
    assert hook.ping().scheduler == "local"
    assert hook.transport == "local"
    logged = [r.getMessage() for r in caplog.records if r.name == "hooks.hpc"]
    assert any("embedded default" in m and str(site.job_root.parent) in m for m in logged), logged


def test_explicit_local_connection(site: SiteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__OMEFLOW__HPC_TRANSPORT", "ssh")  # not needed for a connection
    config = site.job_root.parent / "site.toml"
    _set_conn(monkeypatch, "omeflow_local",
              {"conn_type": "generic", "extra": {"transport": "local", "config": str(config)}})
    assert HpcGatewayHook("omeflow_local").ping().scheduler == "local"


# -- decode_reply ------------------------------------------------------------------------------
def test_decode_good_reply() -> None:
    out = b'{"ok": true, "job_id": "j-1", "state": "RUNNING"}\n'
    assert decode_reply("cancel", 0, b"noise before\n" + out, b"") == {
        "ok": True, "job_id": "j-1", "state": "RUNNING"}


def test_decode_error_reply() -> None:
    reply = {"ok": False, "error": {"code": "BAD_PARAMS", "message": "block_size: too small",
                                    "details": [{"loc": ["block_size"], "msg": "too small"}]}}
    with pytest.raises(HpcGatewayError) as err:
        decode_reply("submit", 2, json.dumps(reply).encode(), b"")
    assert (err.value.code, err.value.message) == ("BAD_PARAMS", "block_size: too small")
    assert err.value.details == [{"loc": ["block_size"], "msg": "too small"}]
    assert str(err.value) == "BAD_PARAMS: block_size: too small"


@pytest.mark.parametrize("stdout", [b"", b"bash: omeflow-gateway: not found", b"[1, 2]", b"{"])
def test_decode_garbage(stdout: bytes) -> None:
    with pytest.raises(HpcTransportError) as err:
        decode_reply("ping", 127, stdout, b"Permission denied (publickey)")
    message = str(err.value)
    assert "no JSON reply to 'ping' (exit 127)" in message
    assert "Permission denied (publickey)" in message
    assert "forced command" in message


@pytest.mark.parametrize(
    ("verb", "obj", "expected"),
    [
        ("status", {"ok": True, "jobs": [{"job_id": "j", "state": "NOPE"}]}, "malformed reply"),
        ("cancel", {"ok": True, "job_id": "j"}, "malformed reply"),
        ("submit", {"ok": False, "error": {"code": "WHAT", "message": "x"}}, "malformed error"),
        ("submit", {"ok": False}, "malformed error"),
    ],
)
def test_decode_malformed(verb: str, obj: dict[str, Any], expected: str) -> None:
    with pytest.raises(HpcTransportError, match=expected):
        decode_reply(verb, 0, json.dumps(obj).encode(), b"")
