"""SSH connection reuse of the gateway hook, against a real SSH server on loopback.

The server is ``asyncssh``'s (a real handshake per connection, host key pinned by the hook,
client key authorized); each exec runs the real gateway code (``hpc_jobs.gateway.handle``) on a
local site, as the forced command would. The server counts connections, so the tests see what
sshd on a cluster would see.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

import hooks.hpc as hpc
from hooks.hpc import (
    MAX_CHANNELS,
    STATS,
    AsyncGatewayClient,
    HpcGatewayHook,
    HpcTransportError,
)
from hpc_jobs.config import SiteConfig
from hpc_jobs.gateway import handle

CONN_ID = "omeflow_reuse"


class _GatewayServer:
    """An SSH server on 127.0.0.1 whose every exec is a gateway call; counts connections."""

    def __init__(self, site_toml: Path) -> None:
        self.site_toml = site_toml
        self.opened = 0
        self.open_now = 0
        self.conns: list[asyncssh.SSHServerConnection] = []
        self.execs_now = 0
        self.most_execs = 0
        self.loop = asyncio.new_event_loop()
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _close() -> None:
            self._server.close()
            for conn in self.conns:
                conn.close()

        asyncio.run_coroutine_threadsafe(_close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def drop_all(self) -> None:
        """Cut every open connection from the server side (a restarted sshd, a lost link)."""
        async def _drop() -> None:
            for conn in self.conns:
                conn.abort()

        asyncio.run_coroutine_threadsafe(_drop(), self.loop).result(10)

    async def _listen(self) -> Any:
        outer = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                outer.opened += 1
                outer.open_now += 1
                outer.conns.append(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                outer.open_now -= 1

        authorized = asyncssh.import_authorized_keys(
            self.client_key.export_public_key().decode())
        return await asyncssh.create_server(
            Server, "127.0.0.1", 0, server_host_keys=[self.host_key],
            authorized_client_keys=authorized, process_factory=self._exec, encoding=None,
        )

    async def _exec(self, process: asyncssh.SSHServerProcess) -> None:
        self.execs_now += 1
        self.most_execs = max(self.most_execs, self.execs_now)
        try:
            body = await process.stdin.read()
            reply, status = await asyncio.to_thread(handle, process.command, body,
                                                    self.site_toml)
            process.stdout.write(json.dumps(reply).encode() + b"\n")
            process.exit(status)
        finally:
            self.execs_now -= 1

    def wait_open_now(self, expected: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.open_now != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.open_now


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_GatewayServer]:
    site_toml = tmp_path / "site.toml"
    site_toml.write_text(SiteConfig.local(tmp_path).to_toml())
    srv = _GatewayServer(site_toml)
    srv.start()
    key_file = tmp_path / "id_ed25519"
    key_file.write_bytes(srv.client_key.export_private_key())
    key_file.chmod(0o600)
    host_key = srv.host_key.export_public_key().decode().split()
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({
        "conn_type": "ssh", "host": "127.0.0.1", "port": srv.port, "login": "svc",
        "extra": {"key_file": str(key_file), "host_key": f"{host_key[0]} {host_key[1]}"},
    }))
    yield srv
    srv.stop()


def test_sync_hook_reuses_one_connection_for_all_its_calls(server: _GatewayServer) -> None:
    """One task run (one hook): submit, status, log, result all go over one SSH connection."""
    hook = HpcGatewayHook(CONN_ID)
    assert hook.ping().ok
    assert hook.status(["job-1"])[0].state.value == "UNKNOWN"
    assert hook.ping().ok
    assert server.opened == 1, f"{server.opened} SSH connections for 3 calls of one hook"
    hook.close()
    assert server.wait_open_now(0) == 0


def test_async_clients_of_one_loop_share_one_connection_across_jobs(
    server: _GatewayServer,
) -> None:
    """The triggerer: a poller's client, a second connection's poller, an on_kill cancel, and
    the next job's poller after the first closed, all over ONE SSH connection."""

    async def scenario() -> list[int]:
        first, second = AsyncGatewayClient(CONN_ID), AsyncGatewayClient(CONN_ID)
        await first.status(["job-1"])
        await asyncio.gather(second.status(["job-2"]), first.status(["job-1", "job-2"]))
        seen = [server.opened]
        await first.close()  # the first job's poller is done
        await second.status(["job-2"])
        await second.close()  # no user left: the connection stays open while idle
        seen.append(server.open_now)
        later = AsyncGatewayClient(CONN_ID)  # the next job's poller, within the idle period
        reply = await later.call("ping")
        assert reply["ok"] is True
        await later.close()
        seen.append(server.opened)
        return seen

    opened_while_polling, open_after_last_close, opened_in_all = asyncio.run(scenario())
    assert opened_while_polling == 1, "two clients of one loop opened their own connections"
    assert open_after_last_close == 1, "the connection closed as soon as its last user left"
    assert opened_in_all == 1, "the next job's poll made a new SSH handshake"
    # the loop ended: the idle connection is closed with it, not leaked
    assert server.wait_open_now(0) == 0


def test_idle_connection_closes_and_the_next_call_reconnects(
    server: _GatewayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hpc, "SSH_IDLE_CLOSE_S", 0.2)

    async def scenario() -> tuple[int, int]:
        client = AsyncGatewayClient(CONN_ID)
        await client.status(["job-1"])
        await client.close()
        await asyncio.to_thread(server.wait_open_now, 0)
        closed_when_idle = server.open_now
        again = AsyncGatewayClient(CONN_ID)
        await again.status(["job-1"])
        await again.close()
        return closed_when_idle, server.opened

    open_after_idle, opened = asyncio.run(scenario())
    assert open_after_idle == 0, "the idle connection was never closed"
    assert opened == 2


def test_polls_go_on_after_the_server_dropped_the_connection(server: _GatewayServer) -> None:
    """A restarted sshd or a lost link: at most one call fails (if the client had not noticed
    the close yet), the next one reconnects, exactly once."""

    async def scenario() -> tuple[int, int]:
        client = AsyncGatewayClient(CONN_ID)
        await client.status(["job-1"])
        await asyncio.to_thread(server.drop_all)
        await asyncio.to_thread(server.wait_open_now, 0)
        connects = STATS.ssh_connects
        try:
            await client.status(["job-1"])
        except HpcTransportError as exc:
            assert "SSH call 'status' failed" in str(exc)
        statuses = await client.status(["job-1"])
        assert statuses[0].job_id == "job-1"
        await client.close()
        return server.opened, STATS.ssh_connects - connects

    opened, reconnects = asyncio.run(scenario())
    assert (opened, reconnects) == (2, 1)


def test_a_burst_of_calls_stays_within_the_servers_session_limit(server: _GatewayServer) -> None:
    """E.g. the give-up cancels of many jobs at once: sshd refuses channels beyond its
    MaxSessions (10 by default), so the shared connection keeps at most MAX_CHANNELS open."""

    async def burst() -> list[Any]:
        clients = [AsyncGatewayClient(CONN_ID) for _ in range(2)]
        calls = [clients[i % 2].status([f"job-{i}"]) for i in range(24)]
        try:
            return await asyncio.gather(*calls)
        finally:
            for client in clients:
                await client.close()

    replies = asyncio.run(burst())
    assert [r[0].job_id for r in replies] == [f"job-{i}" for i in range(24)]
    assert server.opened == 1
    assert 1 < server.most_execs <= MAX_CHANNELS < 10
