"""Airflow components as separate processes that a test can kill -9 and restart one at a time.

``scripts/ui.py`` starts and stops the four components together; a crash test needs each on its
own: :class:`CrashStack` starts api-server, scheduler, dag-processor and triggerer with the
environment ``scripts/ui.py`` gives them (one home, one URL, the shared JWT secret), each in its
own process group, so :meth:`CrashStack.kill` takes a component down with everything it started
(the scheduler's LocalExecutor workers, the triggerer's trigger runner, uvicorn's workers), as
a crashed host or an OOM kill would. :meth:`CrashStack.kill_worker` kills the supervisor (and its
task process) of one task instance only. :meth:`CrashStack.stop` leaves no process behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.stack_fixture import COMPONENTS, REPO, UI_SCRIPT, free_port, tail_of


def _ui_script() -> Any:
    """``scripts/ui.py`` as a module (``scripts/`` is not a package): its environment helpers."""
    name = "omeflow_ui_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, UI_SCRIPT)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]

START_TIMEOUT_S = 240
#: The LocalExecutor titles a task's supervisor ``airflow worker -- LocalExecutor: <ti id>``.
SUPERVISOR_TITLE = "airflow worker -- LocalExecutor"


class CrashStack:
    """The four Airflow components of one home, started, killed and restarted one by one.

    :param env: environment of a migrated home (``tests.stack_fixture.migrated_home``) plus
        the test's settings; the host, port and shared secrets are added here.
    :param logs: directory for each component's output (``<name>.log``, appended on restart).
    """

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        home = Path(env["AIRFLOW_HOME"])
        added = _ui_script().component_env(home, self.host, self.port)
        # only what component_env adds: the test's own environment is not the components'
        self.env = {**env, **{k: v for k, v in added.items() if os.environ.get(k) != v}}
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.http = httpx.Client(base_url=f"http://{self.host}:{self.port}", timeout=30.0)
        self.token = ""

    # -- processes ---------------------------------------------------------------------------
    @staticmethod
    def _die_with_parent() -> None:
        """In the child before exec: SIGKILL when the test process dies (even by kill -9), so
        that no component outlives a test run that was killed (Linux ``PR_SET_PDEATHSIG``)."""
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG

    def start(self, name: str) -> None:
        """Start one component (its own process group; output appended to its log)."""
        with open(self.logs / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                _ui_script().component_argv(name, self.host, self.port, 1), env=self.env,
                cwd=REPO,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=self._die_with_parent,
            )

    def start_all(self) -> None:
        """Start every component, wait for the api-server and log in as admin."""
        for name in COMPONENTS:
            self.start(name)
        self.wait_api()
        self.login()

    def kill(self, name: str) -> int:
        """kill -9 a component and every process it started; returns the main pid."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return proc.pid

    def restart(self, name: str) -> None:
        """Start a killed component again (same environment, same home)."""
        assert self.procs[name].poll() is not None, f"{name} is still running"
        self.start(name)

    def kill_worker(self, ti_id: str) -> list[int]:
        """kill -9 the LocalExecutor supervisor of task instance ``ti_id`` (its title ends with
        the id) and its task process, what a dying worker host does to a running try; [] when
        none runs."""
        killed: list[int] = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith(SUPERVISOR_TITLE) and ti_id in cmd:
                with contextlib.suppress(psutil.Error):
                    family = [proc, *proc.children(recursive=True)]
                    for member in family:
                        member.kill()
                    killed += [p.pid for p in family]
        return killed

    def supervisor_titles(self) -> list[str]:
        """Titles of the running task supervisors (for a failure message)."""
        titles = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith(SUPERVISOR_TITLE):
                titles.append(cmd)
        return titles

    def stop(self) -> None:
        """SIGTERM every component's group, then SIGKILL what is left (nothing survives)."""
        self.http.close()
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    # -- REST --------------------------------------------------------------------------------
    def wait_api(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the api-server answers its health check."""
        self.wait_for("the api-server", lambda: self.http.get("/api/v2/monitor/health")
                      .status_code == 200, timeout)

    def login(self) -> None:
        """A token for admin (the SimpleAuthManager's generated password)."""
        pw_file = Path(self.env["AIRFLOW_HOME"]) / "var" / "simple_auth_manager_passwords.json"
        password = self.wait_for("the admin password file",
                                 lambda: json.loads(pw_file.read_text()).get("admin"), 60)
        reply = self.http.post("/auth/token", json={"username": "admin", "password": password})
        assert reply.status_code == 201, reply.text
        self.token = reply.json()["access_token"]

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An authenticated call of the public REST API."""
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def unpause(self, dag_id: str) -> None:
        """Wait until ``dag_id`` is parsed, then unpause it."""
        self.wait_for(f"{dag_id} to be parsed",
                      lambda: self.api("GET", f"/api/v2/dags/{dag_id}").status_code == 200,
                      START_TIMEOUT_S)
        reply = self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        assert reply.status_code == 200, reply.text

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> None:
        reply = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                         json={"dag_run_id": run_id, "logical_date": None, "conf": conf})
        assert reply.status_code == 200, reply.text

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def run_state(self, dag_id: str, run_id: str) -> str:
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        assert reply.status_code == 200, reply.text
        return str(reply.json()["state"])

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float,
                 interval: float = 1.0) -> Any:
        """Call ``probe()`` until it returns something truthy (bounded; fails with the logs).
        Connection errors and missing files count as not yet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = probe()
            except (httpx.TransportError, OSError, ValueError):
                value = None
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                             f"{self.diagnostics()}")

    def diagnostics(self) -> str:
        return "\n".join(f"---- {name} ----\n{tail_of(self.logs / f'{name}.log', 2500)}"
                         for name in COMPONENTS)
