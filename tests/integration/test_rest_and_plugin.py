"""Real Airflow 3 components on 127.0.0.1, started as the README says (``make ui``), and the
omeflow plugin: REST v2 trigger → run → XCom, the HPC jobs page, its auth, the log view and the
"Cluster job log" extra link.

The components are started by ``scripts/ui.py`` (what ``make ui`` runs: api-server, scheduler,
dag-processor, triggerer sharing one JWT secret kept under ``var/``) in the throw-away
``airflow_env`` home; the test logs in through the SimpleAuthManager (``POST /auth/token``) with
the password the script printed, triggers ``omeflow_cluster_check`` through REST v2, and at the
end stops the script with SIGTERM and checks that no component process is left. The cluster side
is the embedded local gateway (no sandbox needed).
"""

from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import psutil
import pytest

from tests.stack_fixture import (
    FAST_ENV,
    UI_SCRIPT,
    Stack,
    free_port,
    home_processes,
    start_stack,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "omeflow_cluster_check"
TASK_ID = "cluster_check"
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def stack(airflow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``scripts/ui.py`` (``make ui``) on a free loopback port, logged in as admin."""
    st = start_stack(dict(airflow_env, **FAST_ENV), tmp_path_factory.mktemp("ui_logs"),
                     unpause=[DAG_ID])
    try:
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
    assert ti["state"] == "success" and ti["operator"].endswith("StepOperator"), ti


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
    where = {"dag_id": DAG_ID, "run_id": "r", "task_id": TASK_ID}
    assert stack.api("GET", "/omeflow/jobs/log", auth=False, params=where).status_code == 401


def _row_of(page: str, job_id: str) -> str | None:
    """The jobs page's row of ``job_id`` (its ``data-job-id``)."""
    found = re.search(rf"<tr class='job' data-job-id='{re.escape(job_id)}'.*?</tr>", page, re.S)
    return found.group(0) if found else None


def _log_links(row: str) -> list[str]:
    """The job view paths a row links to (HTML-unescaped)."""
    return [h.replace("&amp;", "&") for h in re.findall(r"href='(/omeflow/jobs/log\?[^']*)'", row)]


def test_jobs_page_lists_the_job_with_its_cluster_state(
    stack: Stack, finished_run: dict[str, Any]
) -> None:
    reply = stack.api("GET", "/omeflow/jobs")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/html")
    page = reply.text
    # the job id the page shows is recomputed from the task instance: the operator's own key
    row = _row_of(page, finished_run["job_id"])
    assert row is not None, f"job {finished_run['job_id']} not on the page:\n{page[:3000]}"
    assert "data-state='COMPLETED'" in row, row
    assert "<td class='airflow-state'><span class='badge st-success' data-state='success'>" in row
    # the native id in full on hover (the local scheduler's is the job key itself)
    assert f"title='{finished_run['native_id']}'" in row, row
    assert "<td class='exit-code'>0</td>" in row, row
    [link] = _log_links(row)
    query = parse_qs(urlsplit(link).query)
    assert query == {"dag_id": [DAG_ID], "run_id": [finished_run["run_id"]],
                     "task_id": [TASK_ID], "try_number": ["1"]}, link
    assert "Live cluster state unavailable" not in page
    # the UI's iframe authenticates with the _token cookie, not a header
    by_cookie = stack.api("GET", "/omeflow/jobs", auth=False, cookies={"_token": stack.token})
    assert by_cookie.status_code == 200 and finished_run["job_id"] in by_cookie.text


def test_log_view_shows_the_job_log(stack: Stack, finished_run: dict[str, Any]) -> None:
    where = {"dag_id": DAG_ID, "run_id": finished_run["run_id"], "task_id": TASK_ID}
    reply = stack.api("GET", "/omeflow/jobs/log", params=where)  # the latest try by default
    assert reply.status_code == 200, reply.text
    assert "step cluster_check finished" in reply.text, reply.text[:3000]
    assert f"<span class='job-id'>{finished_run['job_id']}</span>" in reply.text
    # a try that never ran, a task that does not exist, a phase this try never ran
    no_try = stack.api("GET", "/omeflow/jobs/log", params={**where, "try_number": 2})
    assert no_try.status_code == 404 and "has not run try 2" in no_try.text, no_try.text
    no_task = stack.api("GET", "/omeflow/jobs/log", params={**where, "task_id": "nope"})
    assert no_task.status_code == 404, no_task.text
    no_merge = stack.api("GET", "/omeflow/jobs/log", params={**where, "phase": "merge"})
    assert no_merge.status_code == 404 and "no merge cluster job" in no_merge.text
    # unknown phases and out-of-range numbers are refused before anything reaches the gateway
    for bad in ({"phase": "../x"}, {"tail_bytes": 0}, {"try_number": 0}, {"map_index": -2}):
        assert stack.api("GET", "/omeflow/jobs/log", params={**where, **bad}).status_code == 422


def test_extra_link_resolves_to_the_log_view(stack: Stack, finished_run: dict[str, Any]) -> None:
    reply = stack.api("GET", f"{finished_run['ti_path']}/links")
    assert reply.status_code == 200, reply.text
    url = reply.json()["extra_links"].get("Cluster job log")
    assert url and url.startswith(f"{stack.base_url}/omeflow/jobs/log?"), reply.text
    query = parse_qs(urlsplit(url).query)
    assert query["run_id"] == [finished_run["run_id"]] and query["try_number"] == ["1"], url
    followed = stack.api("GET", url.removeprefix(stack.base_url))
    assert followed.status_code == 200 and "step cluster_check finished" in followed.text


def test_a_forged_xcom_cannot_point_the_log_view_at_another_dags_job(
    stack: Stack, finished_run: dict[str, Any]
) -> None:
    """Someone who may write XComs in another Dag pushes an ``hpc_job`` XCom naming the
    cluster_check job and a connection of their choice: neither reaches the gateway."""
    other = "celldetector_preprocess"
    stack.wait_for(f"{other} to be parsed",
                   lambda: stack.api("GET", f"/api/v2/dags/{other}").status_code == 200, 120)
    # paused: the run stays queued, its task instances exist but never run
    assert stack.api("PATCH", f"/api/v2/dags/{other}", json={"is_paused": True}).status_code == 200
    run = stack.api("POST", f"/api/v2/dags/{other}/dagRuns",
                    json={"logical_date": None, "conf": {"image_ids": [1]}})
    assert run.status_code == 200, run.text
    run_id = run.json()["dag_run_id"]
    forged = {"job_id": finished_run["job_id"], "native_id": "forged",
              "hpc_conn_id": "attacker_conn"}
    reply = stack.api(
        "POST",
        f"/api/v2/dags/{other}/dagRuns/{quote(run_id, safe='')}/taskInstances/check_images"
        "/xcomEntries",
        json={"key": "hpc_job", "value": forged},
    )
    assert reply.status_code == 201, reply.text

    page = stack.api("GET", "/omeflow/jobs").text
    # the task never ran (try 0): it has no job id, its row is the one with an empty one
    row = _row_of(page, "")
    assert row is not None and f"data-dag-id='{other}'" in row, page[:3000]
    assert finished_run["job_id"] not in row, f"the forged job id reached the page: {row}"
    assert "forged" not in row and "attacker_conn" not in page, row
    assert "data-state='not submitted'" in row, row
    assert _log_links(row) == [], f"a task that never ran links to a log: {row}"
    # asking the log view for that task instance directly does not read the forged job either
    view = stack.api("GET", "/omeflow/jobs/log",
                     params={"dag_id": other, "run_id": run_id, "task_id": "check_images"})
    assert view.status_code == 404, view.text
    assert "step cluster_check finished" not in view.text
    for try_number in (1, 2):
        view = stack.api("GET", "/omeflow/jobs/log", params={
            "dag_id": other, "run_id": run_id, "task_id": "check_images",
            "try_number": try_number})
        assert view.status_code == 404 and "step cluster_check finished" not in view.text
    # the old route that took a job id (the XCom's) is gone
    old = stack.api("GET", f"/omeflow/jobs/{finished_run['job_id']}/log")
    assert old.status_code == 404 and "step cluster_check finished" not in old.text


def test_extra_link_operators_cover_every_hpc_step_operator(airflow_env: dict[str, str]) -> None:
    """Airflow matches a plugin's link to exact classes: every HpcStepOperator subclass is
    listed (the rendering and escaping of the page: tests/unit/test_jobs_page_render.py)."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import omeflow_plugin as p; "
            "print(json.dumps([c.__name__ for c in p.ClusterJobLogLink.operators]))")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "plugins")], env=airflow_env,
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "HpcStepOperator" in names and "SegmentNucleiOperator" in names, names


# -- make ui: one instance per home, and a clean stop (keep these last: they stop the stack) --
def test_a_second_ui_on_the_same_home_is_refused(stack: Stack) -> None:
    proc = subprocess.run(
        [sys.executable, str(UI_SCRIPT), "--port", str(free_port())], env=stack.env,
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "another `make ui` uses" in proc.stderr, proc.stderr


def test_ui_shares_one_secret_and_stops_every_component_on_sigterm(
    stack: Stack, finished_run: dict[str, Any]
) -> None:
    # the run succeeded (finished_run): the api-server accepted the scheduler's task tokens
    secrets_file = stack.home / "var" / "ui_secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert set(json.loads(secrets_file.read_text())) == {"jwt_secret", "api_secret_key"}
    procs = {name: psutil.Process(pid) for name, pid in stack.pids.items()}
    assert all(p.is_running() for p in procs.values()), stack.output()
    assert stack.stop() == 0, stack.output()[-3000:]
    assert "all components stopped" in stack.output()
    assert "still running" not in stack.output(), "every component stopped on its own SIGTERM"
    alive = [name for name, p in procs.items()
             if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"still running after the stop: {alive}"
    assert home_processes(stack.home) == [], "processes of the UI's home are left"
