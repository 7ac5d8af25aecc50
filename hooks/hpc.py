"""``HpcGatewayHook``: the Airflow side of the gateway protocol, one method per verb.

Two transports carry the same bytes:

- **ssh** (a connection of type ``ssh``): one exec of the verb per call over an SSH
  connection from ``apache-airflow-providers-ssh`` (``SSHHook``; ``SSHHookAsync`` in triggers).
  The key's ``authorized_keys`` line forces ``omeflow-gateway``, so the "command" we send is
  just the verb; the request body goes on stdin. Pin the cluster's host key with the
  connection extra ``host_key`` (the hook refuses ``no_host_key_check``).
- **local** (any other connection type, or no connection: the embedded default): runs
  ``omeflow-gateway --config <site.toml>`` as a subprocess with ``SSH_ORIGINAL_COMMAND`` set,
  exactly as sshd would.

Connection extras (both transports): ``config`` — site file for the local transport;
``gateway`` — the gateway executable for the local transport (default: the one next to
this Python).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from airflow.sdk.bases.hook import BaseHook
from pydantic import BaseModel, ValidationError

from hpc_jobs.protocol import (
    REPLY_MODELS,
    CancelReply,
    ErrorReply,
    JobStatus,
    LogReply,
    PingReply,
    ResultReply,
    StatusReply,
    SubmitReply,
)

DEFAULT_CONN_ID = "omeflow_hpc"
R = TypeVar("R", bound=BaseModel)


class HpcGatewayError(Exception):
    """The gateway refused a request (its JSON error code and message)."""

    def __init__(self, code: str, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or []


class HpcTransportError(Exception):
    """The gateway could not be reached or did not answer with JSON (worth a retry)."""


@dataclass(frozen=True)
class _Raw:
    status: int
    stdout: bytes
    stderr: bytes


def gateway_env(verb: str) -> dict[str, str]:
    """Environment of a local gateway process: what sshd would give it (the verb in
    ``SSH_ORIGINAL_COMMAND``), without Airflow's own settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["SSH_ORIGINAL_COMMAND"] = verb
    return env


def embedded_site_config() -> Path:
    """The embedded default's site file: ``$OMEFLOW_SITE_CONFIG``, else created under
    ``$AIRFLOW_HOME/var`` (local scheduler, local store, this Python)."""
    env = os.environ.get("OMEFLOW_SITE_CONFIG")
    if env:
        return Path(env)
    from hpc_jobs.config import SiteConfig

    home = Path(os.environ.get("AIRFLOW_HOME", Path.cwd()))
    var = home / "var"
    path = var / "site.toml"
    if not path.exists():
        site = SiteConfig.local(var)
        for sub in ("jobs", "data", "store"):
            (var / sub).mkdir(parents=True, exist_ok=True)
        path.write_text(site.to_toml())
    return path


class HpcGatewayHook(BaseHook):
    """Talks to ``omeflow-gateway`` on a cluster (SSH) or on this machine (subprocess).

    :param hpc_conn_id: Airflow connection id. Type ``ssh``: SSH transport (host, port, login,
        extras ``key_file``/``private_key`` and ``host_key``). Any other type: local transport
        with extra ``config``. A missing ``omeflow_hpc`` connection means the embedded default.
    :param timeout: seconds one gateway call may take.
    """

    conn_name_attr = "hpc_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "ssh"
    hook_name = "omeflow HPC gateway"

    def __init__(self, hpc_conn_id: str = DEFAULT_CONN_ID, timeout: float = 120.0) -> None:
        super().__init__()
        self.hpc_conn_id = hpc_conn_id
        self.timeout = timeout
        self._ssh_client: Any = None
        self._transport: str | None = None
        self._local_argv: list[str] | None = None

    # -- transport selection ----------------------------------------------------------------
    def _resolve(self) -> str:
        if self._transport is not None:
            return self._transport
        conn = None
        try:
            conn = self.get_connection(self.hpc_conn_id)
        except Exception:  # noqa: BLE001 - Airflow raises different types per version
            if self.hpc_conn_id != DEFAULT_CONN_ID:
                raise HpcTransportError(
                    f"Airflow connection {self.hpc_conn_id!r} does not exist; create it (type "
                    'ssh for a cluster, or any type with extra {"config": "site.toml"} for '
                    "a local gateway)"
                ) from None
        if conn is not None and conn.conn_type == "ssh":
            extra = conn.extra_dejson
            if str(extra.get("no_host_key_check", "false")).lower() == "true":
                raise HpcTransportError(
                    f"connection {self.hpc_conn_id!r} disables host key checking; pin the "
                    "cluster's key with the extra host_key (ssh-keyscan -t ed25519 HOST)"
                )
            self._transport = "ssh"
        else:
            extra = conn.extra_dejson if conn is not None else {}
            config = Path(extra["config"]) if "config" in extra else embedded_site_config()
            gateway = extra.get("gateway") or shutil.which(
                "omeflow-gateway", path=str(Path(sys.executable).parent)
            )
            if gateway:
                self._local_argv = [str(gateway), "--config", str(config)]
            else:
                self._local_argv = [
                    sys.executable,
                    "-m",
                    "hpc_jobs.gateway",
                    "--config",
                    str(config),
                ]
            self._transport = "local"
        return self._transport

    @property
    def transport(self) -> str:
        return self._resolve()

    # -- raw calls ---------------------------------------------------------------------------
    def _call_local(self, verb: str, body: bytes) -> _Raw:
        assert self._local_argv is not None
        try:
            proc = subprocess.run(
                self._local_argv,
                input=body,
                capture_output=True,
                env=gateway_env(verb),
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HpcTransportError(f"local gateway did not answer: {exc}") from exc
        return _Raw(proc.returncode, proc.stdout, proc.stderr)

    def _ssh(self) -> Any:
        if (
            self._ssh_client is None
            or not self._ssh_client.get_transport()
            or not (self._ssh_client.get_transport().is_active())
        ):
            from airflow.providers.ssh.hooks.ssh import SSHHook

            self._ssh_client = SSHHook(
                ssh_conn_id=self.hpc_conn_id, cmd_timeout=self.timeout
            ).get_conn()
        return self._ssh_client

    def _call_ssh(self, verb: str, body: bytes) -> _Raw:
        import paramiko

        try:
            channel = self._ssh().get_transport().open_session(timeout=self.timeout)
            channel.settimeout(self.timeout)
            channel.exec_command(verb)
            channel.sendall(body)
            channel.shutdown_write()
            out = bytearray()
            err = bytearray()
            while True:
                chunk = channel.recv(65536)
                if not chunk:
                    break
                out += chunk
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            status = channel.recv_exit_status()
            channel.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise HpcTransportError(f"SSH call {verb!r} to the cluster failed: {exc}") from exc
        return _Raw(status, bytes(out), bytes(err))

    def close(self) -> None:
        """Close the cached SSH connection (if any)."""
        if self._ssh_client is not None:
            try:
                self._ssh_client.close()
            finally:
                self._ssh_client = None

    def call(self, verb: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """One gateway call; returns the reply object or raises HpcGatewayError."""
        body = json.dumps(request or {}).encode()
        raw = (
            self._call_ssh(verb, body) if self.transport == "ssh" else self._call_local(verb, body)
        )
        return decode_reply(verb, raw.status, raw.stdout, raw.stderr)

    def _typed(self, verb: str, model: type[R], request: dict[str, Any] | None = None) -> R:
        return model.model_validate(self.call(verb, request))

    # -- verbs -------------------------------------------------------------------------------
    def ping(self) -> PingReply:
        """Gateway version, scheduler and the steps this cluster offers."""
        return self._typed("ping", PingReply)

    def submit(
        self,
        step: str,
        job_key: str,
        params: dict[str, Any] | None = None,
        resources: dict[str, Any] | None = None,
        secrets: dict[str, str] | None = None,
    ) -> SubmitReply:
        """Submit one step (idempotent on ``job_key``)."""
        request = {
            "step": step,
            "job_key": job_key,
            "params": params or {},
            "resources": resources or {},
            "secrets": secrets or {},
        }
        return self._typed("submit", SubmitReply, request)

    def status(self, job_ids: Sequence[str]) -> list[JobStatus]:
        """Status of many jobs in one call."""
        return self._typed("status", StatusReply, {"job_ids": list(job_ids)}).jobs

    def cancel(self, job_id: str) -> CancelReply:
        """Cancel a job (a no-op for finished jobs)."""
        return self._typed("cancel", CancelReply, {"job_id": job_id})

    def log(self, job_id: str, offset: int = 0, max_bytes: int = 65536) -> LogReply:
        """A piece of the job log; a negative offset reads its last ``-offset`` bytes."""
        return self._typed(
            "log", LogReply, {"job_id": job_id, "offset": offset, "max_bytes": max_bytes}
        )

    def result(self, job_id: str, name: str = "summary.json") -> ResultReply:
        """A small output file of the job (``summary.json`` by default)."""
        return self._typed("result", ResultReply, {"job_id": job_id, "name": name})


def decode_reply(verb: str, status: int, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    """Turn the gateway's stdout into a reply dict, or raise a clear error."""
    text = stdout.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text.splitlines()[-1]) if text else None
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise HpcTransportError(
            f"gateway gave no JSON reply to {verb!r} (exit {status}); stderr: "
            f"{stderr.decode('utf-8', errors='replace')[-500:] or '(empty)'}; is the key's "
            "forced command omeflow-gateway and the cluster side installed?"
        )
    if obj.get("ok") is False:
        try:
            err = ErrorReply.model_validate(obj).error
        except ValidationError:
            raise HpcTransportError(f"malformed error reply to {verb!r}: {text[:500]}") from None
        raise HpcGatewayError(err.code.value, err.message, list(err.details))
    try:
        REPLY_MODELS[verb].model_validate(obj)
    except ValidationError as exc:
        raise HpcTransportError(f"malformed reply to {verb!r}: {exc}") from None
    return obj


class AsyncGatewayClient:
    """Async gateway calls for triggers: one long-lived SSH connection, reconnect with backoff.

    sshd throttles new connections (MaxStartups), so all calls of a poll loop reuse one
    ``asyncssh`` connection from ``SSHHookAsync``; the local transport uses an async subprocess.
    """

    def __init__(self, hpc_conn_id: str = DEFAULT_CONN_ID, timeout: float = 120.0) -> None:
        self.hpc_conn_id = hpc_conn_id
        self.timeout = timeout
        self._sync = HpcGatewayHook(hpc_conn_id, timeout)
        self._conn: Any = None
        self.calls = 0

    async def _ssh_conn(self) -> Any:
        if self._conn is None:
            from airflow.providers.ssh.hooks.ssh import SSHHookAsync

            self._conn = await SSHHookAsync(ssh_conn_id=self.hpc_conn_id).get_conn()
        return self._conn

    async def call(self, verb: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps(request or {}).encode()
        transport = self._sync._transport or await asyncio.to_thread(self._sync._resolve)
        self.calls += 1
        if transport == "local":
            assert self._sync._local_argv is not None
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._sync._local_argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=gateway_env(verb),
                )
                out, err = await asyncio.wait_for(proc.communicate(body), self.timeout)
            except (OSError, TimeoutError) as exc:
                raise HpcTransportError(f"local gateway did not answer: {exc}") from exc
            return decode_reply(verb, proc.returncode or 0, out, err)
        try:
            conn = await self._ssh_conn()
            result = await asyncio.wait_for(
                conn.run(verb, input=body, encoding=None, check=False), self.timeout
            )
        except Exception as exc:  # noqa: BLE001 - asyncssh raises many types; all mean "retry"
            await self.close()
            raise HpcTransportError(f"SSH call {verb!r} failed: {exc}") from exc
        return decode_reply(
            verb, result.exit_status or 0, result.stdout or b"", result.stderr or b""
        )

    async def status(self, job_ids: Sequence[str]) -> list[JobStatus]:
        reply = await self.call("status", {"job_ids": list(job_ids)})
        return StatusReply.model_validate(reply).jobs

    async def cancel(self, job_id: str) -> CancelReply:
        return CancelReply.model_validate(await self.call("cancel", {"job_id": job_id}))

    async def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
