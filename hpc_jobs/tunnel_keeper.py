"""The login node's tunnel keeper: opens and closes the per-node SSH reverse forwards.

``python -m hpc_jobs.tunnel_keeper --site /etc/omeflow/site.toml`` (the gateway starts it at
submit when none runs; an admin may run it as a service instead). One keeper per job root
(``.tunnels/keeper.lock``). Every ``POLL_S`` it looks at the bookkeeping
(:mod:`hpc_jobs.tunnel`) under its lock: a node with jobs and no live forward gets one, a
forward whose node has no job left is closed. Every ``STATUS_EVERY_S`` it lists the
scheduler's queue (one call) and forgets the tracked jobs that left it: a job killed before it
could remove its entry does not keep a forward open. With nothing pending, nobody on a node
and no forward for ``tunnel.idle_exit_s`` it closes down by itself (also on SIGTERM / SIGINT,
closing every forward first).

A forward is one ssh master per node, started with ``-f`` and ``ExitOnForwardFailure``: ssh
backgrounds itself only once the node's sshd accepted the remote listen, so "open" in the
bookkeeping means open. Its control socket (``-S``, in ``tunnel.control_dir`` on the login
node) gives its pid (``-O check``) and closes it (``-O exit``); a restarted keeper adopts the
forwards a killed one left. ``ServerAliveInterval`` ends a forward whose node went away.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpc_jobs.config import SiteConfig, TunnelConfig
from hpc_jobs.fsutil import LockTimeout, file_lock
from hpc_jobs.protocol import GatewayError
from hpc_jobs.tunnel import LOOPBACK, TunnelState, locked_state, read_state, tunnels_dir

#: Seconds between two looks at the bookkeeping.
POLL_S = 0.3
#: Seconds between two scheduler queries for ended jobs.
STATUS_EVERY_S = 5.0
#: Seconds before a node whose forward failed is tried again.
RETRY_S = 10.0
#: Seconds ssh gets to connect, authenticate and have the forward accepted.
OPEN_TIMEOUT_S = 30.0

_PID_RE = re.compile(r"pid=(\d+)")


def log(msg: str) -> None:
    """One time-stamped line on stderr (the keeper's log file)."""
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} keeper[{os.getpid()}]: {msg}",
          file=sys.stderr, flush=True)


def control_dir(cfg: TunnelConfig) -> Path:
    """The folder of the ssh control sockets: created 0700, refused unless it is ours."""
    path = Path(cfg.control_dir or f"/tmp/omeflow-tunnel-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(
            f"{path} must be a directory owned by uid {os.getuid()} with mode 0700 (it holds "
            "the tunnel's ssh control sockets); remove it or set tunnel.control_dir"
        )
    return path


class ForwardKeeper:
    """Opens, checks and closes the forwards of one site."""

    def __init__(self, site: SiteConfig) -> None:
        assert site.tunnel is not None
        self.site = site
        self.cfg: TunnelConfig = site.tunnel
        self.controls = control_dir(self.cfg)

    def _control(self, node: str) -> Path:
        # short, fixed-length socket names (a Unix socket path has ~100 bytes)
        return self.controls / (hashlib.sha256(node.encode()).hexdigest()[:16] + ".sock")

    def _base(self, node: str) -> list[str]:
        cfg = self.cfg
        argv = [
            "ssh", "-F", "none", "-S", str(self._control(node)),
            "-i", str(cfg.key), "-p", str(cfg.ssh_port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={cfg.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR",
        ]
        if cfg.node_user:
            argv += ["-l", cfg.node_user]
        return argv

    def forward_argv(self, node: str) -> list[str]:
        """The ssh argv that opens ``node``'s forward (no shell, no secret)."""
        store = self.site.store
        spec = f"{LOOPBACK}:{self.cfg.listen_port}:{store.host}:{store.port}"
        return [
            *self._base(node), "-M", "-f", "-N", "-T",
            "-o", "ExitOnForwardFailure=yes", "-o", "ControlPersist=no",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
            "-R", spec, "--", self.cfg.address_of(node),
        ]

    def _ctl(self, node: str, op: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._base(node), "-O", op, "--", self.cfg.address_of(node)],
            capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL, check=False,
        )

    def master_pid(self, node: str) -> int | None:
        """pid of ``node``'s ssh master, None when there is none."""
        if not self._control(node).exists():
            return None
        proc = self._ctl(node, "check")
        found = _PID_RE.search(proc.stderr + proc.stdout)
        return int(found.group(1)) if proc.returncode == 0 and found else None

    def open(self, node: str) -> dict[str, Any]:
        """Open ``node``'s forward; its bookkeeping record (state open or failed)."""
        now = time.time()
        pid = self.master_pid(node)  # a forward a killed keeper left: adopt it
        if pid is None:
            self._control(node).unlink(missing_ok=True)
            # not a pipe: the backgrounded ssh keeps its stderr, and a pipe would never close
            errors = tunnels_dir(self.site) / f"ssh-{node}.log"
            with open(errors, "w", encoding="utf-8") as err:
                os.fchmod(err.fileno(), 0o600)
                try:
                    code = subprocess.run(
                        self.forward_argv(node), stdout=subprocess.DEVNULL, stderr=err,
                        timeout=OPEN_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False,
                    ).returncode
                except subprocess.TimeoutExpired:
                    code = None
            if code != 0:
                said = errors.read_text(errors="replace").strip()[-500:]
                why = f"exited {code}" if code is not None else f"hung {OPEN_TIMEOUT_S:g} s"
                return self._failed(node, f"ssh {why}: {said or '(no message)'}", now)
            pid = self.master_pid(node)
            if pid is None:
                return self._failed(node, "ssh reported success but no master answers", now)
        log(f"forward open to {node} (ssh pid {pid}, node port {self.cfg.listen_port})")
        return {"state": "open", "pid": pid, "since": now, "error": None,
                "listen_port": self.cfg.listen_port}

    def _failed(self, node: str, error: str, now: float) -> dict[str, Any]:
        log(f"forward to {node} failed: {error}")
        return {"state": "failed", "pid": None, "since": now, "error": error,
                "listen_port": self.cfg.listen_port}

    def close(self, node: str, record: dict[str, Any]) -> None:
        """Close ``node``'s forward (``-O exit``; SIGTERM to the recorded pid if that fails)."""
        if record.get("state") != "open":
            return
        if self._control(node).exists() and self._ctl(node, "exit").returncode == 0:
            log(f"forward to {node} closed")
            return
        pid = record.get("pid")
        if pid and _is_ssh(pid):
            os.kill(pid, signal.SIGTERM)
            log(f"forward to {node} closed (SIGTERM to ssh pid {pid})")

    def alive(self, record: dict[str, Any]) -> bool:
        """True while a forward recorded open still has its ssh."""
        return record.get("state") == "open" and _is_ssh(record.get("pid"))

    def reconcile(self, state: TunnelState) -> None:
        """Make the forwards match the users: open what is wanted, close what is not."""
        wanted = state.nodes_wanted()
        for node in sorted(set(state.forwards) - wanted):
            self.close(node, state.forwards.pop(node))
        now = time.time()
        for node in sorted(wanted):
            record = state.forwards.get(node)
            if record and self.alive(record):
                continue
            if record and record.get("state") == "failed" and now - record["since"] < RETRY_S:
                continue
            if record and record.get("state") == "open":
                log(f"forward to {node} lost (ssh pid {record.get('pid')} gone); reopening")
            state.forwards[node] = self.open(node)

    def close_all(self) -> None:
        """Close every forward (the keeper is stopping)."""
        with locked_state(self.site) as state:
            for node in sorted(state.forwards):
                self.close(node, state.forwards.pop(node))


def _is_ssh(pid: Any) -> bool:
    try:
        return Path(f"/proc/{int(pid)}/comm").read_text().strip() == "ssh"
    except (OSError, ValueError, TypeError):
        return False


def _ended_jobs(site: SiteConfig, ids: set[str]) -> set[str]:
    """Of ``ids``, those no longer in the scheduler's queue (one ``squeue`` call: the
    keeper needs no accounting database; an array counts while any of its tasks is queued)."""
    if not ids:
        return set()
    from hpc_jobs.schedulers.base import get_scheduler

    live = {q.native_id.split("_")[0] for q in get_scheduler(site).queue()}
    return {i for i in ids if i.split("_")[0] not in live}


def run(site: SiteConfig) -> int:
    """The keeper's loop; returns its exit status (0: idle for long enough, or stopped)."""
    folder = tunnels_dir(site)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with file_lock(folder / "keeper.lock", timeout=0):
            return _loop(site)
    except LockTimeout:
        log("another keeper runs for this job root; exiting")
        return 0


def _loop(site: SiteConfig) -> int:
    keeper = ForwardKeeper(site)
    assert site.tunnel is not None
    idle_exit_s = site.tunnel.idle_exit_s

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"started for {site.job_root} (OMERO {site.store.host}:{site.store.port})")
    last_status = 0.0
    idle_since: float | None = None
    try:
        while True:
            now = time.monotonic()
            if now - last_status >= STATUS_EVERY_S:
                last_status = now
                try:
                    ended = _ended_jobs(site, read_state(site).job_ids())
                except Exception as exc:  # noqa: BLE001 - the scheduler may be briefly away
                    log(f"could not ask the scheduler which jobs ended: {exc}")
                    ended = set()
                if ended:
                    log(f"jobs ended: {', '.join(sorted(ended))}")
            else:
                ended = set()
            with locked_state(site) as state:
                state.drop_jobs(ended)
                keeper.reconcile(state)
                idle = state.is_idle()
            if not idle:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= idle_exit_s:
                log(f"nothing to do for {idle_exit_s:g} s; exiting")
                return 0
            time.sleep(POLL_S)
    finally:
        keeper.close_all()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m hpc_jobs.tunnel_keeper --site SITE.toml``."""
    parser = argparse.ArgumentParser(prog="python -m hpc_jobs.tunnel_keeper",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", required=True, type=Path, help="site configuration (TOML)")
    args = parser.parse_args(argv)
    try:
        site = SiteConfig.load(args.site)
    except GatewayError as exc:
        log(str(exc))
        return 2
    if site.store.route != "reverse_tunnel" or site.tunnel is None:
        log(f'{args.site} does not set store.route = "reverse_tunnel": nothing to keep')
        return 2
    return run(site)


if __name__ == "__main__":
    sys.exit(main())
