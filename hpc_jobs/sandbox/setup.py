"""The steps of ``omeflow sandbox start`` / ``stop``. Each step is idempotent.

Runs as root on a Debian machine: apt packages, munge, Slurm accounting (MariaDB on a socket
and slurmdbd, see ``accounting.py``), Slurm (slurmctld + slurmd on 127.0.0.1), the ``omeflow``
service user, the cluster-side venv, the site config, and an sshd on 127.0.0.1:2222 whose only
key for ``omeflow`` is the forced gateway command.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from hpc_jobs.sandbox import paths as P


class SandboxError(RuntimeError):
    """A sandbox step failed; the message says what to check."""


def log(msg: str) -> None:
    """Progress line on stderr (stdout is kept for ``env``'s JSON)."""
    import sys

    print(f"[sandbox] {msg}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str], timeout: float = 120, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run argv (never a shell) with a timeout; raise SandboxError with stderr on failure."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, **kw,
        )
    except subprocess.TimeoutExpired:
        raise SandboxError(f"{' '.join(argv)} timed out after {timeout}s") from None
    except FileNotFoundError:
        raise SandboxError(f"{argv[0]} not found; is its package installed?") from None
    if check and proc.returncode != 0:
        raise SandboxError(
            f"{' '.join(argv)} failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc


def require_root() -> None:
    """The sandbox manages system daemons and users: root only."""
    if os.geteuid() != 0:
        raise SandboxError("the HPC sandbox must be started as root (try: sudo make hpc-sandbox)")


# ---------------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------------
def pid_alive(pidfile: Path, comm: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and its name starts with ``comm``."""
    try:
        pid = int(Path(pidfile).read_text().split()[0])
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if name.startswith(comm[:15]) else None


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_pid(pidfile: Path, comm: str, timeout: float = 20) -> bool:
    """SIGTERM the process of ``pidfile`` (if it is ``comm``), wait for it to exit (daemons
    remove their pidfile early, so wait on the pid itself), SIGKILL if it hangs."""
    pid = pid_alive(pidfile, comm)
    if pid is None:
        Path(pidfile).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.2)
    if _running(pid):
        log(f"{comm} (pid {pid}) ignored SIGTERM for {timeout}s; killing it")
        os.kill(pid, signal.SIGKILL)
    Path(pidfile).unlink(missing_ok=True)
    return True


def wait_for(pred, timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``pred()`` until true or raise SandboxError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise SandboxError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def ensure_packages() -> None:
    """apt-get install what is missing (skipped when everything is installed)."""
    missing = []
    for pkg in P.APT_PACKAGES:
        proc = run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False, timeout=30)
        if "install ok installed" not in proc.stdout:
            missing.append(pkg)
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update"], timeout=600, env=env)
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing], timeout=1200, env=env)


def _munge_ok() -> bool:
    cred = run(["munge", "-n"], check=False, timeout=10)
    if cred.returncode != 0:
        return False
    proc = subprocess.run(
        ["unmunge"], input=cred.stdout, capture_output=True, text=True, timeout=10
    )
    return proc.returncode == 0


def ensure_munge() -> None:
    """A munge key (created if missing) and a running munged."""
    munge = pwd.getpwnam("munge")
    if not P.MUNGE_KEY.exists():
        log("creating munge key")
        P.MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(P.MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chown(P.MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    for d in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    if _munge_ok():
        return
    log("starting munged")
    P.RUN_DIR.mkdir(parents=True, exist_ok=True)
    os.chown(P.RUN_DIR, munge.pw_uid, munge.pw_gid)
    run(
        ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force",
         f"--pid-file={P.MUNGED_PID}", f"--log-file={P.MUNGED_LOG}"],
        timeout=30,
    )
    wait_for(_munge_ok, 15, "munged to answer (see " + str(P.MUNGED_LOG) + ")")


def node_size() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) of the sandbox's one node."""
    cpus = os.cpu_count() or 1
    mem_total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return cpus, max(512, int(mem_total_mb * 0.9))


def slurm_conf_text() -> str:
    """slurm.conf for one node on 127.0.0.1 that runs several 1-CPU jobs at once."""
    host = socket.gethostname().split(".")[0]
    cpus, real_mem = node_size()
    return f"""# Written by `omeflow sandbox start` (hpc_jobs/sandbox). Overwritten on every start.
ClusterName={P.CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
StateSaveLocation={P.SLURMCTLD_STATE}
SlurmdSpoolDir={P.SLURMD_SPOOL}
SlurmctldPidFile={P.SLURMCTLD_PID}
SlurmdPidFile={P.SLURMD_PID}
SlurmctldLogFile={P.SLURMCTLD_LOG}
SlurmdLogFile={P.SLURMD_LOG}
SlurmctldPort=6817
SlurmdPort=6818
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Accounting: slurmdbd (MariaDB) keeps every job's final state, exit code, elapsed, MaxRSS.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={P.SLURMDBD_PORT}
JobAcctGatherType=jobacct_gather/linux
# Sample each task's memory every second (Slurm's default, 30 s, misses short peaks).
JobAcctGatherFrequency=task=1
JobCompType=jobcomp/none
MailProg=/bin/true
# Jobs that ask for no memory get 1 GiB per CPU (not the whole node), so several run at once.
DefMemPerCPU=1024
# Slurm's default: finished jobs leave slurmctld after 5 minutes; sacct has them for good.
MinJobAge=300
OverTimeLimit=0
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_mem} State=UNKNOWN
PartitionName={P.PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _node_state() -> str:
    proc = run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=15)
    return proc.stdout.strip().lower() if proc.returncode == 0 else ""


def write_slurm_conf() -> bool:
    """Write slurm.conf (the accounting tools read it too); True when it changed."""
    text = slurm_conf_text()
    P.SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    changed = not P.SLURM_CONF.exists() or P.SLURM_CONF.read_text() != text
    if changed:
        P.SLURM_CONF.write_text(text)
        P.SLURM_CONF.chmod(0o644)
    return changed


def ensure_slurm(changed: bool) -> None:
    """Start slurmctld and slurmd (restarted when slurm.conf ``changed``), wait for the node
    to be usable."""
    for d in (P.SLURM_DIR, P.SLURMCTLD_STATE, P.SLURMD_SPOOL):
        d.mkdir(parents=True, exist_ok=True)
    if changed:  # daemons must re-read the file
        stop_pid(P.SLURMD_PID, "slurmd")
        stop_pid(P.SLURMCTLD_PID, "slurmctld")
    if not pid_alive(P.SLURMCTLD_PID, "slurmctld"):
        log("starting slurmctld")
        run(["/usr/sbin/slurmctld"], timeout=60)
    wait_for(
        lambda: run(["scontrol", "ping"], check=False, timeout=10).stdout.count("UP") > 0,
        60, f"slurmctld to answer (see {P.SLURMCTLD_LOG})",
    )
    if not pid_alive(P.SLURMD_PID, "slurmd"):
        log("starting slurmd")
        run(["/usr/sbin/slurmd"], timeout=60)
    host = socket.gethostname().split(".")[0]

    def usable() -> bool:
        state = _node_state()
        if any(s in state for s in ("down", "drain", "fail")):
            run(["scontrol", "update", f"NodeName={host}", "State=RESUME"], check=False,
                timeout=15)
            return False
        return any(s in state for s in ("idle", "mix", "alloc"))

    wait_for(usable, 90, f"node {host} to become idle (see {P.SLURMD_LOG})", interval=1)


def ensure_user() -> pwd.struct_passwd:
    """The unprivileged service user (no password, but not locked: sshd refuses locked ones)."""
    try:
        pw = pwd.getpwnam(P.USER)
    except KeyError:
        log(f"creating user {P.USER}")
        run(["useradd", "-m", "-s", "/bin/bash", P.USER], timeout=30)
        pw = pwd.getpwnam(P.USER)
    run(["usermod", "-p", "*", P.USER], timeout=30)
    home = Path(pw.pw_dir)
    home.chmod(0o750)
    return pw


def repo_root() -> Path:
    """The source tree this module was imported from (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise SandboxError(
            f"cannot find pyproject.toml above {__file__}; run the sandbox from a source "
            "checkout with the project installed editable (pip install -e .)"
        )
    return root


def _deps_hash(root: Path) -> str:
    h = hashlib.sha256((root / "pyproject.toml").read_bytes())
    h.update(P.TORCH_WHEEL.name.encode())
    return h.hexdigest()[:16]


def _source_copy(root: Path, dest: Path) -> Path:
    """Copy just what the wheel needs (no .venv, no build/ in the checkout)."""
    src = dest / "omeflow-src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            shutil.copy2(root / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("hpc_jobs", "hooks", "operators"):
        if (root / pkg).is_dir():
            shutil.copytree(root / pkg, src / pkg, ignore=ignore)
    return src


def ensure_venv() -> None:
    """Cluster-side venv: deps once per pyproject hash, the omeflow package on every start."""
    root = repo_root()
    pip = [str(P.HPC_PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    old_umask = os.umask(0o022)
    try:
        if not P.HPC_PYTHON.exists():
            log(f"creating {P.HPC_VENV} (Debian python3)")
            P.HPC_PREFIX.mkdir(parents=True, exist_ok=True)
            run(["/usr/bin/python3", "-m", "venv", str(P.HPC_VENV)], timeout=300)
        P.HPC_PREFIX.chmod(0o755)
        marker = P.HPC_PREFIX / f".deps-{_deps_hash(root)}"
        with tempfile.TemporaryDirectory(prefix="omeflow-sandbox-") as tmp:
            src = _source_copy(root, Path(tmp))
            if not marker.exists():
                if not P.TORCH_WHEEL.exists():
                    raise SandboxError(
                        f"{P.TORCH_WHEEL} is missing; put the CPU torch wheel there "
                        "(never let pip resolve torch: it pulls the CUDA build)"
                    )
                log("installing torch (local CPU wheel) and the [hpc] extra: a few minutes")
                run([*pip, "install", str(P.TORCH_WHEEL)], timeout=1800)
                run([*pip, "install", f"{src}[hpc]"], timeout=3600)
                for old in P.HPC_PREFIX.glob(".deps-*"):
                    old.unlink()
                marker.write_text("ok\n")
            log("reinstalling the omeflow package into the cluster venv")
            run([*pip, "install", "--no-deps", "--force-reinstall", str(src)], timeout=600)
    finally:
        os.umask(old_umask)
    if not P.HPC_GATEWAY.exists():
        raise SandboxError(f"{P.HPC_GATEWAY} missing after install; check pyproject [scripts]")


def ensure_dirs(pw: pwd.struct_passwd) -> None:
    """Job/data/store dirs owned by the service user; root-owned, world-readable site.toml."""
    from hpc_jobs.config import ModelsConfig, SiteConfig, SlurmConfig, StoreConfig
    from hpc_jobs.segmentation.model import bootstrapped_model_path

    P.ROOT.mkdir(parents=True, exist_ok=True)
    P.ROOT.chmod(0o755)
    for d in (P.JOBS, P.DATA, P.STORE):
        d.mkdir(exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        d.chmod(0o755)
    # The site's Cellpose weights: the bootstrapped model (in root's cache, which the service
    # user cannot read) is copied to a world-readable folder, as a site installs its weights.
    models = P.ROOT / "models"
    models.mkdir(exist_ok=True)
    models.chmod(0o755)
    boot = bootstrapped_model_path()
    weights = models / boot.name
    if boot.is_file():
        shutil.copy2(boot, weights)
        weights.chmod(0o644)
    else:
        log(f"no bootstrapped Cellpose model at {boot}; run `omeflow bootstrap-model` and "
            "restart the sandbox before segmenting on it")
    # the node's size is the most a job can get: larger step defaults are scaled down
    cpus, mem_mb = node_size()
    site = SiteConfig(
        job_root=P.JOBS,
        data_root=P.DATA,
        scheduler="slurm",
        python=P.HPC_PYTHON,
        store=StoreConfig(kind="local", path=P.STORE),
        slurm=SlurmConfig(partition=P.PARTITION, max_cpus=cpus, max_mem_mb=mem_mb),
        models=ModelsConfig(cellpose=weights),
    )
    P.SITE_TOML.write_text(site.to_toml())
    os.chown(P.SITE_TOML, 0, 0)
    P.SITE_TOML.chmod(0o644)


def fix_permissions() -> None:
    """Give store/, data/ and jobs/ back to the service user (after root-run tests wrote there)."""
    pw = pwd.getpwnam(P.USER)
    for top in (P.STORE, P.DATA, P.JOBS):
        if not top.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, pw.pw_uid, pw.pw_gid)


def sshd_config_text() -> str:
    """sshd configuration of the sandbox (its own file; /etc/ssh is untouched)."""
    return f"""# Written by `omeflow sandbox start`. Only {P.USER}, only keys, only 127.0.0.1.
Port {P.SSH_PORT}
ListenAddress {P.HOST}
HostKey {P.SSHD_HOST_KEY}
PidFile {P.SSHD_PID}
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers {P.USER}
UsePAM no
StrictModes yes
PermitUserEnvironment no
AllowTcpForwarding no
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTunnel no
PrintMotd no
LogLevel VERBOSE
"""


def ensure_client_key(pw: pwd.struct_passwd) -> None:
    """Orchestrator key (root only) and its forced-command line in ~omeflow/.ssh."""
    from hpc_jobs.keys import authorized_keys_line, generate_keypair

    P.CLIENT_DIR.mkdir(parents=True, exist_ok=True)
    P.CLIENT_DIR.chmod(0o700)
    if not P.CLIENT_KEY.exists():
        P.CLIENT_KEY.with_suffix(".pub").unlink(missing_ok=True)
        generate_keypair(P.CLIENT_KEY, "omeflow-sandbox-client")
    P.CLIENT_KEY.chmod(0o600)
    public = P.CLIENT_KEY.with_suffix(".pub").read_text().strip()
    line = authorized_keys_line(
        public, P.HPC_GATEWAY, P.SITE_TOML, from_="127.0.0.1", caller=P.CALLER
    )
    ssh_dir = Path(pw.pw_dir) / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    auth = ssh_dir / "authorized_keys"
    # Keep lines someone else added (e.g. per-user keys from `omeflow keys`); replace ours.
    others = []
    if auth.exists():
        others = [
            ln for ln in auth.read_text().splitlines()
            if ln.strip() and not ln.rstrip().endswith(" omeflow-sandbox-client")
        ]
    auth.write_text("\n".join([line, *others]) + "\n")
    for p, mode in ((ssh_dir, 0o700), (auth, 0o600)):
        os.chown(p, pw.pw_uid, pw.pw_gid)
        p.chmod(mode)


def ensure_sshd() -> None:
    """Host key, config, known_hosts for the client, and a running sshd on 127.0.0.1:2222."""
    P.SSHD_DIR.mkdir(parents=True, exist_ok=True)
    P.SSHD_DIR.chmod(0o755)
    if not P.SSHD_HOST_KEY.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "omeflow-sandbox-host",
             "-f", str(P.SSHD_HOST_KEY)], timeout=30)
    P.SSHD_HOST_KEY.chmod(0o600)
    ktype, blob = P.SSHD_HOST_KEY.with_suffix(".pub").read_text().split()[:2]
    P.KNOWN_HOSTS.write_text(f"[{P.HOST}]:{P.SSH_PORT} {ktype} {blob}\n")
    P.KNOWN_HOSTS.chmod(0o600)
    text = sshd_config_text()
    changed = not P.SSHD_CONFIG.exists() or P.SSHD_CONFIG.read_text() != text
    P.SSHD_CONFIG.write_text(text)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    run(["/usr/sbin/sshd", "-t", "-f", str(P.SSHD_CONFIG)], timeout=30)
    if changed:
        stop_pid(P.SSHD_PID, "sshd")
    if not pid_alive(P.SSHD_PID, "sshd"):
        log(f"starting sshd on {P.HOST}:{P.SSH_PORT}")
        run(["/usr/sbin/sshd", "-f", str(P.SSHD_CONFIG), "-E", str(P.SSHD_LOG)], timeout=30)
        wait_for(lambda: pid_alive(P.SSHD_PID, "sshd") is not None, 15,
                 f"sshd to start (see {P.SSHD_LOG})")


def start() -> None:
    """Bring the whole sandbox up (idempotent)."""
    from hpc_jobs.sandbox import accounting

    require_root()
    t0 = time.monotonic()
    ensure_packages()
    ensure_munge()
    changed = write_slurm_conf()
    accounting.ensure_accounting()
    ensure_slurm(changed)
    pw = ensure_user()
    ensure_venv()
    ensure_dirs(pw)
    ensure_client_key(pw)
    ensure_sshd()
    log(f"up in {time.monotonic() - t0:.0f}s")


def stop() -> list[str]:
    """Stop every daemon the sandbox started; returns their names."""
    from hpc_jobs.sandbox import accounting

    require_root()
    stopped = []
    for name, pidfile in (
        ("sshd", P.SSHD_PID),
        ("slurmd", P.SLURMD_PID),
        ("slurmctld", P.SLURMCTLD_PID),
    ):
        if stop_pid(pidfile, name):
            stopped.append(name)
    stopped += accounting.stop_accounting()
    if stop_pid(P.MUNGED_PID, "munged"):
        stopped.append("munged")
    return stopped


def status() -> dict[str, int | None]:
    """pid (or None) of each sandbox daemon."""
    return {
        "munged": pid_alive(P.MUNGED_PID, "munged"),
        "mariadbd": pid_alive(P.MARIADB_PID, "mariadbd"),
        "slurmdbd": pid_alive(P.SLURMDBD_PID, "slurmdbd"),
        "slurmctld": pid_alive(P.SLURMCTLD_PID, "slurmctld"),
        "slurmd": pid_alive(P.SLURMD_PID, "slurmd"),
        "sshd": pid_alive(P.SSHD_PID, "sshd"),
    }
