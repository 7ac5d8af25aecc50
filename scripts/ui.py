"""Start omeflow's Airflow UI: api-server, scheduler, dag-processor and triggerer on 127.0.0.1.

``make ui`` runs this with AIRFLOW_HOME = the repository (this repo's ``airflow.cfg``, state in
``var/``). The components must share the secrets they sign tokens with, or every task fails with
"Invalid auth token" (each process would invent its own):

- ``[api_auth] jwt_secret``: the scheduler signs the tasks' execution-API tokens, the api-server
  checks them (and signs the UI's login tokens);
- ``[api] secret_key``: the api-server's session / file tokens (the same in every api worker).

Both are generated once into ``var/ui_secrets.json`` (mode 0600) and passed to every component
through the environment (``AIRFLOW__API_AUTH__JWT_SECRET``, ``AIRFLOW__API__SECRET_KEY``); a value
already set in the environment wins. ``[core] fernet_key`` stays as ``airflow.cfg`` has it (empty
here: every process, ``make demo`` included, reads connections the same way).

Each component runs in its own process group; Ctrl-C or SIGTERM stops them all: SIGTERM to each
component (which stops its own workers and tasks), then, for anything still running after a
grace period, SIGTERM and SIGKILL to each group and every descendant (task processes have
groups of their own). The cluster jobs of deferred tasks (local scheduler or Slurm) are not
components: they keep running and the triggerer picks them up again on the next start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

import psutil

from hpc_jobs.fsutil import LockTimeout, atomic_write, file_lock

REPO = Path(__file__).resolve().parent.parent
AIRFLOW = str(Path(sys.executable).parent / "airflow")
#: The secrets the components share: file key → environment variable.
SHARED_SECRETS = {
    "jwt_secret": "AIRFLOW__API_AUTH__JWT_SECRET",
    "api_secret_key": "AIRFLOW__API__SECRET_KEY",
}
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
READY_LINE = "omeflow UI ready:"


class UiError(Exception):
    """The UI cannot start; the message names the fix."""


def airflow_home() -> Path:
    """``$AIRFLOW_HOME`` if set (``make`` sets it to the repository), else the repository."""
    return Path(os.environ.get("AIRFLOW_HOME") or REPO).resolve()


def shared_secrets(var: Path) -> dict[str, str]:
    """The components' shared secrets from ``var/ui_secrets.json`` (0600), created once."""
    path = var / "ui_secrets.json"
    with file_lock(var / ".ui_secrets.lock"):
        if not path.exists():
            atomic_write(path, json.dumps({k: secrets.token_urlsafe(48) for k in SHARED_SECRETS}))
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
            print(f"note: {path} was readable by others; it is now 0600", flush=True)
        try:
            values = json.loads(path.read_text())
        except ValueError:
            values = None
    if not isinstance(values, dict) or not all(
        isinstance(values.get(k), str) and len(values[k]) >= 32 for k in SHARED_SECRETS
    ):
        raise UiError(f"{path} is not a JSON object with {', '.join(SHARED_SECRETS)} (32+ "
                      "characters each); delete it and start again to generate new secrets")
    return {k: values[k] for k in SHARED_SECRETS}


def component_env(home: Path, host: str, port: int) -> dict[str, str]:
    """The environment of every component: one home, one URL, the shared secrets."""
    var = home / "var"
    var.mkdir(parents=True, exist_ok=True)
    base_url = f"http://{host}:{port}"
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__API__HOST=host,
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=base_url,
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{base_url}/execution/",
    )
    for key, value in shared_secrets(var).items():
        env.setdefault(SHARED_SECRETS[key], value)
    return env


def component_argv(name: str, host: str, port: int, workers: int) -> list[str]:
    """``airflow <name> ...`` (no component serves logs: the api-server reads them from disk)."""
    extra = {
        "api-server": ["--host", host, "--port", str(port), "--workers", str(workers)],
        "scheduler": ["--skip-serve-logs"],
        "triggerer": ["--skip-serve-logs"],
    }.get(name, [])
    return [AIRFLOW, name, *extra]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UiError(f"{host}:{port} is in use ({exc.strerror}); stop what listens there or "
                          "pick another port: make ui UI_PORT=8081") from None


def login_hint(env: dict[str, str]) -> str:
    """User and password of the SimpleAuthManager (it writes the password file at start)."""
    os.environ.update({k: v for k, v in env.items() if k.startswith("AIRFLOW")})
    from airflow.configuration import conf

    manager = conf.get("core", "auth_manager", fallback="")
    if not manager.endswith("SimpleAuthManager"):
        return f"log in with the users of {manager}"
    users = [u.split(":")[0] for u in conf.get("core", "simple_auth_manager_users").split(",")]
    pw_file = Path(conf.get("core", "simple_auth_manager_passwords_file"))
    try:
        passwords = json.loads(pw_file.read_text())
    except (OSError, ValueError):
        passwords = {}
    return "; ".join(
        f"user {u!r}, password {passwords.get(u, '(not generated yet)')!r}" for u in users if u
    ) + f" (from {pw_file})"


class Components:
    """The four Airflow processes, each in its own process group, logging to ``log_dir``."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                argv, env=self.env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.env["AIRFLOW_HOME"],
            )

    def exited(self) -> str | None:
        """The name of a component that has exited, if any."""
        return next((n for n, p in self.procs.items() if p.poll() is not None), None)

    def tail(self, name: str, n: int = 3000) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _tree(self) -> list[psutil.Process]:
        """The components and all their descendants that are still running."""
        found: dict[int, psutil.Process] = {}
        for proc in self.procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                leader = psutil.Process(proc.pid)
                for member in (leader, *leader.children(recursive=True)):
                    found[member.pid] = member
        return list(found.values())

    def _signal(self, procs: list[psutil.Process], sig: int) -> None:
        for proc in self.procs.values():  # the group: workers started by a component
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
        for member in procs:  # descendants in groups of their own (task processes)
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(sig)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM to each component: each stops its own workers and tasks, as it would under
        a service manager. Whatever is still running after ``grace_s`` (a component, or one of
        their descendants in any process group) gets SIGTERM, then SIGKILL."""
        tree = self._tree()
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
        left = alive + [p for p in self._tree() if p.pid not in {a.pid for a in alive}]
        if left:
            print(f"{len(left)} process(es) still running {grace_s:.0f} s after SIGTERM: "
                  "SIGTERM to all, SIGKILL after 10 s", flush=True)
            self._signal(left, signal.SIGTERM)
            _, left = psutil.wait_procs(left, timeout=10)
            self._signal(left, signal.SIGKILL)
            psutil.wait_procs(left, timeout=10)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def wait_for_api(base_url: str, comps: Components, timeout_s: float) -> None:
    """Until ``/api/v2/monitor/health`` answers 200; fails if a component exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = comps.exited()
        if dead:
            raise UiError(f"airflow {dead} exited before the UI was up; its log "
                          f"({comps.log_dir / (dead + '.log')}) ends with:\n{comps.tail(dead)}")
        try:
            with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=5) as reply:  # noqa: S310
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise UiError(f"the api-server did not answer on {base_url} within {timeout_s:.0f} s; see "
                  f"{comps.log_dir / 'api-server.log'} (or raise --start-timeout)")


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the api-server listens on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1, help="api-server workers")
    parser.add_argument("--run-for", type=float, default=None, metavar="SECONDS",
                        help="stop by itself after this long (smoke tests); default: until "
                        "Ctrl-C / SIGTERM")
    parser.add_argument("--start-timeout", type=float, default=300.0, metavar="SECONDS")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="component logs (default: $AIRFLOW_HOME/var/logs/ui)")
    args = parser.parse_args(argv)

    home = airflow_home()
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        with file_lock(home / "var" / "ui.lock", timeout=0):
            return run(args, home)
    except LockTimeout:
        print(f"error: another `make ui` uses {home} (lock {home / 'var' / 'ui.lock'}); stop it "
              "first", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, home: Path) -> int:
    """Start the components, wait until the UI answers, keep them up until told to stop."""
    base_url = f"http://{args.host}:{args.port}"
    comps: Components | None = None
    try:
        check_port_free(args.host, args.port)
        env = component_env(home, args.host, args.port)
        comps = Components(env, args.log_dir or home / "var" / "logs" / "ui")
        print(f"starting {', '.join(COMPONENTS)} (AIRFLOW_HOME={home}, logs in "
              f"{comps.log_dir})", flush=True)
        for name in COMPONENTS:
            comps.start(name, component_argv(name, args.host, args.port, args.workers))
        pids = " ".join(f"{n}={p.pid}" for n, p in comps.procs.items())
        print(f"components: {pids}", flush=True)
        wait_for_api(base_url, comps, args.start_timeout)
        print(f"{READY_LINE} {base_url}\nlogin: {login_hint(env)}\nstop with Ctrl-C", flush=True)
        deadline = None if args.run_for is None else time.monotonic() + args.run_for
        while deadline is None or time.monotonic() < deadline:
            dead = comps.exited()
            if dead:
                raise UiError(f"airflow {dead} exited; its log ends with:\n{comps.tail(dead)}")
            time.sleep(1.0)
        print(f"--run-for {args.run_for:g} s is over: stopping", flush=True)
        return 0
    except UiError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except _Stop as stop:
        print(f"{stop}: stopping", flush=True)
        return 0
    finally:
        if comps is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            comps.stop()
            print("all components stopped", flush=True)

if __name__ == "__main__":
    sys.exit(main())
