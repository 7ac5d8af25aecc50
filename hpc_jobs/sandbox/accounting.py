"""Slurm accounting in the sandbox: MariaDB (socket only) and slurmdbd, both from Debian.

``ensure_accounting()`` runs before slurmctld starts: MariaDB on Debian's data directory with
no TCP listener (``--skip-networking``), the ``slurm_acct_db`` database and its user (a random
password that lives only in ``slurmdbd.conf``, 0600, owned by SlurmUser), slurmdbd on
127.0.0.1:6819, and the cluster registered with ``sacctmgr``. slurm.conf then points
``AccountingStorageType=accounting_storage/slurmdbd`` at it (see ``setup.slurm_conf_text``).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import subprocess
import time

from hpc_jobs.fsutil import atomic_write
from hpc_jobs.sandbox import paths as P
from hpc_jobs.sandbox.setup import SandboxError, log, pid_alive, run, stop_pid, wait_for

#: The sandbox's SlurmUser (slurm.conf): slurmdbd.conf must belong to it.
SLURM_USER = "root"


def _mariadb_argv() -> list[str]:
    return [
        "/usr/sbin/mariadbd", "--no-defaults", "--user=mysql",
        f"--datadir={P.MARIADB_DATADIR}", f"--socket={P.MARIADB_SOCKET}",
        f"--pid-file={P.MARIADB_PID}", f"--log-error={P.MARIADB_LOG}",
        # log size and lock wait as slurmdbd asks; it would like a larger buffer pool than
        # MariaDB's default 128M (it logs "not recommended"), which a sandbox does not need
        "--skip-networking", "--innodb-buffer-pool-size=128M", "--innodb-log-file-size=64M",
        "--innodb-lock-wait-timeout=900",
    ]


def _sql(statements: str) -> str:
    """Run SQL as MariaDB's root (unix-socket authentication: we are root); SQL on stdin."""
    proc = subprocess.run(
        ["mariadb", "--no-defaults", f"--socket={P.MARIADB_SOCKET}", "-u", "root",
         "--batch", "--skip-column-names"],
        input=statements, capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        raise SandboxError(f"MariaDB refused the sandbox's SQL: {proc.stderr.strip()}")
    return proc.stdout


def _mariadb_ok() -> bool:
    proc = run(["mariadb-admin", "--no-defaults", f"--socket={P.MARIADB_SOCKET}", "-u", "root",
                "ping"], check=False, timeout=10)
    return proc.returncode == 0


def ensure_mariadb() -> None:
    """A running MariaDB that listens on its unix socket only."""
    mysql = pwd.getpwnam("mysql")
    for d in (P.MARIADB_RUN, P.MARIADB_LOG.parent):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, mysql.pw_uid, mysql.pw_gid)
    if not (P.MARIADB_DATADIR / "mysql").is_dir():
        log(f"initialising MariaDB in {P.MARIADB_DATADIR}")
        run(["mariadb-install-db", "--no-defaults", "--user=mysql",
             f"--datadir={P.MARIADB_DATADIR}", "--auth-root-authentication-method=socket",
             "--skip-test-db"], timeout=300)
    if pid_alive(P.MARIADB_PID, "mariadbd") and _mariadb_ok():
        return
    log("starting MariaDB (socket only)")
    with open(os.devnull, "rb") as null_in, open(os.devnull, "wb") as null_out:
        subprocess.Popen(  # noqa: S603 - fixed argv; mariadbd does not daemonise itself
            _mariadb_argv(), stdin=null_in, stdout=null_out, stderr=null_out,
            start_new_session=True, close_fds=True,
        )
    wait_for(_mariadb_ok, 60, f"MariaDB to answer on {P.MARIADB_SOCKET} (see {P.MARIADB_LOG})")


def _storage_password() -> str:
    """The password already in slurmdbd.conf, or a new random one (hex: no quoting needed)."""
    if P.SLURMDBD_CONF.exists():
        m = re.search(r"^StoragePass=([0-9a-f]{32,})$", P.SLURMDBD_CONF.read_text(), re.M)
        if m:
            return m.group(1)
    return secrets.token_hex(24)


def slurmdbd_conf_text(password: str) -> str:
    """slurmdbd.conf: munge auth, 127.0.0.1:6819, MariaDB through its socket."""
    return f"""# Written by `omeflow sandbox start` (hpc_jobs/sandbox). 0600, owned by SlurmUser.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={P.SLURMDBD_PORT}
SlurmUser={SLURM_USER}
PidFile={P.SLURMDBD_PID}
LogFile={P.SLURMDBD_LOG}
DebugLevel=info
StorageType=accounting_storage/mysql
# "localhost": the MariaDB client library connects through the default unix socket
StorageHost=localhost
StorageLoc={P.ACCT_DB}
StorageUser={P.ACCT_DB_USER}
StoragePass={password}
"""


def _slurmdbd_ok() -> bool:
    """slurmdbd answers sacctmgr (slurm.conf must already name accounting_storage/slurmdbd)."""
    proc = run(["sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster"], check=False,
               timeout=15)
    return proc.returncode == 0


def ensure_slurmdbd() -> None:
    """Database and user, slurmdbd.conf, a running slurmdbd, the cluster registered."""
    password = _storage_password()
    _sql(
        f"CREATE DATABASE IF NOT EXISTS {P.ACCT_DB};\n"
        f"CREATE USER IF NOT EXISTS '{P.ACCT_DB_USER}'@'localhost' IDENTIFIED BY '{password}';\n"
        f"ALTER USER '{P.ACCT_DB_USER}'@'localhost' IDENTIFIED BY '{password}';\n"
        f"GRANT ALL PRIVILEGES ON {P.ACCT_DB}.* TO '{P.ACCT_DB_USER}'@'localhost';\n"
    )
    text = slurmdbd_conf_text(password)
    P.SLURMDBD_CONF.parent.mkdir(parents=True, exist_ok=True)
    changed = not P.SLURMDBD_CONF.exists() or P.SLURMDBD_CONF.read_text() != text
    if changed:
        atomic_write(P.SLURMDBD_CONF, text, mode=0o600)
    owner = pwd.getpwnam(SLURM_USER)
    os.chown(P.SLURMDBD_CONF, owner.pw_uid, owner.pw_gid)
    P.SLURM_DIR.mkdir(parents=True, exist_ok=True)
    if changed:
        stop_pid(P.SLURMDBD_PID, "slurmdbd")
    if not pid_alive(P.SLURMDBD_PID, "slurmdbd"):
        log("starting slurmdbd")
        run(["/usr/sbin/slurmdbd"], timeout=60)
    wait_for(_slurmdbd_ok, 90, f"slurmdbd to answer sacctmgr (see {P.SLURMDBD_LOG})")
    clusters = run(["sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster"],
                   timeout=30).stdout.split()
    if P.CLUSTER not in clusters:
        log(f"registering cluster {P.CLUSTER} with slurmdbd")
        run(["sacctmgr", "-i", "add", "cluster", P.CLUSTER], timeout=30)


def ensure_accounting() -> None:
    """MariaDB, then slurmdbd (after slurm.conf is written, before slurmctld starts)."""
    t0 = time.monotonic()
    ensure_mariadb()
    ensure_slurmdbd()
    log(f"accounting (MariaDB + slurmdbd) ready in {time.monotonic() - t0:.0f}s")


def stop_accounting() -> list[str]:
    """Stop slurmdbd, then MariaDB; returns the names of those that were running."""
    stopped = []
    if stop_pid(P.SLURMDBD_PID, "slurmdbd"):
        stopped.append("slurmdbd")
    if stop_pid(P.MARIADB_PID, "mariadbd", timeout=60):
        stopped.append("mariadbd")
    return stopped
