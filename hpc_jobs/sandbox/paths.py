"""Where the HPC-in-a-box keeps its files. One place, so tests and the CLI agree."""

from __future__ import annotations

from pathlib import Path

#: Everything the sandbox owns (except Slurm/munge system paths and the cluster venv).
ROOT = Path("/srv/omeflow-sandbox")
JOBS = ROOT / "jobs"
DATA = ROOT / "data"
STORE = ROOT / "store"
SITE_TOML = ROOT / "site.toml"
CLIENT_DIR = ROOT / "client"
CLIENT_KEY = CLIENT_DIR / "id_ed25519"
KNOWN_HOSTS = CLIENT_DIR / "known_hosts"
SSHD_DIR = ROOT / "sshd"
SSHD_CONFIG = SSHD_DIR / "sshd_config"
SSHD_HOST_KEY = SSHD_DIR / "ssh_host_ed25519_key"
SSHD_PID = SSHD_DIR / "sshd.pid"
SSHD_LOG = SSHD_DIR / "sshd.log"
SLURM_DIR = ROOT / "slurm"
SLURMCTLD_PID = SLURM_DIR / "slurmctld.pid"
SLURMD_PID = SLURM_DIR / "slurmd.pid"
SLURMCTLD_LOG = SLURM_DIR / "slurmctld.log"
SLURMD_LOG = SLURM_DIR / "slurmd.log"
SLURMDBD_PID = SLURM_DIR / "slurmdbd.pid"
SLURMDBD_LOG = SLURM_DIR / "slurmdbd.log"
RUN_DIR = ROOT / "run"
#: munged pid file, written only when the sandbox started munged itself.
MUNGED_PID = RUN_DIR / "munged.pid"
MUNGED_LOG = RUN_DIR / "munged.log"

SLURM_CONF = Path("/etc/slurm/slurm.conf")
SLURMCTLD_STATE = Path("/var/spool/slurmctld")
SLURMD_SPOOL = Path("/var/spool/slurmd")
SLURMDBD_CONF = Path("/etc/slurm/slurmdbd.conf")
SLURMDBD_PORT = 6819
MUNGE_KEY = Path("/etc/munge/munge.key")

#: MariaDB for slurmdbd: Debian's data directory (the package initialises it), no TCP
#: listener at all (``--skip-networking``); clients reach it on Debian's default socket.
MARIADB_DATADIR = Path("/var/lib/mysql")
MARIADB_RUN = Path("/run/mysqld")
MARIADB_SOCKET = MARIADB_RUN / "mysqld.sock"
MARIADB_PID = MARIADB_RUN / "mariadbd.pid"
MARIADB_LOG = Path("/var/log/mysql/omeflow-sandbox.err")
#: slurmdbd's database and its MariaDB user (password: StoragePass in SLURMDBD_CONF only).
ACCT_DB = "slurm_acct_db"
ACCT_DB_USER = "slurm"

#: The cluster-side Python (must be readable by the service user: not under /root).
HPC_PREFIX = Path("/opt/omeflow-hpc")
HPC_VENV = HPC_PREFIX / "venv"
HPC_PYTHON = HPC_VENV / "bin" / "python"
HPC_GATEWAY = HPC_VENV / "bin" / "omeflow-gateway"
TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")

USER = "omeflow"
#: The gateway caller of the orchestrator's key (``--caller`` on its forced command line).
CALLER = "airflow"
HOST = "127.0.0.1"
SSH_PORT = 2222
PARTITION = "debug"
CLUSTER = "omeflow-sandbox"
APT_PACKAGES = (
    "slurm-wlm", "munge", "openssh-server", "python3-venv", "slurmdbd", "mariadb-server",
)
