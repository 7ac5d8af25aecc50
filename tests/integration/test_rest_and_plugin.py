"""Real Airflow 3 components on 127.0.0.1: REST v2 trigger → run → XCom, and the omeflow plugin.

Starts ``airflow api-server`` (one worker, a free loopback port), ``scheduler``,
``dag-processor`` and ``triggerer`` in the throw-away ``airflow_env`` home, logs in through the
SimpleAuthManager (``POST /auth/token``), triggers ``omeflow_cluster_check`` through REST v2 and
checks the plugin's HPC jobs page, its auth, the log view and the "Cluster job log" extra link.
The cluster side is the embedded local gateway (no sandbox needed). Every process is stopped
(its whole process group) when the module ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

pytestmark = pytest.mark.slow

DAG_ID = "omeflow_cluster_check"
TASK_ID = "cluster_check"
AIRFLOW = str(Path(sys.executable).parent / "airflow")
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


class Stack:
    """The running components, their logs and an authenticated REST client."""

    def __init__(self, base_url: str, env: dict[str, str], logs: Path) -> None:
        self.base_url = base_url
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.token = ""
        self.http = httpx.Client(base_url=base_url, timeout=30.0, follow_redirects=False)

    def start(self, name: str, *args: str) -> None:
        with open(self.logs / f"{name}.log", "wb") as out:
            self.procs[name] = subprocess.Popen(
                [AIRFLOW, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"airflow {name} exited with {proc.returncode}:\n"
                    f"{_tail(self.logs / f'{name}.log')}"
                )

    def diagnostics(self) -> str:
        return "\n".join(
            f"---- {name} ----\n{_tail(self.logs / f'{name}.log', 2500)}" for name in self.procs
        )

    def stop(self) -> None:
        self.http.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            # the group may outlive its leader (LocalExecutor workers, uvicorn workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def api(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        return self.http.request(method, path, headers=headers, **kwargs)

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
                             f"{self.diagnostics()}")


@pytest.fixture(scope="module")
def stack(airflow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """api-server, scheduler, dag-processor and triggerer on 127.0.0.1, logged in as admin."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    home = Path(airflow_env["AIRFLOW_HOME"])
    env = dict(
        airflow_env,
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=base_url,
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{base_url}/execution/",
        AIRFLOW__CORE__PARALLELISM="2",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__API__SECRET_KEY=secrets.token_hex(32),
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
        AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(home / "var" / "logs"),
    )
    # SimpleAuthManager keeps the passwords it generated in this file; a user already listed
    # keeps its password, so the test chooses admin's
    passwords_file = home / "var" / "simple_auth_manager_passwords.json"
    passwords = json.loads(passwords_file.read_text()) if passwords_file.exists() else {}
    passwords.setdefault("admin", secrets.token_urlsafe(16))
    passwords_file.write_text(json.dumps(passwords))

    logs = tmp_path_factory.mktemp("airflow_component_logs")
    st = Stack(base_url, env, logs)
    try:
        st.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1")
        st.start("scheduler", "scheduler", "--skip-serve-logs")
        st.start("dag-processor", "dag-processor")
        st.start("triggerer", "triggerer", "--skip-serve-logs")
        st.wait_for("the API server", lambda: st.api("GET", "/api/v2/monitor/health",
                                                     auth=False).status_code == 200,
                    START_TIMEOUT_S)
        reply = st.http.post("/auth/token",
                             json={"username": "admin", "password": passwords["admin"]})
        assert reply.status_code == 201, reply.text
        st.token = reply.json()["access_token"]
        st.wait_for(f"{DAG_ID} to be parsed",
                    lambda: st.api("GET", f"/api/v2/dags/{DAG_ID}").status_code == 200,
                    START_TIMEOUT_S)
        reply = st.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
        assert reply.status_code == 200 and reply.json()["is_paused"] is False, reply.text
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="module")
def finished_run(stack: Stack) -> dict[str, Any]:
    """One ``omeflow_cluster_check`` run triggered through REST v2, waited for until it ends."""
    conf = {"sleep_s": 0, "exit_code": 0, "time_min": 5}
    reply = stack.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                      json={"logical_date": None, "conf": conf})
    assert reply.status_code == 200, reply.text
    run = reply.json()
    assert run["conf"] == conf
    run_id = run["dag_run_id"]
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"

    def ended() -> dict[str, Any] | None:
        body = stack.api("GET", path).json()
        return body if body["state"] in ("success", "failed") else None

    final = stack.wait_for(f"run {run_id} to end", ended, RUN_TIMEOUT_S)
    ti_path = f"{path}/taskInstances/{TASK_ID}"
    assert final["state"] == "success", (
        f"run ended {final['state']}; task: {stack.api('GET', ti_path).text}\n{stack.diagnostics()}"
    )
    hpc_job = stack.api("GET", f"{ti_path}/xcomEntries/hpc_job", params={"deserialize": True})
    assert hpc_job.status_code == 200, hpc_job.text
    job = hpc_job.json()["value"]
    job = json.loads(job) if isinstance(job, str) else job
    return {"run_id": run_id, "ti_path": ti_path, "job_id": job["job_id"],
            "native_id": job["native_id"]}


# -- REST v2 ------------------------------------------------------------------------------------
def test_run_returns_the_cluster_report_as_xcom(stack: Stack, finished_run: dict[str, Any]) -> None:
    reply = stack.api("GET", f"{finished_run['ti_path']}/xcomEntries/return_value",
                      params={"deserialize": True})
    assert reply.status_code == 200, reply.text
    report = reply.json()["value"]
    report = json.loads(report) if isinstance(report, str) else report
    assert report["hostname"] == socket.gethostname()
    assert report["packages"]["omeflow"], "the job reports the installed omeflow version"
    ti = stack.api("GET", finished_run["ti_path"]).json()
    assert ti["state"] == "success" and ti["operator"] == "HpcStepOperator"


def test_trigger_rejects_conf_outside_the_param_schema(stack: Stack) -> None:
    before = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns").json()["total_entries"]
    reply = stack.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                      json={"logical_date": None, "conf": {"exit_code": 999}})
    assert reply.status_code == 400, reply.text
    assert "exit_code" in reply.text or "999" in reply.text, reply.text
    after = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns").json()["total_entries"]
    assert after == before, "a rejected conf must not create a run"


def test_rest_needs_a_token(stack: Stack) -> None:
    assert stack.api("GET", f"/api/v2/dags/{DAG_ID}", auth=False).status_code == 401


# -- the plugin ---------------------------------------------------------------------------------
def test_plugin_is_registered_with_its_nav_entry_and_link(stack: Stack) -> None:
    reply = stack.api("GET", "/api/v2/plugins")
    assert reply.status_code == 200, reply.text
    plugin = next((p for p in reply.json()["plugins"] if p["name"] == "omeflow"), None)
    assert plugin is not None, reply.text
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/omeflow"]
    views = {v["name"]: v for v in plugin["external_views"]}
    assert views["HPC jobs"]["href"] == "omeflow/jobs"
    assert views["HPC jobs"]["destination"] == "nav"
    assert any("ClusterJobLogLink" in link for link in plugin["operator_extra_links"])


def test_jobs_page_refuses_anonymous_and_forged_tokens(stack: Stack) -> None:
    assert stack.api("GET", "/omeflow/jobs", auth=False).status_code == 401
    forged = stack.api("GET", "/omeflow/jobs", auth=False,
                       headers={"Authorization": "Bearer not.a.jwt"})
    assert forged.status_code in (401, 403)
    assert stack.api("GET", "/omeflow/jobs", auth=False,
                     cookies={"_token": "garbage"}).status_code in (401, 403)
    assert stack.api("GET", "/omeflow/jobs/anything/log", auth=False).status_code == 401


def test_jobs_page_lists_the_job_with_its_cluster_state(
    stack: Stack, finished_run: dict[str, Any]
) -> None:
    reply = stack.api("GET", "/omeflow/jobs")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/html")
    page = reply.text
    row = next((r for r in re.findall(r"<tr>.*?</tr>", page, re.S)
                if finished_run["job_id"] in r), None)
    assert row is not None, f"job {finished_run['job_id']} not on the page:\n{page[:3000]}"
    assert "<td class='cluster-state'>COMPLETED</td>" in row, row
    assert "<td class='airflow-state'>success</td>" in row, row
    assert f"<td>{finished_run['native_id']}</td>" in row, row
    assert f"href='/omeflow/jobs/{finished_run['job_id']}/log'" in row, row
    assert "Live cluster state unavailable" not in page
    # the UI's iframe authenticates with the _token cookie, not a header
    by_cookie = stack.api("GET", "/omeflow/jobs", auth=False, cookies={"_token": stack.token})
    assert by_cookie.status_code == 200 and finished_run["job_id"] in by_cookie.text


def test_log_view_shows_the_job_log(stack: Stack, finished_run: dict[str, Any]) -> None:
    job_id = finished_run["job_id"]
    reply = stack.api("GET", f"/omeflow/jobs/{job_id}/log")
    assert reply.status_code == 200, reply.text
    assert "step cluster_check finished" in reply.text, reply.text[:3000]
    # ids outside the protocol's JobKey pattern are refused before anything reaches the gateway
    bad = stack.api("GET", "/omeflow/jobs/-rf/log")
    assert bad.status_code == 400 and "not a cluster job id" in bad.text
    unknown = stack.api("GET", "/omeflow/jobs/no-such-job/log")
    assert unknown.status_code == 404, unknown.text
    assert stack.api("GET", "/omeflow/jobs/x/log", params={"tail_bytes": 0}).status_code == 422


def test_extra_link_resolves_to_the_log_view(stack: Stack, finished_run: dict[str, Any]) -> None:
    reply = stack.api("GET", f"{finished_run['ti_path']}/links")
    assert reply.status_code == 200, reply.text
    url = reply.json()["extra_links"].get("Cluster job log")
    assert url == f"{stack.base_url}/omeflow/jobs/{finished_run['job_id']}/log", reply.text
    followed = stack.api("GET", url.removeprefix(stack.base_url))
    assert followed.status_code == 200 and "step cluster_check finished" in followed.text


_RENDER_HOSTILE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from hpc_jobs.protocol import JobStatus
import omeflow_plugin as p

evil = "<script>alert(1)</script>"
row = p.HpcJobRow(dag_id="d", run_id="r'><img src=x onerror=alert(1)>", task_id="t",
                  map_index=-1, try_number=1, operator="HpcStepOperator", state="success",
                  job_id="job-1", native_id=evil, hpc_conn_id="omeflow_hpc", pushed_at=None)
live = {"job-1": JobStatus(job_id="job-1", state="FAILED", reason=evil)}
page = p._page("HPC jobs", p.render_jobs([row], live, [evil], "")).body.decode()
print(json.dumps({"page": page, "operators": [c.__name__ for c in p.ClusterJobLogLink.operators]}))
"""


def test_pages_escape_what_the_cluster_and_the_db_say(airflow_env: dict[str, str]) -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _RENDER_HOSTILE, str(repo / "plugins")], env=airflow_env,
        capture_output=True, text=True, timeout=120, check=False, cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    page = out["page"]
    assert "<script>" not in page and "<img" not in page, page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "r&#x27;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "HpcStepOperator" in out["operators"]
