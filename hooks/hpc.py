"""``HpcGatewayHook``: the Airflow side of the gateway protocol, one method per verb.

Two transports carry the same bytes:

- **ssh** (a connection of type ``ssh``): one exec of the verb per call over an SSH
  connection from ``apache-airflow-providers-ssh`` (``SSHHook``; ``SSHHookAsync`` in triggers).
  The key's ``authorized_keys`` line forces ``omeflow-gateway``, so the "command" we send is
  just the verb; the request body goes on stdin. The cluster's host key must be pinned with
  the extra ``host_key`` (``ssh-keyscan -t ed25519 HOST``); extras that weaken host key
  checking are refused before any connection is made.
- **local**: runs ``omeflow-gateway --config <site.toml>`` as a subprocess with
  ``SSH_ORIGINAL_COMMAND`` set, exactly as sshd would; only by explicit choice (below).

How the connection ``hpc_conn_id`` selects the transport (every refusal raises
:class:`HpcConfigError` naming the fix, before anything connects or runs):

- type ``ssh`` with a pinned ``host_key`` → ssh. Refused: no ``host_key`` (the fix names
  ``ssh-keyscan -t ed25519 HOST``), or any of ``no_host_key_check``,
  ``ignore_hostkey_verification``, ``allow_host_key_change`` (unless false) or
  ``known_hosts: none``.
- any other type with the extras ``{"transport": "local", "config": "site.toml"}`` → local
  with that site file (extra ``gateway``: the executable, default: next to this Python).
  Without them: refused.
- ``omeflow_hpc`` not found (``AirflowNotFoundException``) → the embedded default (local,
  ``$OMEFLOW_SITE_CONFIG`` or ``var/site.toml``, logged) only if ``[omeflow] hpc_transport =
  local`` (``AIRFLOW__OMEFLOW__HPC_TRANSPORT``); refused when it is ``ssh`` (the default).
- any other lookup error → refused (never a local fallback).

``submit`` and ``cancel`` are retried inside the same call on transport errors (bounded,
with back-off): both are idempotent, so a lost reply never becomes a second job.

SSH connections are reused: a sync hook keeps its connection for all its calls (one task run),
and every :class:`AsyncGatewayClient` of one event loop (the triggerer's) shares one connection
per Airflow connection id, kept open :data:`SSH_IDLE_CLOSE_S` seconds after its last user closed
so the next job's poll needs no handshake. :data:`STATS` counts connections and calls
(benchmarks read it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from airflow.sdk.bases.hook import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from pydantic import BaseModel, ValidationError

from hpc_jobs.protocol import (
    REPLY_MODELS,
    CancelReply,
    ErrorCode,
    ErrorReply,
    JobStatus,
    LogReply,
    PingReply,
    QueueReply,
    ResultReply,
    StatusReply,
    SubmitReply,
)

DEFAULT_CONN_ID = "omeflow_hpc"
#: ``[omeflow] hpc_transport``: ``ssh`` (default: a connection is required) or ``local`` (a
#: missing ``omeflow_hpc`` connection means the embedded default on this machine).
TRANSPORT_SETTING = ("omeflow", "hpc_transport")
#: Connection extras that turn host key checking off or let a changed key through.
HOST_KEY_WEAKENERS = ("no_host_key_check", "ignore_hostkey_verification", "allow_host_key_change")
#: Host key types a pinned ``host_key`` may have (what ``ssh-keyscan -t`` prints).
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
#: Attempts of one idempotent call (submit, cancel) on transport errors, and the first delay.
CALL_ATTEMPTS = 4
RETRY_DELAY_S = 2.0
MAX_RETRY_DELAY_S = 30.0
#: Seconds a shared async SSH connection stays open after its last client closed (the next
#: job's trigger then polls without a new handshake; sshd's MaxStartups throttles handshakes).
SSH_IDLE_CLOSE_S = 60.0
#: Most gateway calls in flight on one shared SSH connection (OpenSSH's MaxSessions defaults
#: to 10 channels per connection; more would be refused, e.g. a burst of give-up cancels).
MAX_CHANNELS = 8
R = TypeVar("R", bound=BaseModel)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayEvent:
    """One SSH connection set-up (``verb`` empty) or one gateway call, with wall-clock bounds
    (``time.time()``) and the side that made it (``sync`` hook or ``async`` client)."""

    kind: str
    side: str
    verb: str
    start: float
    end: float


@dataclass
class GatewayStats:
    """Process-wide counts of gateway traffic: SSH connections opened, calls per verb, and the
    latest events (bounded), for benchmarks and logs. Recording costs a few appends."""

    ssh_connects: int = 0
    ssh_connect_s: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    events: deque[GatewayEvent] = field(default_factory=lambda: deque(maxlen=100_000))

    def record(self, kind: str, side: str, verb: str, start: float) -> None:
        """Record an event that started at ``start`` (``time.time()``) and ends now."""
        end = time.time()
        if kind == "connect":
            self.ssh_connects += 1
            self.ssh_connect_s += end - start
        else:
            self.calls[verb] += 1
        self.events.append(GatewayEvent(kind, side, verb, start, end))

    def reset(self) -> None:
        self.ssh_connects, self.ssh_connect_s = 0, 0.0
        self.calls.clear()
        self.events.clear()


#: The gateway traffic of this process.
STATS = GatewayStats()


class HpcGatewayError(Exception):
    """The gateway refused a request (its JSON error code and message)."""

    def __init__(self, code: str, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or []


class HpcTransportError(Exception):
    """The gateway could not be reached or did not answer with JSON (worth a retry)."""


class HpcConfigError(Exception):
    """The gateway connection is missing or unsafe; the message names the fix (no retry)."""


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


def _local_argv(config: Path, gateway: str | None) -> list[str]:
    """argv of a local gateway process: ``gateway`` (or ``omeflow-gateway`` next to this
    Python, else ``python -m hpc_jobs.gateway``) with ``--config``."""
    gateway = gateway or shutil.which("omeflow-gateway", path=str(Path(sys.executable).parent))
    if gateway:
        return [str(gateway), "--config", str(config)]
    return [sys.executable, "-m", "hpc_jobs.gateway", "--config", str(config)]


def embedded_site_config() -> Path:
    """The embedded default's site file: ``$OMEFLOW_SITE_CONFIG``, else ``var/site.toml``
    under ``$AIRFLOW_HOME`` (created if missing; see :mod:`hpc_jobs.embedded`)."""
    from hpc_jobs.embedded import embedded_site_path

    return embedded_site_path()


def embedded_default_enabled() -> bool:
    """True when ``[omeflow] hpc_transport = local``: a missing ``omeflow_hpc`` connection
    then means the embedded default. Any other value than ``ssh`` / ``local`` is refused."""
    from airflow.configuration import conf

    section, key = TRANSPORT_SETTING
    value = str(conf.get(section, key, fallback="ssh")).strip().lower()
    if value not in ("ssh", "local"):
        raise HpcConfigError(
            f"[{section}] {key} = {value!r} is not a transport; set it to 'ssh' (a cluster "
            f"through the connection {DEFAULT_CONN_ID!r}) or 'local' (the embedded default)"
        )
    return value == "local"


def check_ssh_extras(conn_id: str, conn: Any) -> None:
    """Refuse an ssh connection whose host key is not pinned or whose extras weaken host key
    checking (the extras ``SSHHook`` and ``SSHHookAsync`` read). Raises :class:`HpcConfigError`."""
    extra = conn.extra_dejson
    host = conn.host or "HOST"
    port = f"-p {conn.port} " if conn.port and int(conn.port) != 22 else ""
    keyscan = f"ssh-keyscan -t ed25519 {port}{host}"
    for name in HOST_KEY_WEAKENERS:
        if name in extra and str(extra[name]).strip().lower() != "false":
            raise HpcConfigError(
                f"connection {conn_id!r} sets the extra {name}={extra[name]!r}, which weakens "
                "host key checking; remove it and pin the cluster's key with the extra host_key "
                f"(from `{keyscan}`)"
            )
    if "known_hosts" in extra and str(extra["known_hosts"]).strip().lower() in ("none", ""):
        raise HpcConfigError(
            f"connection {conn_id!r} sets the extra known_hosts={extra['known_hosts']!r}, which "
            "turns host key checking off; remove it and pin the cluster's key with the extra "
            f"host_key (from `{keyscan}`)"
        )
    host_key = str(extra.get("host_key") or "").split()
    if not host_key:
        raise HpcConfigError(
            f"connection {conn_id!r} has no pinned host key; run `{keyscan}` on a trusted "
            'network and set the extra host_key to its key part ("ssh-ed25519 AAAA...")'
        )
    if len(host_key) != 2 or host_key[0] not in HOST_KEY_TYPES:
        raise HpcConfigError(
            f"connection {conn_id!r}: the extra host_key must be 'TYPE BASE64' with TYPE one of "
            f"{', '.join(HOST_KEY_TYPES)} (the output of `{keyscan}` without the host name)"
        )


class HpcGatewayHook(BaseHook):
    """Talks to ``omeflow-gateway`` on a cluster (SSH) or on this machine (subprocess).

    :param hpc_conn_id: Airflow connection id (see the module docstring for how it selects
        the transport). Type ``ssh``: host, port, login, extras ``key_file``/``private_key``
        and ``host_key`` (required). Local: extras ``transport: local`` and ``config``.
    :param timeout: seconds one gateway call may take.
    :param attempts: tries of an idempotent call (submit, cancel) on transport errors.
    :param retry_delay: seconds before the second try; doubles per try, capped at
        :data:`MAX_RETRY_DELAY_S`.
    """

    conn_name_attr = "hpc_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "ssh"
    hook_name = "omeflow HPC gateway"

    def __init__(
        self,
        hpc_conn_id: str = DEFAULT_CONN_ID,
        timeout: float = 120.0,
        attempts: int = CALL_ATTEMPTS,
        retry_delay: float = RETRY_DELAY_S,
    ) -> None:
        super().__init__()
        self.hpc_conn_id = hpc_conn_id
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay
        self._ssh_client: Any = None
        self._transport: str | None = None
        self._local_argv: list[str] | None = None

    # -- transport selection ----------------------------------------------------------------
    def _resolve(self) -> str:
        if self._transport is not None:
            return self._transport
        try:
            conn = self.get_connection(self.hpc_conn_id)
        except AirflowNotFoundException:
            conn = None
        except Exception as exc:  # noqa: BLE001 - any other failure must not mean "local"
            raise HpcConfigError(
                f"could not look up the Airflow connection {self.hpc_conn_id!r}: "
                f"{type(exc).__name__}: {exc}; fix the secrets backend or metadata DB access "
                "(jobs never fall back to this machine on a lookup error)"
            ) from exc
        if conn is None:
            self._local_argv = self._embedded_argv()
            self._transport = "local"
        elif conn.conn_type == "ssh":
            transport = str(conn.extra_dejson.get("transport", "ssh")).lower()
            if transport != "ssh":
                raise HpcConfigError(
                    f"connection {self.hpc_conn_id!r} is of type ssh but its extra transport is "
                    f"{transport!r}; remove that extra, or use a non-ssh connection for a local "
                    "gateway"
                )
            check_ssh_extras(self.hpc_conn_id, conn)
            self._transport = "ssh"
        else:
            extra = conn.extra_dejson
            if str(extra.get("transport", "")).lower() != "local" or not extra.get("config"):
                raise HpcConfigError(
                    f"connection {self.hpc_conn_id!r} has type {conn.conn_type!r}, which is not a "
                    "gateway connection; make it type ssh (host, port, login, extras key_file and "
                    'host_key), or, to run the gateway on this machine, give it the extras '
                    '{"transport": "local", "config": "/path/to/site.toml"}'
                )
            self._local_argv = _local_argv(Path(extra["config"]), extra.get("gateway"))
            log.info(
                "connection %r runs the gateway locally with %s", self.hpc_conn_id, extra["config"]
            )
            self._transport = "local"
        return self._transport

    def _embedded_argv(self) -> list[str]:
        """argv of the embedded default, if the settings allow it for this connection id."""
        section, key = TRANSPORT_SETTING
        if self.hpc_conn_id != DEFAULT_CONN_ID:
            raise HpcConfigError(
                f"Airflow connection {self.hpc_conn_id!r} does not exist; create it (type ssh "
                'with extras key_file and host_key, or {"transport": "local", "config": '
                '"site.toml"} for a gateway on this machine)'
            )
        if not embedded_default_enabled():
            raise HpcConfigError(
                f"Airflow connection {DEFAULT_CONN_ID!r} does not exist; create it (type ssh, "
                "extras key_file and host_key) to run jobs on a cluster, or set "
                f"[{section}] {key} = local in airflow.cfg (AIRFLOW__OMEFLOW__HPC_TRANSPORT=local)"
                " to run them on this machine with the embedded default"
            )
        config = embedded_site_config()
        log.info(
            "no connection %r and [%s] %s = local: jobs run on this machine (embedded default, "
            "site file %s)",
            DEFAULT_CONN_ID,
            section,
            key,
            config,
        )
        return _local_argv(config, None)

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

            started = time.time()
            self._ssh_client = SSHHook(
                ssh_conn_id=self.hpc_conn_id, cmd_timeout=self.timeout
            ).get_conn()
            STATS.record("connect", "sync", "", started)
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
        started = time.time()
        raw = (
            self._call_ssh(verb, body) if self.transport == "ssh" else self._call_local(verb, body)
        )
        STATS.record("call", "sync", verb, started)
        return decode_reply(verb, raw.status, raw.stdout, raw.stderr)

    def call_idempotent(self, verb: str, request: dict[str, Any]) -> dict[str, Any]:
        """:meth:`call`, tried again with the same request on transport errors (up to
        ``attempts`` times, back-off from ``retry_delay``). Only for verbs where a repeat is
        harmless: ``submit`` (same job key: the gateway returns the job it already created)
        and ``cancel``. A gateway answer ``RETRY_SAME_KEY`` (the scheduler timed out and may
        hold the job) is retried the same way."""
        delay = self.retry_delay
        for attempt in range(1, self.attempts):
            try:
                return self.call(verb, request)
            except (HpcTransportError, HpcGatewayError) as exc:
                if isinstance(exc, HpcGatewayError) and exc.code != ErrorCode.RETRY_SAME_KEY.value:
                    raise
                log.warning(
                    "gateway %s failed (attempt %d of %d), trying again in %.1f s: %s",
                    verb, attempt, self.attempts, delay, exc,
                )
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_S)
        try:
            return self.call(verb, request)
        except HpcTransportError as exc:
            raise HpcTransportError(
                f"{exc} (gave up after {self.attempts} attempts with the same request)"
            ) from exc

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
        """Submit one step (idempotent on ``job_key``: a lost reply is retried with the same key
        and the gateway answers ``created=False`` for the job it already started)."""
        request = {
            "step": step,
            "job_key": job_key,
            "params": params or {},
            "resources": resources or {},
            "secrets": secrets or {},
        }
        return SubmitReply.model_validate(self.call_idempotent("submit", request))

    def status(self, job_ids: Sequence[str]) -> list[JobStatus]:
        """Status of many jobs in one call."""
        return self._typed("status", StatusReply, {"job_ids": list(job_ids)}).jobs

    def cancel(self, job_id: str, by: str | None = None) -> CancelReply:
        """Cancel a job (a no-op for finished jobs; retried on transport errors). ``by``: the
        person who asked (recorded; the job's reason then says "cancelled by <by>")."""
        request: dict[str, Any] = {"job_id": job_id}
        if by is not None:
            request["by"] = by
        return CancelReply.model_validate(self.call_idempotent("cancel", request))

    def queue(self) -> QueueReply:
        """The scheduler's pending and running jobs of this caller."""
        return self._typed("queue", QueueReply)

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


class _SharedSsh:
    """One asyncssh connection per (event loop, Airflow connection id), shared by every
    :class:`AsyncGatewayClient` of that loop. Clients take a lease and release it on
    ``close()``; the connection closes :data:`SSH_IDLE_CLOSE_S` seconds after the last lease
    ended (or when the loop shuts down), and at once when a call on it failed."""

    _pool: dict[tuple[asyncio.AbstractEventLoop, str], _SharedSsh] = {}

    def __init__(self, hpc_conn_id: str) -> None:
        self.hpc_conn_id = hpc_conn_id
        self.conn: Any = None
        self.users = 0
        self._lock = asyncio.Lock()
        #: limits the calls in flight on the connection to :data:`MAX_CHANNELS`
        self.channels = asyncio.Semaphore(MAX_CHANNELS)
        self._generation = 0
        self._closer: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, hpc_conn_id: str) -> _SharedSsh:
        """The shared connection slot of the running loop for ``hpc_conn_id``."""
        loop = asyncio.get_running_loop()
        for stale in [k for k in cls._pool if k[0].is_closed()]:
            del cls._pool[stale]
        key = (loop, hpc_conn_id)
        if key not in cls._pool:
            cls._pool[key] = cls(hpc_conn_id)
        return cls._pool[key]

    def acquire(self) -> None:
        self.users += 1
        self._generation += 1
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None

    def release(self) -> None:
        self.users = max(0, self.users - 1)
        if self.users == 0 and self.conn is not None:
            self._generation += 1
            self._closer = asyncio.get_running_loop().create_task(
                self._close_when_idle(self._generation)
            )

    async def _close_when_idle(self, generation: int) -> None:
        try:
            await asyncio.sleep(SSH_IDLE_CLOSE_S)
        finally:  # also when the loop shuts down and cancels this task
            if self.users == 0 and self._generation == generation:
                self.drop(self.conn)

    async def connection(self, timeout: float) -> Any:
        """The open connection, connecting first if there is none (one handshake at a time)."""
        async with self._lock:
            if self.conn is None or self.conn.is_closed():
                from airflow.providers.ssh.hooks.ssh import SSHHookAsync

                started = time.time()
                self.conn = await asyncio.wait_for(
                    SSHHookAsync(ssh_conn_id=self.hpc_conn_id).get_conn(), timeout
                )
                STATS.record("connect", "async", "", started)
            return self.conn

    def drop(self, conn: Any) -> None:
        """Close ``conn`` if it is still the shared one (a failed call: reconnect next time)."""
        if conn is not None and conn is self.conn:
            self.conn = None
            conn.close()


class AsyncGatewayClient:
    """Async gateway calls for triggers over one SSH connection shared by every client of the
    event loop (see :class:`_SharedSsh`); a failed call drops it and the next call reconnects.

    sshd throttles new connections (MaxStartups), so all polls, all jobs and the cancels of
    one triggerer reuse one ``asyncssh`` connection from ``SSHHookAsync``; the local transport
    uses an async subprocess per call.

    :param hpc_conn_id: Airflow connection id (as for :class:`HpcGatewayHook`).
    :param timeout: seconds one call (or one connection set-up) may take.
    """

    def __init__(self, hpc_conn_id: str = DEFAULT_CONN_ID, timeout: float = 120.0) -> None:
        self.hpc_conn_id = hpc_conn_id
        self.timeout = timeout
        self._sync = HpcGatewayHook(hpc_conn_id, timeout)
        self._shared: _SharedSsh | None = None
        #: gateway calls made by this client
        self.calls = 0

    async def _ssh_conn(self) -> Any:
        if self._shared is None:
            self._shared = _SharedSsh.of(self.hpc_conn_id)
            self._shared.acquire()
        return await self._shared.connection(self.timeout)

    async def call(self, verb: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps(request or {}).encode()
        transport = self._sync._transport or await asyncio.to_thread(self._sync._resolve)
        self.calls += 1
        started = time.time()
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
            STATS.record("call", "async", verb, started)
            return decode_reply(verb, proc.returncode or 0, out, err)
        conn = None
        try:
            conn = await self._ssh_conn()
            assert self._shared is not None
            async with self._shared.channels:
                result = await asyncio.wait_for(
                    conn.run(verb, input=body, encoding=None, check=False), self.timeout
                )
        except Exception as exc:  # noqa: BLE001 - asyncssh raises many types; all mean "retry"
            if self._shared is not None:
                self._shared.drop(conn or self._shared.conn)
            raise HpcTransportError(f"SSH call {verb!r} failed: {exc}") from exc
        STATS.record("call", "async", verb, started)
        return decode_reply(
            verb, result.exit_status or 0, result.stdout or b"", result.stderr or b""
        )

    async def status(self, job_ids: Sequence[str]) -> list[JobStatus]:
        reply = await self.call("status", {"job_ids": list(job_ids)})
        return StatusReply.model_validate(reply).jobs

    async def cancel(self, job_id: str, by: str | None = None) -> CancelReply:
        request: dict[str, Any] = {"job_id": job_id}
        if by is not None:
            request["by"] = by
        return CancelReply.model_validate(await self.call("cancel", request))

    async def close(self) -> None:
        """Release this client's share of the connection (it closes once idle)."""
        if self._shared is not None:
            shared, self._shared = self._shared, None
            shared.release()
