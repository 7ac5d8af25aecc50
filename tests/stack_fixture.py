"""A running Airflow stack for tests that need real components: ``scripts/ui.py`` (what
``make ui`` runs: api-server, scheduler, dag-processor, triggerer on 127.0.0.1) in a throw-away
``AIRFLOW_HOME``, and an authenticated REST client.

``live_stack`` (session scope) is shared by the browser, REST-script and HPC-jobs-page tests:
one start-up for all of them. Its home is its own (not ``airflow_env``'s), so tests that start
their own stack on ``airflow_env`` (``test_rest_and_plugin``) do not collide with it.

``live_stack``'s metadata database is a new database in the local PostgreSQL (as a deployment
runs Airflow; ``tests/postgres_fixture.py`` starts the server and the test role), dropped at
the end of the session. Where PostgreSQL cannot be had it falls back to SQLite with a warning
in the test summary, unless ``OMEFLOW_REQUIRE_POSTGRES=1`` (``make test``): then it fails.
``test_rest_and_plugin``'s own stack stays on SQLite (the embedded default), so both backends
run the real components.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.postgres_fixture import (
    REQUIRE_ENV,
    PostgresUnavailable,
    ensure_postgres,
    scratch_database,
)

REPO = Path(__file__).resolve().parent.parent
UI_SCRIPT = REPO / "scripts" / "ui.py"
START_TIMEOUT_S = 300
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
#: Settings that make a test stack react in seconds (the defaults suit a site, not a test).
FAST_ENV = {
    # a retried cluster-step task (see [omeflow] hpc_task_retries) waits 5 s, not 2 min
    "AIRFLOW__OMEFLOW__HPC_RETRY_DELAY_S": "5",
    "AIRFLOW__CORE__PARALLELISM": "2",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
    # A task's calls to the execution API time out after 5 s by default; on a loaded CI machine
    # the api-server took 39 s to start a task, the task's retry of that (already applied) call
    # got HTTP 400 and the task failed. Airflow's advice for high load: a longer timeout.
    "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "90",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail_of(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


class Stack:
    """``scripts/ui.py`` running in the background, its output and an authenticated client."""

    def __init__(self, base_url: str, env: dict[str, str], logs: Path) -> None:
        self.base_url = base_url
        self.env = env
        self.logs = logs
        self.home = Path(env["AIRFLOW_HOME"])
        #: Airflow's metadata database (``postgresql+psycopg://…`` or ``sqlite:///…``).
        self.metadata_db = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") or "sqlite (airflow.cfg)"
        self.out = logs / "ui.out"
        self.ui: subprocess.Popen[bytes] | None = None
        self.pids: dict[str, int] = {}
        self.token = ""
        self.password = ""
        self.http = httpx.Client(base_url=base_url, timeout=30.0, follow_redirects=False)

    def start(self, port: int) -> None:
        with open(self.out, "wb") as out:
            self.ui = subprocess.Popen(
                [sys.executable, str(UI_SCRIPT), "--port", str(port), "--log-dir", str(self.logs)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=REPO,
            )

    def output(self) -> str:
        return tail_of(self.out, 100_000)

    def check_alive(self) -> None:
        assert self.ui is not None
        if self.ui.poll() is not None:
            raise AssertionError(f"scripts/ui.py exited with {self.ui.returncode}:\n"
                                 f"{self.output()[-4000:]}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        return "\n".join(
            f"---- {name} ----\n{tail_of(self.logs / f'{name}.log', 2500)}" for name in COMPONENTS
        )

    def stop(self) -> int | None:
        """SIGTERM to the script (what Ctrl-C does): it stops every component; its exit code."""
        self.http.close()
        if self.ui is None:
            return None
        if self.ui.poll() is None:
            self.ui.send_signal(signal.SIGTERM)
        try:
            return self.ui.wait(timeout=90)
        except subprocess.TimeoutExpired:
            return None
        finally:
            # whatever the script did, leave nothing behind for the next tests
            for pid in [self.ui.pid, *self.pids.values()]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ui.wait(timeout=10)

    def api(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        return self.http.request(method, path, headers=headers, **kwargs)

    def unpause(self, dag_id: str, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until ``dag_id`` is parsed, then unpause it."""
        self.wait_for(f"{dag_id} to be parsed",
                      lambda: self.api("GET", f"/api/v2/dags/{dag_id}").status_code == 200,
                      timeout)
        reply = self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        assert reply.status_code == 200 and reply.json()["is_paused"] is False, reply.text

    def wait_for(self, what: str, probe: Any, timeout: float, interval: float = 2.0) -> Any:
        """Call ``probe()`` until it returns something truthy (bounded; fails with the logs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                value = probe()
            except httpx.TransportError:
                value = None
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                             f"{self.output()[-3000:]}\n{self.diagnostics()}")


def home_processes(home: Path) -> list[str]:
    """Processes (other than this one) whose AIRFLOW_HOME is ``home``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("AIRFLOW_HOME") == str(home):
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:200]}")
    return found


def start_stack(env: dict[str, str], logs: Path, unpause: Iterable[str] = ()) -> Stack:
    """Start ``scripts/ui.py`` with ``env`` on a free port, log in as admin, wait until each DAG
    in ``unpause`` is parsed and unpause it. The caller stops it (``Stack.stop``)."""
    port = free_port()
    st = Stack(f"http://127.0.0.1:{port}", env, logs)
    try:
        st.start(port)
        ready = st.wait_for("scripts/ui.py to say the UI is ready",
                            lambda: re.search(r"omeflow UI ready: (\S+)", st.output()),
                            START_TIMEOUT_S)
        assert ready.group(1) == st.base_url, st.output()
        pids_line = st.output().split("components:")[1].split("\n")[0]
        st.pids = {name: int(pid) for name, pid in re.findall(r"([a-z-]+)=(\d+)", pids_line)}
        assert sorted(st.pids) == sorted(COMPONENTS), st.output()
        login = re.search(r"user 'admin', password '([^']+)'", st.output())
        assert login, f"the script prints the login:\n{st.output()}"
        st.password = login.group(1)
        # the api-server's first request loads most of its app: on a loaded machine it may take
        # longer than one client timeout, so a timed-out login is tried again (bounded)
        reply = st.wait_for("POST /auth/token to answer", lambda: st.http.post(
            "/auth/token", json={"username": "admin", "password": st.password}), START_TIMEOUT_S)
        assert reply.status_code == 201, reply.text
        st.token = reply.json()["access_token"]
        for dag_id in unpause:
            st.wait_for(f"{dag_id} to be parsed",
                        lambda d=dag_id: st.api("GET", f"/api/v2/dags/{d}").status_code == 200,
                        START_TIMEOUT_S)
            reply = st.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
            assert reply.status_code == 200 and reply.json()["is_paused"] is False, reply.text
    except BaseException:
        st.stop()
        raise
    return st


def migrated_home(base: Path, metadata_db: str | None = None) -> dict[str, str]:
    """Environment of a new, migrated ``AIRFLOW_HOME`` under ``base`` loading this repo's DAGs.

    ``metadata_db``: a SQLAlchemy URL of an empty database for Airflow's metadata (PostgreSQL:
    ``postgresql+psycopg://…``); default: the SQLite file ``airflow.cfg`` names under the home."""
    home = base / "airflow_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "airflow.cfg", home / "airflow.cfg")
    (home / "var").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "OMEFLOW"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        PYTHONPATH=str(REPO),
    )
    if metadata_db:
        env.update(metadata_db_env(metadata_db))
    proc = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def metadata_db_env(url: str) -> dict[str, str]:
    """The settings that put every Airflow component on the database ``url``. PostgreSQL goes
    through psycopg 3 (``postgresql+psycopg``, which Airflow 3.3 supports and the project
    installs) for both of Airflow's engines: for the async one Airflow would otherwise derive
    ``postgresql+asyncpg``, a driver that is not installed."""
    if not url.startswith("postgresql"):
        return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}
    url = "postgresql+psycopg:" + url.split(":", 1)[1]
    return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": url}


@contextlib.contextmanager
def postgres_metadata_db() -> Iterator[str | None]:
    """A new, empty PostgreSQL database for Airflow's metadata (its URL), dropped afterwards;
    ``None`` with a warning when PostgreSQL cannot be had (a failure under
    ``OMEFLOW_REQUIRE_POSTGRES=1``)."""
    try:
        admin_url = ensure_postgres()
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"live_stack needs PostgreSQL ({REQUIRE_ENV}=1): {exc}")
        warnings.warn(f"live_stack runs Airflow on SQLite, not PostgreSQL: {exc}", stacklevel=2)
        yield None
        return
    with scratch_database(admin_url, "omeflow_airflow_") as url:
        yield url


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One running stack for the whole session, in its own home, on Airflow metadata in
    PostgreSQL (see the module docs), logged in as admin. DAGs are left paused: a test
    unpauses what it triggers (``stack.unpause(dag_id)``)."""
    base = tmp_path_factory.mktemp("live_stack")
    with postgres_metadata_db() as db_url:
        env = dict(migrated_home(base, db_url), **FAST_ENV)
        logs = base / "logs"
        logs.mkdir()
        st = start_stack(env, logs)
        try:
            yield st
        finally:
            st.stop()
