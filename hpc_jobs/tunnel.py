"""Compute nodes without outbound network: OMERO through an SSH reverse forward.

A per-site setting beside ``direct`` (``[store] route = "reverse_tunnel"`` plus a ``[tunnel]``
table, :class:`~hpc_jobs.config.TunnelConfig`), after the thesis's design (section 5.3,
Figure 5.5):

- **Who starts what.** At submit the gateway registers the job (:func:`on_submit`) and makes
  sure the login node's *keeper* runs (:func:`ensure_keeper` starts ``python -m
  hpc_jobs.tunnel_keeper --site <site.toml>`` detached, unless one already holds its lock).
  When the job starts on node N, ``run.py`` calls :func:`route_job`: it writes "job J uses
  node N" into the bookkeeping and waits until N's forward is open. The keeper, seeing a node
  wanted, runs ``ssh -R 127.0.0.1:<listen_port>:<store.host>:<store.port> N`` from the login
  node (one ssh per node, whatever the number of jobs there); the job then connects to
  ``127.0.0.1:<listen_port>`` on its own node: the job's site config is rewritten so, and
  steps need no change. When the job ends ``run.py`` removes its entry (:meth:`JobRoute.
  release`); the keeper closes a node's forward when its last job is gone. Jobs killed
  before they could clean up (cancel, time limit, node failure) are dropped by the keeper
  when the scheduler reports them ended. The keeper exits by itself after
  ``tunnel.idle_exit_s`` with nothing to do.
- **Bookkeeping.** One JSON file, ``<job_root>/.tunnels/state.json`` (a dot name: outside
  the job-key namespace), rewritten atomically and changed only under ``flock`` on
  ``<job_root>/.tunnels/state.lock`` (jobs on many nodes and the keeper edit it: the file
  system's ``flock`` must work across nodes, as for the image locks). Readers that only look
  (a job waiting for its forward) read it without the lock. ``keeper.lock`` (held for the
  keeper's lifetime) makes the keeper a singleton; its log is ``.tunnels/keeper.log``.
- **Security.** The forward's destination is the site's ``store.host:port`` (never anything
  a job or caller sends); the listener is the node's loopback. The keeper's key is useless
  for anything but this one forward; on each compute node the admin puts in the service
  user's ``authorized_keys`` ONE line (:func:`node_authorized_keys_line` writes it): these
  options, comma-separated, then the public key::

      restrict
      port-forwarding
      permitlisten="127.0.0.1:14064"
      permitopen="127.0.0.1:1"
      command="/bin/false"
      from="<login node address>"

  (``restrict``: no pty, agent, X11; ``port-forwarding`` with ``permitlisten``: the only
  remote listen allowed is that port on loopback; ``permitopen`` to a closed port: no local
  forward leads anywhere; ``command``: a session runs nothing) and in the nodes'
  ``sshd_config``: ``AllowTcpForwarding remote`` (or ``yes``), ``GatewayPorts no``. No secret
  is on any command line: the ssh argv holds paths, the node name and the OMERO address; the
  session key stays in the job's 0600 file and crosses the forward inside OMERO's TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_jobs.config import SiteConfig, TunnelConfig
from hpc_jobs.fsutil import atomic_write, file_lock
from hpc_jobs.stores.base import StoreError

#: Folder of the bookkeeping in the job root (a dot name: never a job key).
TUNNELS_DIR = ".tunnels"
#: The loopback address jobs connect to on their node.
LOOPBACK = "127.0.0.1"
#: Pause between two looks at the bookkeeping while a job waits for its forward (seconds).
WAIT_POLL_S = 0.2


class TunnelError(StoreError):
    """The job's forward could not be had; retryable (the task is retried later)."""

    retryable = True


@dataclass
class TunnelState:
    """The bookkeeping: jobs registered at submit, jobs using a node, forwards per node."""

    #: scheduler job id -> submit time: jobs that may still start and want a forward.
    pending: dict[str, float] = field(default_factory=dict)
    #: user key (``<job id>`` or ``<job id>_<task>``) -> {"job", "node", "since"}.
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: node -> {"state": "open" | "failed", "pid", "since", "error", "listen_port"}.
    forwards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def nodes_wanted(self) -> set[str]:
        """Nodes with at least one job using them."""
        return {u["node"] for u in self.users.values()}

    def job_ids(self) -> set[str]:
        """Every scheduler job id the bookkeeping tracks."""
        return set(self.pending) | {u["job"] for u in self.users.values()}

    def drop_jobs(self, ended: set[str]) -> None:
        """Forget jobs the scheduler reports ended."""
        for job in ended:
            self.pending.pop(job, None)
        self.users = {k: u for k, u in self.users.items() if u["job"] not in ended}

    def is_idle(self) -> bool:
        """Nothing pending, nobody on a node, no forward open."""
        return not (self.pending or self.users or self.forwards)


def tunnels_dir(site: SiteConfig) -> Path:
    """``<job_root>/.tunnels``: the bookkeeping, its lock, the keeper's lock and log."""
    return Path(site.job_root) / TUNNELS_DIR


def read_state(site: SiteConfig) -> TunnelState:
    """The bookkeeping as last written (empty when none yet). No lock needed to look."""
    try:
        raw = json.loads((tunnels_dir(site) / "state.json").read_text())
    except FileNotFoundError:
        return TunnelState()
    return TunnelState(
        pending=dict(raw.get("pending", {})),
        users=dict(raw.get("users", {})),
        forwards=dict(raw.get("forwards", {})),
    )


@contextlib.contextmanager
def locked_state(site: SiteConfig) -> Iterator[TunnelState]:
    """The bookkeeping under its ``flock``; written back (atomically) when the block ends."""
    folder = tunnels_dir(site)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with file_lock(folder / "state.lock"):
        state = read_state(site)
        yield state
        atomic_write(
            folder / "state.json",
            json.dumps(
                {"pending": state.pending, "users": state.users, "forwards": state.forwards},
                indent=1,
                sort_keys=True,
            ),
        )


def node_authorized_keys_line(public_key: str, listen_port: int, from_: str) -> str:
    """The compute nodes' ``authorized_keys`` line for the keeper's key: this forward only."""
    options = [
        "restrict",
        "port-forwarding",
        f'permitlisten="{LOOPBACK}:{int(listen_port)}"',
        f'permitopen="{LOOPBACK}:1"',
        'command="/bin/false"',
        f'from="{from_}"',
    ]
    return ",".join(options) + " " + public_key.strip()


def uses_tunnel(site: SiteConfig) -> bool:
    """True when the site's jobs reach OMERO through the reverse tunnel."""
    return site.store.kind == "omero" and site.store.route == "reverse_tunnel"


def _tunnel(site: SiteConfig) -> TunnelConfig:
    assert site.tunnel is not None  # SiteConfig's validator: route reverse_tunnel needs it
    return site.tunnel


# ---------------------------------------------------------------------------------------------
# Gateway side (login node)
# ---------------------------------------------------------------------------------------------
def on_submit(site: SiteConfig, config_path: Path, native_id: str) -> str | None:
    """The gateway submitted ``native_id``: register it and make sure the keeper runs.

    A no-op unless the site uses the reverse tunnel. Never raises for a file-system or
    process error (the job is submitted already): returns what went wrong, and the job then
    fails after ``tunnel.open_timeout_s`` with a message naming the keeper's log.
    """
    if not uses_tunnel(site):
        return None
    try:
        with locked_state(site) as state:
            state.pending[str(native_id)] = time.time()
        ensure_keeper(site, config_path)
    except OSError as exc:
        return f"reverse tunnel: could not register job {native_id} or start the keeper: {exc}"
    return None


def keeper_running(site: SiteConfig) -> bool:
    """True while a keeper holds ``keeper.lock``."""
    import fcntl

    path = tunnels_dir(site) / "keeper.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we got
    return False


def ensure_keeper(site: SiteConfig, config_path: Path) -> bool:
    """Start the keeper detached unless one runs; True when this call started one.

    Its stdio goes to ``.tunnels/keeper.log`` (never the gateway's: the SSH call returns at
    once). Two gateways racing both start one; the second exits on the keeper lock.
    """
    if keeper_running(site):
        return False
    folder = tunnels_dir(site)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = os.open(folder / "keeper.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "hpc_jobs.tunnel_keeper", "--site",
             str(Path(config_path).resolve())],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    finally:
        os.close(log)
    return True


# ---------------------------------------------------------------------------------------------
# Job side (compute node)
# ---------------------------------------------------------------------------------------------
def node_name() -> str:
    """This node's name as Slurm knows it (``SLURMD_NODENAME``), else the short host name."""
    return os.environ.get("SLURMD_NODENAME") or platform.node().split(".")[0]


def _job_identity(task_id: int | None) -> tuple[str, str]:
    """(scheduler job id the keeper asks the scheduler about, this job's user key)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        raise TunnelError(
            'store.route = "reverse_tunnel" needs a Slurm job (SLURM_JOB_ID is not set); run '
            'steps through the gateway, or use route = "direct" outside Slurm'
        )
    return job, (job if task_id is None else f"{job}_{task_id}")


def can_connect(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to host:port opens, else why not (for the log)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass
class JobRoute:
    """A job's use of its node's forward; :meth:`release` ends it (idempotent)."""

    site: SiteConfig
    key: str
    node: str
    released: bool = False

    def release(self) -> None:
        """Remove this job from the node's users; the keeper closes the last one's forward."""
        if self.released:
            return
        with locked_state(self.site) as state:
            state.users.pop(self.key, None)
        self.released = True


def acquire(site: SiteConfig, task_id: int | None = None) -> JobRoute:
    """Register this job on its node and wait until the node's forward answers.

    Raises :class:`TunnelError` naming the fix when the keeper reports a failure for this
    node or the forward is not there within ``tunnel.open_timeout_s``.
    """
    cfg = _tunnel(site)
    job, key = _job_identity(task_id)
    node = node_name()
    cfg.address_of(node)  # refuse a node name that is not a host name, before writing it
    since = time.time()
    with locked_state(site) as state:
        state.users[key] = {"job": job, "node": node, "since": since}
    route = JobRoute(site, key, node)
    deadline = time.monotonic() + cfg.open_timeout_s
    why = "the keeper has not opened it yet"
    try:
        while True:
            fwd = read_state(site).forwards.get(node) or {}
            if fwd.get("state") == "open":
                problem = can_connect(LOOPBACK, cfg.listen_port)
                if problem is None:
                    return route
                why = f"the forward is recorded open but 127.0.0.1:{cfg.listen_port}: {problem}"
            elif fwd.get("state") == "failed" and fwd.get("since", 0) >= since:
                raise TunnelError(
                    f"the login node could not open the reverse tunnel to node {node}: "
                    f"{fwd.get('error')}; check [tunnel] in the site config and the node's "
                    "authorized_keys / sshd_config (hpc_jobs/tunnel.py)"
                )
            if time.monotonic() > deadline:
                log = tunnels_dir(site) / "keeper.log"
                raise TunnelError(
                    f"no reverse tunnel to node {node} after {cfg.open_timeout_s:g} s ({why}); "
                    f"is the keeper running on the login node? See {log}; it is started by "
                    "the gateway at submit, or by hand: python -m hpc_jobs.tunnel_keeper "
                    "--site <site.toml>"
                )
            time.sleep(WAIT_POLL_S)
    except BaseException:
        route.release()
        raise


def route_job(
    site: SiteConfig, task_id: int | None, needs_store: bool
) -> tuple[SiteConfig, JobRoute | None]:
    """The site config a job should use, and its tunnel route to release at the end.

    - local store: unchanged;
    - ``direct``: unchanged; whether OMERO answers from this node is logged (a clear line
      before the step's own error when compute nodes have no outbound network);
    - ``reverse_tunnel``: the forward is acquired and the store config rewritten to
      ``127.0.0.1:<listen_port>``. When it cannot be had, a step that needs the store fails
      (:class:`TunnelError`, retryable); another step runs on with a warning.
    """
    store = site.store
    if store.kind != "omero":
        return site, None
    if store.route == "direct":
        problem = can_connect(store.host or "", store.port)
        if problem is None:
            print(f"omeflow: OMERO at {store.host}:{store.port} answers from node "
                  f"{node_name()} (route direct)", flush=True)
        else:
            print(f"omeflow: WARNING: OMERO at {store.host}:{store.port} is not reachable from "
                  f"node {node_name()} ({problem}); if compute nodes have no outbound network, "
                  'set store.route = "reverse_tunnel" (hpc_jobs/tunnel.py)',
                  file=sys.stderr, flush=True)
        return site, None
    try:
        route = acquire(site, task_id)
    except TunnelError as exc:
        if needs_store:
            raise
        print(f"omeflow: WARNING: {exc}", file=sys.stderr, flush=True)
        return site, None
    port = _tunnel(site).listen_port
    print(f"omeflow: OMERO {store.host}:{store.port} reached at {LOOPBACK}:{port} through the "
          f"login node's reverse tunnel to node {route.node}", flush=True)
    routed = site.model_copy(
        update={"store": store.model_copy(
            update={"host": LOOPBACK, "port": port, "tls_name": store.tls_name or store.host}
        )}
    )
    return routed, route
