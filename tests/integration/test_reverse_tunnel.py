"""The reverse tunnel in the Slurm sandbox: jobs reach a service only through the login node.

One host plays both sides, split by a network namespace:

- **login node network** (namespace ``omeflow-tun-<pid>``): the OMERO stand-in listens on the
  namespace's own loopback (``127.0.0.1:<svc>`` there), which nothing outside can address;
  the gateway runs there (as on the login node) and starts the tunnel keeper at the first
  submit, so the keeper and its ssh client run there too.
- **compute node** (the host's network): slurmd runs the jobs; a node sshd (started here,
  like a compute node's, with ``AllowTcpForwarding remote`` and the keeper's key restricted
  by :func:`hpc_jobs.tunnel.node_authorized_keys_line`) listens on the veth address the
  namespace reaches.

Jobs are submitted through the gateway (the forced command's program, run here as a
subprocess with ``SSH_ORIGINAL_COMMAND``), as ``cluster_check`` with a sleep, two at once.
Every process started here is under ``timeout`` and stops by itself; the keeper (started by
the gateway) exits by itself once idle, which the test checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hpc_jobs.config import SiteConfig, SlurmConfig, StoreConfig, TunnelConfig
from hpc_jobs.jobdir import JobDir
from hpc_jobs.keys import generate_keypair
from hpc_jobs.sandbox import paths as P
from hpc_jobs.tunnel import can_connect, node_authorized_keys_line, read_state, tunnels_dir
from tests.sandbox_fixture import sandbox  # noqa: F401

pytestmark = [pytest.mark.sandbox, pytest.mark.slow, pytest.mark.timeout(300)]

#: Every helper process dies by itself after this many seconds, whatever happens to pytest.
LIFETIME_S = 300
JOB_SLEEP_S = 8

#: The OMERO stand-in: accepts, records which process the connection came from (the peer
#: socket's owner, found through /proc in the namespace), writes a greeting, closes.
STAND_IN = r"""
import json, os, socket, sys
port, log = int(sys.argv[1]), sys.argv[2]
def owner(peer_port):
    inode = None
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            f = line.split()
            if int(f[1].split(":")[1], 16) == peer_port and f[1].startswith("0100007F"):
                inode = f[9]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
    return None
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(16)
open(log + ".ready", "w").close()
while True:
    conn, peer = srv.accept()
    rec = {"peer": peer[0], "owner": owner(peer[1])}
    with open(log, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    conn.sendall(b"omero-stand-in\n")
    conn.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its stderr appended to ``log`` (the child keeps its own copy)."""
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=fh, **kw)


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True, **kw)


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class TunnelWorld:
    """What the tests look at: the sites, the namespace, the stand-in and the keeper."""

    base: Path
    tunnel_site: Path
    direct_site: Path
    netns: str
    host_ip: str
    ns_ip: str
    svc_port: int
    listen_port: int
    service_log: Path
    #: (site file, job key) of every job submitted: cancelled at teardown if still there
    submitted: list[tuple[Path, str]] = field(default_factory=list)

    def connections(self) -> list[dict[str, Any]]:
        if not self.service_log.exists():
            return []
        return [json.loads(ln) for ln in self.service_log.read_text().splitlines() if ln]


def _node_sshd(base: Path, host_ip: str, port: int, keeper_pub: str, listen_port: int,
               ns_ip: str) -> list[str]:
    """A compute node's sshd: forwarding only 'remote', the keeper's key restricted."""
    d = base / "node_sshd"
    d.mkdir(mode=0o755)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")])
    auth = d / "authorized_keys"
    auth.write_text(node_authorized_keys_line(keeper_pub, listen_port, from_=ns_ip) + "\n")
    auth.chmod(0o644)
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress {host_ip}\nHostKey {d / 'host_key'}\nPidFile none\n"
        f"AuthorizedKeysFile {auth}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nAllowUsers {P.USER}\nUsePAM no\nStrictModes yes\n"
        "AllowTcpForwarding remote\nGatewayPorts no\nX11Forwarding no\n"
        "AllowAgentForwarding no\nPermitTunnel no\nLogLevel VERBOSE\n"
    )
    return ["timeout", "-k", "5", str(LIFETIME_S), "/usr/sbin/sshd", "-D", "-e",
            "-f", str(d / "sshd_config")]


@pytest.fixture(scope="module")
def world(sandbox: dict[str, Any]) -> Iterator[TunnelWorld]:  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("the tunnel test makes a network namespace: run it as root (CI does)")
    for tool in ("ip", "ssh", "timeout"):
        assert shutil.which(tool), f"{tool} is missing (iproute2 / openssh-client / coreutils)"
    tag = f"{os.getpid() % 100000}"
    netns = f"omeflow-tun-{tag}"
    veth_host, veth_ns = f"otun{tag}a", f"otun{tag}b"
    subnet = 16 + os.getpid() % 200
    host_ip, ns_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    base = P.ROOT / f"tunnel-test-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o755)
    procs: list[subprocess.Popen[bytes]] = []
    world: TunnelWorld | None = None
    try:
        _run(["ip", "netns", "add", netns])
        _run(["ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_ns,
              "netns", netns])
        _run(["ip", "addr", "add", f"{host_ip}/30", "dev", veth_host])
        _run(["ip", "link", "set", veth_host, "up"])
        inns = ["ip", "netns", "exec", netns]
        _run([*inns, "ip", "addr", "add", f"{ns_ip}/30", "dev", veth_ns])
        _run([*inns, "ip", "link", "set", veth_ns, "up"])
        _run([*inns, "ip", "link", "set", "lo", "up"])

        # the keeper's key and the node sshd it logs in to
        key = base / "keeper_key"
        keeper_pub = generate_keypair(key, "omeflow-tunnel")
        sshd_port, svc_port, listen_port = _free_port(), _free_port(), _free_port()
        sshd_argv = _node_sshd(base, host_ip, sshd_port, keeper_pub, listen_port, ns_ip)
        host_pub = (base / "node_sshd" / "host_key.pub").read_text().split()
        known = base / "known_hosts"
        known.write_text(f"[{host_ip}]:{sshd_port} {host_pub[0]} {host_pub[1]}\n")
        procs.append(_spawn(sshd_argv, base / "node_sshd.log"))
        _wait(lambda: can_connect(host_ip, sshd_port) is None, 15, "the node sshd")

        # the OMERO stand-in, addressable only inside the namespace
        service_log = base / "service.jsonl"
        procs.append(_spawn(
            [*inns, "timeout", "-k", "5", str(LIFETIME_S), sys.executable, "-c", STAND_IN,
             str(svc_port), str(service_log)],
            base / "service.err",
        ))
        _wait(lambda: Path(str(service_log) + ".ready").exists(), 15, "the stand-in service")

        # Slurm's client tools from inside the namespace reach slurmctld on the veth address
        slurm_conf = base / "slurm.conf"
        slurm_conf.write_text(P.SLURM_CONF.read_text().replace("127.0.0.1", host_ip))
        slurm_conf.chmod(0o644)
        sandbox_site = SiteConfig.load(P.SITE_TOML)
        common = {
            "data_root": base / "data", "scheduler": "slurm", "python": Path(sys.executable),
            "slurm": SlurmConfig(partition=P.PARTITION, conf=slurm_conf,
                                 max_cpus=sandbox_site.slurm.max_cpus,
                                 max_mem_mb=sandbox_site.slurm.max_mem_mb),
        }
        tunnel_site = SiteConfig(
            job_root=base / "jobs",
            store=StoreConfig(kind="omero", host="127.0.0.1", port=svc_port,
                              route="reverse_tunnel"),
            tunnel=TunnelConfig(key=key, known_hosts=known, node_user=P.USER,
                                node_address=host_ip, ssh_port=sshd_port,
                                listen_port=listen_port, open_timeout_s=40, idle_exit_s=2,
                                control_dir=base / "ctl"),
            **common,
        )
        direct_site = SiteConfig(
            job_root=base / "jobs-direct",
            store=StoreConfig(kind="omero", host="127.0.0.1", port=svc_port),
            **common,
        )
        for name, site in (("tunnel.toml", tunnel_site), ("direct.toml", direct_site)):
            (base / name).write_text(site.to_toml())
        world = TunnelWorld(base, base / "tunnel.toml", base / "direct.toml", netns, host_ip,
                            ns_ip, svc_port, listen_port, service_log)
        yield world
    finally:
        if world is not None:  # a failed test may leave a job running: it must not outlive us
            for site_toml, key in world.submitted:
                with contextlib.suppress(Exception):
                    _gateway(world, site_toml, "cancel", {"job_id": key})
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _gateway(world: TunnelWorld, site_toml: Path, verb: str, body: dict[str, Any]
             ) -> dict[str, Any]:
    """One gateway call, as sshd would run it. ``submit`` runs on the login node (in its
    namespace: it starts the keeper there); ``status`` from the host's network, where the
    sandbox's accounting database (sacct) answers."""
    env = {**os.environ, "SSH_ORIGINAL_COMMAND": verb}
    login_node = ["ip", "netns", "exec", world.netns] if verb == "submit" else []
    proc = subprocess.run(
        [*login_node, sys.executable, "-m", "hpc_jobs.gateway", "--config", str(site_toml)],
        input=json.dumps(body), capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    reply = json.loads(proc.stdout)
    assert reply.get("ok"), reply
    return reply


def _submit(world: TunnelWorld, site_toml: Path, sleep_s: int) -> str:
    key = f"tunnel-{uuid.uuid4().hex[:10]}"
    world.submitted.append((site_toml, key))
    _gateway(world, site_toml, "submit", {
        "step": "cluster_check", "job_key": key, "params": {"sleep_s": sleep_s},
        "resources": {"cpus": 1, "mem_mb": 256, "time_min": 3},
    })
    return key


def _states(world: TunnelWorld, site_toml: Path, keys: list[str]) -> dict[str, str]:
    reply = _gateway(world, site_toml, "status", {"job_ids": keys})
    return {j["job_id"]: j["state"] for j in reply["jobs"]}


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (nobody may reap a detached keeper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _forward_processes(listen_port: int) -> list[int]:
    """pids of ssh processes whose argv forwards the node's ``listen_port``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode()).name == "ssh" and any(
            a.decode().startswith(f"127.0.0.1:{listen_port}:") for a in argv
        ):
            pids.append(int(pid))
    return pids


def _idle_cpus() -> int:
    """Idle CPUs of the sandbox's node (sinfo's A/I/O/T)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%C"], capture_output=True, text=True,
                         timeout=30, check=False).stdout.split("/")
    return int(out[1]) if len(out) == 4 else 0


def _queue() -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i %j %T %C %R"], capture_output=True,
                          text=True, timeout=30, check=False).stdout


def _explain(world: TunnelWorld, site: SiteConfig, jobs: list[str]) -> str:
    """What the jobs, the bookkeeping and the keeper say (for a failure message)."""
    parts = [f"states: {_states(world, world.tunnel_site, jobs)}", f"state: {read_state(site)}",
             f"queue: {_queue()}"]
    for key in jobs:
        log = JobDir(site.job_root, key).log_path
        parts.append(f"{key}: {log.read_text() if log.exists() else '(no log yet)'}")
    keeper_log = tunnels_dir(site) / "keeper.log"
    parts.append(f"keeper: {keeper_log.read_text() if keeper_log.exists() else '(none)'}")
    return "\n".join(parts)


def test_two_jobs_share_one_forward_and_reach_the_service_only_through_it(
    world: TunnelWorld,
) -> None:
    tunnel_site = SiteConfig.load(world.tunnel_site)
    direct_site = SiteConfig.load(world.direct_site)
    # the stand-in is not addressable from the compute node: not at the address the login
    # node uses (127.0.0.1:<svc>), nor at the namespace's veth address
    assert can_connect("127.0.0.1", world.svc_port) is not None
    assert can_connect(world.ns_ip, world.svc_port) is not None

    # two jobs at once need two idle CPUs (the sandbox node may still run another test's job)
    _wait(lambda: _idle_cpus() >= 2, 90, f"2 idle CPUs on the node: {_queue()}")
    jobs = [_submit(world, world.tunnel_site, JOB_SLEEP_S) for _ in range(2)]
    control = _submit(world, world.direct_site, 0)

    # both jobs run at once on the node and use one forward: one ssh process for the two
    def both_routed() -> bool:
        users = read_state(tunnel_site).users
        return len(users) == 2 and all(
            "through the login node's reverse tunnel" in JobDir(tunnel_site.job_root, k)
            .log_path.read_text(errors="replace")
            for k in jobs if JobDir(tunnel_site.job_root, k).log_path.exists()
        ) and all(JobDir(tunnel_site.job_root, k).log_path.exists() for k in jobs)

    try:
        _wait(both_routed, 60, "both jobs to be routed through the tunnel")
    except AssertionError:
        raise AssertionError(_explain(world, tunnel_site, jobs)) from None
    state = read_state(tunnel_site)
    nodes = {u["node"] for u in state.users.values()}
    assert len(nodes) == 1, state.users
    (node,) = nodes
    assert state.forwards[node]["state"] == "open"
    assert _states(world, world.tunnel_site, jobs) == dict.fromkeys(jobs, "RUNNING")
    forwards = _forward_processes(world.listen_port)
    assert forwards == [state.forwards[node]["pid"]], forwards

    # both reached the service, and every connection it saw came from the tunnel's ssh
    seen = world.connections()
    assert len(seen) >= 2, seen
    assert all(c == {"peer": "127.0.0.1", "owner": "ssh"} for c in seen), seen
    for key in jobs:
        log = JobDir(tunnel_site.job_root, key).log_path.read_text()
        assert f"reached at 127.0.0.1:{world.listen_port}" in log, log

    # the direct-mode control: same host:port, no tunnel, the job cannot reach it
    _wait(lambda: _states(world, world.direct_site, [control])[control] == "COMPLETED", 60,
          "the direct-mode control job")
    control_log = JobDir(direct_site.job_root, control).log_path.read_text()
    assert re.search(
        rf"OMERO at 127\.0\.0\.1:{world.svc_port} is not reachable from node \S+ "
        r"\(ConnectionRefusedError", control_log
    ), control_log
    assert len(world.connections()) == len(seen)

    # the last job's end closes the forward; then the keeper exits by itself
    _wait(lambda: set(_states(world, world.tunnel_site, jobs).values()) == {"COMPLETED"},
          JOB_SLEEP_S + 40, "the tunnel jobs to finish")
    _wait(lambda: not _forward_processes(world.listen_port), 15, "the forward to close")
    assert can_connect("127.0.0.1", world.listen_port) is not None
    state = read_state(tunnel_site)
    assert state.users == {} and state.forwards == {}, state
    # the keeper the gateway started at the first submit (on the login node) ran alone and
    # exits by itself once idle
    keeper_log = tunnels_dir(tunnel_site) / "keeper.log"
    pids = set(re.findall(r"keeper\[(\d+)\]: started", keeper_log.read_text()))
    assert len(pids) == 1, keeper_log.read_text()
    (pid,) = pids
    _wait(lambda: "nothing to do for" in keeper_log.read_text(), 20, "the keeper to go idle")
    _wait(lambda: not _running(int(pid)), 10, "the keeper process to end")
    assert keeper_log.read_text().count("forward open to") == 1, keeper_log.read_text()


def test_the_keeper_key_opens_its_forward_and_nothing_else(world: TunnelWorld) -> None:
    """The node's authorized_keys line for the keeper: no command, no other listen port, no
    local forward (a stolen key reaches nothing but the one forward the site configured)."""
    cfg = SiteConfig.load(world.tunnel_site).tunnel
    assert cfg is not None
    ssh = [
        "ip", "netns", "exec", world.netns, "ssh", "-F", "none", "-i", str(cfg.key),
        "-p", str(cfg.ssh_port), "-l", str(cfg.node_user), "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={cfg.known_hosts}", "-o", "ExitOnForwardFailure=yes",
    ]

    def attempt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ssh, *args], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, check=False)

    command = attempt("--", world.host_ip, "id")
    assert command.returncode != 0 and command.stdout == "", command
    other_port = _free_port()
    listen = attempt("-N", "-R", f"127.0.0.1:{other_port}:127.0.0.1:{world.svc_port}",
                     "--", world.host_ip)
    assert listen.returncode == 255 and "forwarding failed" in listen.stderr, listen
    assert can_connect("127.0.0.1", other_port) is not None
    local = attempt("-W", f"127.0.0.1:{P.SSH_PORT}", "--", world.host_ip)
    assert local.returncode == 255 and "prohibited" in local.stderr, local


def test_a_cancelled_job_does_not_keep_the_forward_open(world: TunnelWorld) -> None:
    """scancel kills the job before it can remove its entry: the keeper drops it once the job
    left the queue, closes the forward and, idle again, exits."""
    site = SiteConfig.load(world.tunnel_site)
    _wait(lambda: _idle_cpus() >= 1, 90, f"an idle CPU on the node: {_queue()}")
    started = len(re.findall(r"started for", _keeper_log(site)))
    key = _submit(world, world.tunnel_site, 120)
    try:
        _wait(lambda: len(read_state(site).users) == 1 and bool(_forward_processes(
            world.listen_port)), 60, "the job to be routed")
    except AssertionError:
        raise AssertionError(_explain(world, site, [key])) from None
    _gateway(world, world.tunnel_site, "cancel", {"job_id": key})
    _wait(lambda: not _forward_processes(world.listen_port), 30, "the forward to close")
    state = read_state(site)
    assert state.users == {} and state.forwards == {}, state
    assert re.search(r"jobs ended: \d+", _keeper_log(site).split("started for")[-1])
    _wait(lambda: len(re.findall(r"nothing to do for", _keeper_log(site))) > started, 30,
          "the keeper to exit once idle")


def _keeper_log(site: SiteConfig) -> str:
    log = tunnels_dir(site) / "keeper.log"
    return log.read_text() if log.exists() else ""
