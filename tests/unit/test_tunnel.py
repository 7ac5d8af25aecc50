"""The reverse tunnel's configuration, bookkeeping and keeper start (no Slurm, no ssh).

The forward itself (ssh, the node's sshd, two jobs, a service only the tunnel reaches) is
tested in the sandbox: tests/integration/test_reverse_tunnel.py.
"""

from __future__ import annotations

import multiprocessing
import re
import socket
import time
from pathlib import Path

import pytest

from hpc_jobs.config import SiteConfig, StoreConfig, TunnelConfig
from hpc_jobs.protocol import GatewayError
from hpc_jobs.tunnel import (
    TunnelError,
    acquire,
    ensure_keeper,
    keeper_running,
    locked_state,
    read_state,
    route_job,
    tunnels_dir,
)


def _site(tmp_path: Path, **tunnel: object) -> SiteConfig:
    return SiteConfig(
        job_root=tmp_path / "jobs",
        data_root=tmp_path / "data",
        scheduler="slurm",
        store=StoreConfig(kind="omero", host="omero.example.org", route="reverse_tunnel"),
        tunnel=TunnelConfig(key=tmp_path / "key", known_hosts=tmp_path / "known_hosts",
                            control_dir=tmp_path / "ctl", **tunnel),
    )


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_a_reverse_tunnel_site_must_be_complete(tmp_path: Path) -> None:
    head = 'job_root = "j"\ndata_root = "d"\n'
    cases = {
        '[store]\nkind = "local"\npath = "s"\nroute = "reverse_tunnel"\n':
            'use route = "direct"',
        'scheduler = "local"\n[store]\nkind = "omero"\nhost = "o"\nroute = "reverse_tunnel"\n':
            'needs scheduler = "slurm"',
        'scheduler = "slurm"\n[store]\nkind = "omero"\nhost = "o"\nroute = "reverse_tunnel"\n':
            "needs a [tunnel] table with at least key and known_hosts",
        '[store]\nkind = "omero"\nhost = "o"\nroute = "tunnel"\n': "store.route",
        'scheduler = "slurm"\n[store]\nkind = "omero"\nhost = "o"\nsecure = false\n'
        'route = "reverse_tunnel"\n[tunnel]\nkey = "k"\nknown_hosts = "h"\n':
            "needs store.secure = true",
    }
    for body, fix in cases.items():
        with pytest.raises(GatewayError) as err:
            SiteConfig.load(_write(tmp_path, head + body))
        assert fix in err.value.message, (body, err.value.message)


def test_the_site_file_keeps_the_route_and_the_tunnel(tmp_path: Path) -> None:
    site = _site(tmp_path, node_user="omeflow", node_address="{node}-ib.cluster",
                 listen_port=15000, open_timeout_s=12.5)
    loaded = SiteConfig.load(_write(tmp_path, site.to_toml()))
    assert loaded.store.route == "reverse_tunnel"
    assert loaded.tunnel == site.tunnel
    assert loaded.tunnel is not None
    assert loaded.tunnel.address_of("node042") == "node042-ib.cluster"


def test_a_node_name_never_becomes_an_ssh_option(tmp_path: Path) -> None:
    cfg = _site(tmp_path).tunnel
    assert cfg is not None
    for bad in ("-oProxyCommand=touch /tmp/x", "node 1", "node;id", ""):
        with pytest.raises(ValueError, match="not a host name"):
            cfg.address_of(bad)
    with pytest.raises(ValueError, match="is not a host name template"):
        TunnelConfig(key=Path("k"), known_hosts=Path("h"), node_address="-o{node}")


def _register(job_root: str, worker: int, count: int) -> None:
    site = _site(Path(job_root).parent)
    for i in range(count):
        with locked_state(site) as state:
            state.users[f"{worker}_{i}"] = {"job": str(worker), "node": f"n{worker}", "since": 0}
        if i % 2:
            with locked_state(site) as state:
                state.users.pop(f"{worker}_{i - 1}")


def test_jobs_on_many_nodes_edit_the_bookkeeping_without_losing_an_update(
    tmp_path: Path,
) -> None:
    site = _site(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_register, args=(str(site.job_root), w, 30)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    users = read_state(site).users
    # each worker added 30 entries and removed every second one: 15 left each, none lost
    assert sorted(users) == sorted(f"{w}_{i}" for w in range(4) for i in range(1, 30, 2))


def test_a_job_with_no_keeper_gives_up_and_says_where_to_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = _site(tmp_path, open_timeout_s=0.5)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    with pytest.raises(TunnelError) as err:
        acquire(site)
    message = str(err.value)
    assert "no reverse tunnel to node node7 after 0.5 s" in message
    assert str(tunnels_dir(site) / "keeper.log") in message
    assert "python -m hpc_jobs.tunnel_keeper --site" in message
    assert err.value.retryable
    assert read_state(site).users == {}, "a job that gave up must leave the bookkeeping"


def test_an_open_forward_routes_the_store_to_the_nodes_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as listener:  # the node sshd's end of the forward
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        site = _site(tmp_path, listen_port=port)
        monkeypatch.setenv("SLURM_JOB_ID", "91")
        monkeypatch.setenv("SLURMD_NODENAME", "node5")
        with locked_state(site) as state:  # what the keeper records once ssh is up
            state.forwards["node5"] = {"state": "open", "pid": 1, "since": time.time()}
        routed, route = route_job(site, None, needs_store=True)
    assert route is not None
    assert (routed.store.host, routed.store.port) == ("127.0.0.1", port)
    # the certificate is still checked for the real server (omero_tls, tls_name)
    assert routed.store.tls_name == "omero.example.org"
    assert read_state(site).users["91"]["node"] == "node5"
    route.release()
    assert read_state(site).users == {}


def test_a_failed_forward_fails_a_store_step_and_only_warns_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(tmp_path, open_timeout_s=5)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURMD_NODENAME", "node3")
    with locked_state(site) as state:  # what the keeper records when ssh is refused
        state.forwards["node3"] = {"state": "failed", "since": time.time() + 1,
                                   "error": "ssh exited 255: Permission denied (publickey)."}
    with pytest.raises(TunnelError, match="Permission denied.*authorized_keys"):
        route_job(site, None, needs_store=True)
    routed, route = route_job(site, None, needs_store=False)
    assert route is None and routed == site
    assert "WARNING: the login node could not open the reverse tunnel to node node3" in (
        capsys.readouterr().err
    )


def test_direct_route_says_when_omero_is_unreachable_and_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once the socket is closed
    site = SiteConfig.local(tmp_path).model_copy(
        update={"store": StoreConfig(kind="omero", host="127.0.0.1", port=closed)}
    )
    routed, route = route_job(site, None, needs_store=True)
    assert routed == site and route is None
    err = capsys.readouterr().err
    assert f"OMERO at 127.0.0.1:{closed} is not reachable from node" in err
    assert 'set store.route = "reverse_tunnel"' in err


def test_the_gateway_starts_one_keeper_and_it_stops_by_itself(tmp_path: Path) -> None:
    site = _site(tmp_path, idle_exit_s=0.5)
    path = _write(tmp_path, site.to_toml())
    site = SiteConfig.load(path)
    assert ensure_keeper(site, path) is True
    deadline = time.monotonic() + 20
    while not keeper_running(site):
        assert time.monotonic() < deadline, "the keeper did not start"
        time.sleep(0.05)
    assert ensure_keeper(site, path) is False, "a second keeper was started"
    log = tunnels_dir(site) / "keeper.log"
    while keeper_running(site):
        assert time.monotonic() < deadline, f"the keeper did not stop: {log.read_text()}"
        time.sleep(0.1)
    text = log.read_text()
    assert len(re.findall(r"keeper\[\d+\]: started", text)) == 1, text
    assert "nothing to do for 0.5 s; exiting" in text
